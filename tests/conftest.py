"""Shared fixtures: small real transformers MoE models built from configs (random weights)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

# Tiny models on a few shared cores: intra-op worker threads only spin against each other
# (a tiny DBRX forward takes ~5 s with 2 threads on a loaded machine, ~0.02 s with 1).
torch.set_num_threads(1)

try:  # tests import them from here; child processes import this file with tests/ on sys.path
    from tests.tiny_models import padded_batch, tiny_mixtral  # noqa: E402,F401
except ModuleNotFoundError:
    from tiny_models import padded_batch, tiny_mixtral  # noqa: E402,F401
# The helpers by the names the test modules import them by (tests/ is on their path): one engine
# queue and one session stack for all of them, not a second copy under ``tests.``.
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_helpers  # noqa: E402
import vllm_helpers  # noqa: E402


def pytest_collection_finish(session) -> None:
    """Where engine tests will run: start building the vLLM venv if it is not built (minutes,
    mostly on one core, while the tests before the engine tests run on one thread, above), and
    queue every engine module's engine runs (``engine_runs_to_queue``) for the core those tests
    leave idle (``vllm_helpers.ENGINES``; every core once the engine tests begin). The runs wait
    for the venv's build, and the engine tests' own ``ensure_venv`` reports its failure, if any,
    by building again."""
    modules = {}
    for item in session.items:
        if item.nodeid.startswith("tests/test_vllm"):
            modules.setdefault(item.module.__name__, item.module)
    if modules:
        vllm_helpers.build_in_background()
    for module in modules.values():
        runs = getattr(module, "engine_runs_to_queue", None)
        if runs is not None:
            vllm_helpers.ENGINES.queue(runs())


def pytest_runtest_setup(item) -> None:
    if item.nodeid.startswith("tests/test_vllm"):
        vllm_helpers.ENGINES.use_every_core()


def pytest_sessionfinish(session) -> None:
    vllm_helpers.ENGINES.close()
    export_helpers.stop_session_stack()


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, whatever a test before it set (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def mixtral():
    return tiny_mixtral()


def until_first_verdict(window, limit: int = 12) -> int:
    """Run ``window()`` (one window of healthy traffic, returning its Health) until a fresh
    monitor's first verdict: it first measures the traffic's make-up on the pairs of its first
    windows (docs/detector.md, *Evidence*). Returns how many windows that took."""
    for n in range(1, limit + 1):
        if not window().note.endswith("no verdict yet"):
            return n
    raise AssertionError(f"no verdict after {limit} healthy windows")
