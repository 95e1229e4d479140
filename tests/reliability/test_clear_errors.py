"""Bad arguments through the public API: each error names the thing that is wrong (the option
and its value, the path, the gate) and says what to do, and a refused attach leaves no hook."""
from __future__ import annotations

import pytest
import torch

import moewatch

from conftest import tiny_mixtral
from reliability_helpers import ToyMoE, no_hooks


@pytest.fixture(scope="module")
def mixtral():
    return tiny_mixtral(layers=1)


# (attach options, exception, words the message must hold)
ATTACH_CASES = {
    "unknown gate pattern": ({"gates": "model.layers.*.moe.router"}, moewatch.AdapterError,
                             ["gates='model.layers.*.moe.router'", "matched no module", "model.layers.0.mlp.gate"]),
    "top_k above a known gate's experts": ({"top_k": 9}, moewatch.AdapterError,
                                           ["top_k=9", "8 experts", "'model.layers.0.mlp.gate'", "between 1 and 8"]),
    "gates of the wrong type": ({"gates": 7}, TypeError, ["gates=7", "pattern", "model.layers.*.mlp.gate"]),
    "negative window_tokens": ({"window_tokens": -1}, ValueError, ["window_tokens=-1", "positive"]),
    "negative window_seconds": ({"window_seconds": -0.5}, ValueError, ["window_seconds=-0.5", "positive"]),
    "zero ring_windows": ({"ring_windows": 0}, ValueError, ["ring_windows=0", "positive"]),
    "misspelt option": ({"window_token": 5}, TypeError, ["unknown option", "window_token", "window_tokens"]),
    "unknown scoring": ({"scoring": "softermax"}, ValueError, ["scoring='softermax'", "softmax", "sigmoid"]),
    "sample_decisions not a number": ({"sample_decisions": "all"}, ValueError,
                                      ["sample_decisions='all'", "fraction in [0, 1]"]),
    "Alertmanager over ftp": ({"alertmanager_url": "ftp://127.0.0.1:9093"}, ValueError,
                              ["alertmanager_url='ftp://127.0.0.1:9093'", "http://", "scheme 'ftp'",
                               "http://127.0.0.1:9093"]),
    "Alertmanager without a scheme": ({"alertmanager_url": "localhost:9093"}, ValueError,
                                      ["alertmanager_url='localhost:9093'", "scheme is missing", "http://127.0.0.1:9093"]),
    "Alertmanager without a host": ({"alertmanager_url": "http://:9093"}, ValueError,
                                    ["alertmanager_url='http://:9093'", "no host"]),
    "Alertmanager port out of range": ({"alertmanager_url": "http://127.0.0.1:99999"}, ValueError,
                                       ["alertmanager_url='http://127.0.0.1:99999'", "1-65535"]),
    "Alertmanager port not a number": ({"alertmanager_url": "http://127.0.0.1:ninety"}, ValueError,
                                       ["alertmanager_url='http://127.0.0.1:ninety'", "1-65535"]),
    "OTLP endpoint without a scheme": ({"otlp_endpoint": "127.0.0.1:4318"}, ValueError,
                                       ["otlp_endpoint='127.0.0.1:4318'", "http://127.0.0.1:4318"]),
    "dump_dir not a path": ({"dump_dir": 3}, TypeError, ["dump_dir=3", "directory path"]),
    "model_name not a string": ({"model_name": 5}, TypeError, ["model_name=5", "string"]),
    "missing baseline file": ({"baseline": "/nonexistent/baseline.json"}, moewatch.BaselineError,
                              ["'/nonexistent/baseline.json'", "does not exist", "Baseline.save()",
                               "moewatch baseline build"]),
    "baseline path is a directory": ({"baseline": "/"}, moewatch.BaselineError, ["'/'", "is a directory"]),
    "baseline of the wrong type": ({"baseline": 42}, TypeError, ["baseline=", "Baseline or a path", "int"]),
}


@pytest.mark.parametrize("case", list(ATTACH_CASES))
def test_bad_attach_arguments_are_named_with_what_to_do(mixtral, case):
    options, kind, words = ATTACH_CASES[case]
    options = dict(options)
    baseline = options.pop("baseline", None)
    with pytest.raises(kind) as info:
        moewatch.attach(mixtral, baseline=baseline, **options)
    message = str(info.value)
    for word in words:
        assert word in message, f"{case}: {word!r} not in {message!r}"
    assert no_hooks(mixtral)


def test_top_k_above_a_user_gate_is_named():
    with pytest.raises(moewatch.AdapterError) as info:
        moewatch.attach(ToyMoE(), gates="routers.*", top_k=5)
    assert "top_k=5" in str(info.value) and "4 experts" in str(info.value) and "'routers.g0'" in str(info.value)


def test_user_gate_without_top_k_says_to_pass_it():
    with pytest.raises(moewatch.AdapterError) as info:
        moewatch.attach(ToyMoE(), gates="routers.*")
    assert "'routers.g0'" in str(info.value) and "pass top_k=" in str(info.value)


def test_not_a_module():
    with pytest.raises(TypeError, match="needs a torch.nn.Module, got dict"):
        moewatch.attach({"model": "weights"})


def test_bad_prometheus_ports_and_addresses(mixtral):
    with moewatch.attach(mixtral, background=False) as mon:
        for port in (-1, 70000, "9400", True, 94.5):
            with pytest.raises(ValueError) as info:
                mon.serve_prometheus(port=port)
            assert f"port={port!r}" in str(info.value) and "0-65535" in str(info.value)
        taken = mon.serve_prometheus(port=0)
        with pytest.raises(OSError) as info:
            mon.serve_prometheus(port=taken)
        message = str(info.value)
        assert f"127.0.0.1:{taken}" in message and "in use" in message and "port=0" in message
        with pytest.raises(OSError) as info:
            mon.serve_prometheus(port=0, addr="no-such-host.invalid")
        assert "no-such-host.invalid" in str(info.value) and "addr=" in str(info.value)
        with pytest.raises(ValueError, match="addr=''"):
            mon.serve_prometheus(port=0, addr="")


def test_dump_into_a_missing_directory(mixtral, tmp_path):
    with moewatch.attach(mixtral, background=False) as mon:
        with pytest.raises(moewatch.DumpError) as info:
            mon.dump(tmp_path / "no" / "such" / "dir" / "d.parquet")
    message = str(info.value)
    assert str(tmp_path / "no" / "such" / "dir") in message and "does not exist" in message
    assert "create it" in message


def test_reading_a_file_that_is_not_a_dump(tmp_path):
    path = tmp_path / "notes.parquet"
    path.write_text("hello")
    with pytest.raises(moewatch.DumpFormatError) as info:
        moewatch.read_dump(path)
    assert str(path) in str(info.value) and "not a readable Parquet file" in str(info.value)
