"""A user's own gate, named by pattern."""
import numpy as np
import pytest
import torch

import moewatch
from tests.moe_from_scratch import TinyMoELM


def test_pattern_gate_counts_exact_with_padding():
    torch.manual_seed(0)
    model = TinyMoELM().eval()
    ids = torch.randint(0, 64, (4, 10))
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, :3] = 0
    mask[3, 6:] = 0
    with torch.no_grad():
        plain = model(ids, attention_mask=mask)
    mon = moewatch.attach(model, gates="*.router", top_k=2, scoring="softmax", background=False)
    assert [g.name for g in mon.gates] == ["blocks.0.router", "blocks.1.router"]
    assert all(g.family == "custom" and g.num_experts == 8 for g in mon.gates)
    with torch.no_grad():
        watched = model(ids, attention_mask=mask)
    assert torch.equal(plain, watched)
    valid = mask.bool()
    counts = mon.counts()
    for i, block in enumerate(model.blocks):
        expected = np.bincount(block.last_indices[valid].reshape(-1).numpy(), minlength=8)
        np.testing.assert_array_equal(counts[f"blocks.{i}.router"], expected)
    mon.detach()


def test_pattern_gate_needs_top_k():
    model = TinyMoELM()
    with pytest.raises(moewatch.AdapterError, match="top_k="):
        moewatch.attach(model, gates="*.router")


def test_top_k_larger_than_experts_is_rejected():
    model = TinyMoELM()
    with pytest.raises(moewatch.AdapterError, match="top_k=9 must be between 1 and"):
        moewatch.attach(model, gates="*.router", top_k=9)


def test_list_of_exact_names():
    model = TinyMoELM()
    with moewatch.attach(model, gates=["blocks.1.router"], top_k=2, background=False) as mon:
        assert [g.name for g in mon.gates] == ["blocks.1.router"]


def test_a_gate_attached_with_the_wrong_width_is_refused_with_a_clear_error():
    """num_experts=64 given for a router whose logits are 8 wide: every call is refused and
    counted, the message says what to do, the verdict says monitoring is failing."""
    torch.manual_seed(0)
    model = TinyMoELM().eval()
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        plain = model(ids)
    mon = moewatch.attach(model, gates="*.router", top_k=2, num_experts=64, background=False)
    with torch.no_grad():
        watched = model(ids)
        model(ids)
    assert torch.equal(plain, watched)
    assert mon.error_counts() == {"hook": 4}  # 2 gates x 2 calls
    message = mon.errors.last()["hook"]
    assert "logits 8 wide" in message and "num_experts=64" in message and "num_experts=8" in message
    assert all(int(c.sum()) == 0 for c in mon.counts().values())
    assert mon.health().monitoring == "failing"
    mon.detach()
