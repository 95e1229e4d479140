"""MOEWATCH_<OPTION> variables (moewatch.engines.env) and fire drills on gates= custom gates."""
from __future__ import annotations

import pytest
import torch
import moewatch
from moewatch import faults
from moewatch.engines.env import EnvOptionError, options_from_env, port_from_env, unknown_variables, variable
from moewatch_from_scratch_gate import PairGateLM


def test_every_option_converts_from_its_variable(tmp_path):
    baseline = tmp_path / "b.json"
    baseline.write_text("{}")
    env = {"MOEWATCH_WINDOW_TOKENS": "4096", "MOEWATCH_WINDOW_SECONDS": "2.5", "MOEWATCH_BACKGROUND": "off",
           "MOEWATCH_GATES": "a.*.gate, b.*.gate", "MOEWATCH_TOP_K": "2", "MOEWATCH_CAPACITY_FACTOR": "none",
           "MOEWATCH_ALERTMANAGER_URL": "http://127.0.0.1:9093", "MOEWATCH_DUMP_DIR": str(tmp_path),
           "MOEWATCH_MODEL_NAME": "mixtral-8x7b", "MOEWATCH_BASELINE": str(baseline), "UNRELATED": "x"}
    assert options_from_env(env) == {
        "window_tokens": 4096, "window_seconds": 2.5, "background": False, "gates": ["a.*.gate", "b.*.gate"],
        "top_k": 2, "capacity_factor": None, "alertmanager_url": "http://127.0.0.1:9093",
        "dump_dir": str(tmp_path), "model_name": "mixtral-8x7b", "baseline": str(baseline)}
    assert variable("window_tokens") == "MOEWATCH_WINDOW_TOKENS"


@pytest.mark.parametrize("name, value, says", [
    ("MOEWATCH_WINDOW_TOKENS", "lots", "must be an integer"),
    ("MOEWATCH_WINDOW_TOKENS", "-5", "must be a positive number"),
    ("MOEWATCH_WINDOW_SECONDS", "soon", "must be a number"),
    ("MOEWATCH_BACKGROUND", "maybe", "1/0, true/false"),
    ("MOEWATCH_ALERTMANAGER_URL", "127.0.0.1:9093", "http:// or https://"),
    ("MOEWATCH_SCORING", "relu", "scoring="),
    ("MOEWATCH_METER_PROVIDER", "x", "Python object"),
    ("MOEWATCH_BASELINE", "/nonexistent/baseline.json", "no such file"),
    ("MOEWATCH_GATES", " , ", "at least one module pattern"),
])
def test_a_bad_value_is_an_error_naming_the_variable(name, value, says):
    with pytest.raises(EnvOptionError) as error:
        options_from_env({name: value})
    assert str(error.value).startswith(name) and says in str(error.value)


def test_port_and_unknown_variables():
    assert port_from_env({}) is None and port_from_env({"MOEWATCH_PORT": " 9400 "}) == 9400
    for bad in ("http", "0", "70000"):
        with pytest.raises(EnvOptionError, match="MOEWATCH_PORT"):
            port_from_env({"MOEWATCH_PORT": bad})
    assert unknown_variables({"MOEWATCH_PORT": "1", "MOEWATCH_WINDOWTOKENS": "5", "MOEWATCH_ADDR": "::1",
                              "MOEWATCH_FUZZ_EXAMPLES": "9"}) == ["MOEWATCH_WINDOWTOKENS"]


def test_the_plugin_does_nothing_without_moewatch_port(monkeypatch):
    from moewatch.engines import vllm_plugin

    monkeypatch.delenv("MOEWATCH_PORT", raising=False)
    assert vllm_plugin.register() is None and vllm_plugin.monitors() == []


def test_fire_drill_on_a_custom_gate_returning_logits_and_none():
    torch.manual_seed(0)
    model = PairGateLM()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clean = model(ids)
    with moewatch.attach(model, gates="blocks.*.router", top_k=2, background=False) as mon:
        with torch.no_grad():
            model(ids)
        assert mon.flush().severity == "ok"  # a healthy window first
        healthy = {g: c.copy() for g, c in mon.counts().items()}
        with faults.two_expert_collapse(model, experts=(3, 4), strength=4.0, gates="blocks.*.router") as fault:
            assert fault.gates == ["blocks.0.router", "blocks.1.router"]
            verdicts = []
            for _ in range(2):  # a collapse must persist two windows
                with torch.no_grad():
                    faulted = model(ids)
                verdicts.append(mon.flush().severity)
        assert verdicts == ["ok", "collapse"]
        assert not torch.equal(faulted, clean)  # the model routed the faulted logits
        for gate, counts in mon.counts().items():
            added = counts - healthy[gate]
            assert added[[3, 4]].sum() > 0.8 * added.sum()
    with torch.no_grad():
        assert torch.equal(model(ids), clean)  # removed: as before


