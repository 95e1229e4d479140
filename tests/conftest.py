"""Shared fixtures: small real transformers MoE models built from configs (random weights)."""
from __future__ import annotations

import pytest
import torch

# Tiny models on a few shared cores: intra-op worker threads only spin against each other
# (a tiny DBRX forward takes ~5 s with 2 threads on a loaded machine, ~0.02 s with 1).
torch.set_num_threads(1)

try:  # tests import them from here; child processes import this file with tests/ on sys.path
    from tests.tiny_models import padded_batch, tiny_mixtral  # noqa: E402,F401
    from tests import vllm_helpers  # noqa: E402
except ModuleNotFoundError:
    from tiny_models import padded_batch, tiny_mixtral  # noqa: E402,F401
    import vllm_helpers  # noqa: E402


def pytest_collection_finish(session) -> None:
    """Where engine tests will run and the vLLM venv is not built yet, start building it now:
    the build takes minutes, mostly on one core, while the tests before the engine tests run
    on one thread (above). The engine tests' own ``ensure_venv`` waits for it (a file lock),
    and reports its failure, if any, by building again."""
    if any(item.nodeid.startswith("tests/test_vllm") for item in session.items):
        vllm_helpers.build_in_background()


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
