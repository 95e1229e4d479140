"""Models whose weights accelerate offloads (big-model inference): the gates are watched on the
device they compute on, not on the meta device their offloaded weights wait on."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import moewatch
from test_families_exact import RouterRecorder
from tests.tiny_models import tiny_mixtral

IDS = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(8))


def _offloaded(how: str, folder: str):
    from accelerate import cpu_offload, disk_offload, dispatch_model

    model = tiny_mixtral()
    cpu = torch.device("cpu")
    if how == "cpu_offload":
        return cpu_offload(model, execution_device=cpu)
    if how == "disk_offload":
        return disk_offload(model, folder, execution_device=cpu)
    # a device map with one layer on disk, as from_pretrained(device_map=..., offload_folder=...) makes
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    return dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=folder)


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload", "device map with a layer on disk"])
def test_offloaded_gates_are_watched_where_they_compute(how, tmp_path):
    expected_output = tiny_mixtral()(IDS).logits.detach()
    model = _offloaded(how, str(tmp_path))
    assert any(p.device.type == "meta" for p in model.parameters()), "nothing was offloaded"
    recorder = RouterRecorder(model)
    with moewatch.attach(model, background=False) as mon, torch.no_grad():
        assert {bank.device.type for bank in mon._banks.banks} == {"cpu"}
        output = model(IDS).logits
        mon.flush()
        counts = mon.counts()
        assert mon.errors.total() == 0, mon.errors.last()
    recorder.remove()
    assert torch.equal(output, expected_output)
    for name, calls in recorder.calls.items():
        (logits, indices), = calls
        np.testing.assert_array_equal(counts[name], np.bincount(indices.numpy().ravel(), minlength=logits.shape[-1]))
