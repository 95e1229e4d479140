"""Fault injection: the monitor sees the faulted routing, and removing a fault restores the model."""
from __future__ import annotations

import pytest
import torch

import moewatch
from moewatch import faults
from moewatch.taps import tapped

from conftest import tiny_mixtral


def run(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_faults_reach_a_monitor_attached_first_and_come_off():
    model = tiny_mixtral(layers=2)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    clean = run(model, ids)
    with moewatch.attach(model, background=False) as mon:
        gate0, gate1 = (g.name for g in mon.gates)
        run(model, ids)
        mon.flush()  # window 0: clean
        with faults.two_expert_collapse(model, experts=(2, 5), layers=[1]) as fault:
            assert fault.gates == [gate1] and fault.active
            faulted = run(model, ids)
        assert not fault.active
        mon.flush()  # window 1: collapse at gate 1
        share = {row.gate: row.expert_share for row in mon.windows().query("window == 1").itertuples()}
        assert share[gate1][[2, 5]].sum() > 0.9  # the monitor saw the fault
        assert share[gate0][[2, 5]].sum() < 0.6  # the other gate did not change
        assert not torch.equal(faulted, clean)  # the experts really received the faulted routing

        with faults.dead_expert(model, expert=4):
            run(model, ids)
        mon.flush()  # window 2: expert 4 dead at both gates
        with faults.saturate(model, 8.0):
            run(model, ids)
        mon.flush()  # window 3: saturated
        frame = mon.windows()
        dead = frame.query("window == 2")
        assert len(dead) == 2 and all(counts[4] == 0 for counts in dead["expert_counts"])
        assert (frame.query("window == 3")["logit_std"].to_numpy()
                > 7 * frame.query("window == 0")["logit_std"].to_numpy()).all()
    assert torch.equal(run(model, ids), clean)


def test_capacity_squeeze_drops_tokens_a_capacity_limited_deployment_would_drop():
    model = tiny_mixtral(layers=1)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    with moewatch.attach(model, background=False, capacity_factor=1.25) as mon:
        run(model, ids)
        healthy = sum(mon.dropped().values())
        with faults.capacity_squeeze(model, experts=3, strength=2.0):
            run(model, ids)
        squeezed = sum(mon.dropped().values()) - healthy
    assert squeezed > max(3 * healthy, 20)


def test_bad_fault_arguments_are_refused():
    model = tiny_mixtral(layers=2)
    with pytest.raises(ValueError, match="2 gates"):
        faults.saturate(model, layers=[5])
    with pytest.raises(ValueError, match="two experts"):
        faults.two_expert_collapse(model, experts=(1,))


def test_faults_refuse_gates_whose_output_they_cannot_rewrite():
    """Switch's router returns (dispatch mask, probability, logits): a clear error, model untouched."""
    import pytest
    from transformers import SwitchTransformersConfig, SwitchTransformersModel

    from moewatch import faults

    config = SwitchTransformersConfig(vocab_size=64, d_model=32, d_kv=8, d_ff=32, num_layers=2,
                                      num_decoder_layers=2, num_heads=2, num_experts=4, expert_capacity=8,
                                      encoder_sparse_step=1, decoder_sparse_step=1)
    model = SwitchTransformersModel(config).eval()
    with pytest.raises(ValueError, match="does not return its logits first"):
        faults.two_expert_collapse(model)
    assert all(not m._forward_hooks and not tapped(m) for m in model.modules())
