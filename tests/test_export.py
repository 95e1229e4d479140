"""torch.export of a monitored model: the exported program holds none of moewatch's ops.

An exported program runs elsewhere (another process, AOTInductor, ExecuTorch). moewatch's ops
name a monitor by a number that only means something in this process; in another, they would
call into whatever monitor holds that number, or fail to load without moewatch.
"""
from __future__ import annotations

import pytest
import torch

import moewatch
from tests.tiny_models import tiny_mixtral

IDS = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(6))


def _export(model, strict: bool):
    return torch.export.export(model, (IDS,), kwargs={"use_cache": False}, strict=strict)


def _moewatch_nodes(program) -> list:
    return [str(node.target) for node in program.graph.nodes if "moewatch" in str(node.target)]


@pytest.mark.parametrize("backend", ["staged", "device"])
@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_an_exported_monitored_model_holds_no_moewatch_op_and_the_monitor_goes_on(strict, backend):
    model = tiny_mixtral()
    plain = _export(model, strict)
    with torch.no_grad():
        expected = plain.module()(IDS, use_cache=False).logits
    with moewatch.attach(model, background=False, backend=backend) as mon:
        program = _export(model, strict)
        assert _moewatch_nodes(program) == []
        assert [n.op for n in program.graph.nodes] == [n.op for n in plain.graph.nodes]
        with torch.no_grad():
            assert torch.equal(program.module()(IDS, use_cache=False).logits, expected)
            model(IDS)  # the model itself is still watched
        mon.flush()
        assert {name: int(c.sum()) for name, c in mon.counts().items()} == {
            f"model.layers.{i}.mlp.gate": 2 * 7 * 2 for i in range(2)}
        assert mon.errors.total() == 0