def test_fire_drill_on_a_sigmoid_custom_gate():
    model = PairGateLM()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    with faults.dead_expert(model, expert=5, gates="blocks.*.router"):
        with torch.no_grad():
            model(ids)
        assert all((block.last_indices != 5).all() for block in model.blocks)


def test_a_plain_model_has_no_engine_and_no_engine_is_imported(mixtral):
    import sys

    from moewatch.engines import engine_for

    assert engine_for(mixtral) is None and engine_for(PairGateLM()) is None
    assert "vllm" not in sys.modules  # deciding never imports an engine the model does not use


@pytest.mark.parametrize("local_rank, replica, expected", [
    (0, 0, 0), (1, 0, 1),  # replica 0: the local rank as it is
    (0, 1, 2), (1, 1, 3),  # CPU: replica 1's ranks start at 0 again; moewatch adds 1 x 2
    (2, 1, 2), (3, 1, 3),  # CUDA: vLLM already added the replicas before it
])
def test_each_data_parallel_replica_on_a_host_serves_on_ports_of_its_own(local_rank, replica, expected):
    """Two replicas of a 2-worker engine on one host: ports base+0..3, none asked for twice.
    The worker is described by the two attributes vLLM's workers carry (local_rank and
    parallel_config); on CUDA vLLM's worker adds DP local rank x workers per replica itself."""
    from types import SimpleNamespace

    from moewatch.engines.vllm_plugin import port_offset

    config = SimpleNamespace(data_parallel_size=2, tensor_parallel_size=2, pipeline_parallel_size=1,
                             prefill_context_parallel_size=1, data_parallel_rank_local=replica,
                             data_parallel_index=replica)
    assert port_offset(SimpleNamespace(local_rank=local_rank, parallel_config=config)) == expected
    # the launcher's local DP rank unknown (-1, vLLM's default): the replica's index stands for it
    config.data_parallel_rank_local = -1
    assert port_offset(SimpleNamespace(local_rank=local_rank, parallel_config=config)) == expected
    # one replica: vLLM's local rank, whatever the platform
    config.data_parallel_size = 1
    assert port_offset(SimpleNamespace(local_rank=local_rank, parallel_config=config)) == local_rank


def test_the_environment_can_turn_the_compiled_kernel_off():
    """``MOEWATCH_CPU_KERNEL=numpy`` (a process's switch: an engine's workers read it too) leaves
    the reduction to numpy; unset or ``numba``, the kernel reduces where numba is installed."""
    import os
    import subprocess
    import sys

    probe = "from moewatch.hotpath import numba_backend as k; print(k.enabled, k.available())"
    seen = {}
    for value in ("numpy", "numba", None):
        env = {key: val for key, val in os.environ.items() if key != "MOEWATCH_CPU_KERNEL"}
        if value is not None:
            env["MOEWATCH_CPU_KERNEL"] = value
        seen[value] = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                     timeout=120, check=True).stdout.split()
    assert seen == {"numpy": ["False", "False"], "numba": ["True", "True"], None: ["True", "True"]}


def test_a_cpu_kernel_that_is_neither_numba_nor_numpy_is_refused_at_start_up():
    """A misspelt ``MOEWATCH_CPU_KERNEL`` would otherwise leave the kernel on without a word."""
    with pytest.raises(EnvOptionError, match="MOEWATCH_CPU_KERNEL='nmupy' must be one of numba, numpy"):
        options_from_env({"MOEWATCH_CPU_KERNEL": "nmupy"})
    for value in ("numpy", " NumPy ", "numba"):
        assert options_from_env({"MOEWATCH_CPU_KERNEL": value}) == {}


def test_a_plain_attach_refuses_a_misspelt_cpu_kernel_and_leaves_no_hook(monkeypatch):
    from tests.conftest import tiny_mixtral

    model = tiny_mixtral()
    monkeypatch.setenv("MOEWATCH_CPU_KERNEL", "nmupy")
    with pytest.raises(EnvOptionError, match="MOEWATCH_CPU_KERNEL='nmupy'"):
        moewatch.attach(model)
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(not module._forward_hooks for module in model.modules())
    monkeypatch.setenv("MOEWATCH_CPU_KERNEL", "numpy")
    moewatch.attach(model, background=False).detach()  # a valid value: attached
