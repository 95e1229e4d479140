"""Models of transformers 4 (still in wide use): its MoE blocks route inside themselves, so
moewatch cannot read them by router class. attach refuses them with a clear error naming the
``gates=``/``top_k=`` that watch them, and with those it counts exactly. Before, Mixtral attached
blind (every gate call raised inside the hook, counts stayed 0) and Qwen2-MoE and OLMoE were
refused with no way forward named. transformers 4.57 is installed apart (``pip --target``, with
the tokenizers and huggingface-hub it needs) and put first on a child process's path."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = os.path.join(tempfile.gettempdir(), "moewatch-transformers-4.57.6")
PACKAGES = ("transformers==4.57.6", "tokenizers==0.22.2", "huggingface-hub>=0.34,<1.0")


@pytest.fixture(scope="module")
def transformers4() -> str:
    """A folder holding transformers 4.57.6 (built once per machine)."""
    if not os.path.isfile(os.path.join(TARGET, "transformers", "__init__.py")):
        building = tempfile.mkdtemp(prefix="moewatch-transformers4-")
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", building,
                               *PACKAGES], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"pip could not install {PACKAGES}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        if not os.path.exists(TARGET):  # (another session may have built it meanwhile)
            os.replace(building, TARGET)
    return TARGET


@pytest.fixture(scope="module")
def results(transformers4) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([transformers4, os.path.dirname(HERE)]))
    done = subprocess.run([sys.executable, os.path.join(HERE, "transformers4_child.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_a_transformers_4_model_is_refused_with_the_gates_that_watch_it(results, family):
    result = results[family]
    assert result["version"] == "4.57.6"
    refused = result["refused"]
    assert refused is not None and "transformers 4.57.6" in refused and "Upgrade transformers" in refused
    assert "attach with gates=" in refused


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_with_those_gates_it_counts_exactly_what_its_blocks_routed(results, family):
    result = results[family]
    assert result["errors"] == {}
    assert result["same"]  # outputs bit-identical
    assert len(result["gates"]) == 2
    assert result["counts"] == result["expected"]  # real tokens only: the padding is left out
