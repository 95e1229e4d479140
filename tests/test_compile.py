"""torch.compile: a monitor attached before compiling counts exactly what eager counts."""
import warnings

import numpy as np
import pytest
import torch

import moewatch
from tests.conftest import padded_batch, tiny_mixtral


def test_compiled_model_counts_like_eager():
    model = tiny_mixtral(layers=1)
    ids, mask = padded_batch()
    mon = moewatch.attach(model, background=False)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    eager = mon.counts()
    compiled = torch.compile(model, backend="eager")  # dynamo traces the hooks into the graph
    with torch.no_grad():
        for _ in range(2):
            out = compiled(ids, attention_mask=mask).logits
    got = mon.counts()
    mon.detach()
    torch._dynamo.reset()
    assert torch.allclose(out, expected, atol=1e-5)
    assert mon.error_counts() == {}
    for name, counts in eager.items():
        np.testing.assert_array_equal(got[name], 3 * counts)  # eager once + compiled twice


def test_attaching_to_a_compiled_wrapper_warns_and_names_gates_plainly():
    model = tiny_mixtral(layers=1)
    compiled = torch.compile(model, backend="eager")
    with pytest.warns(UserWarning, match="Attach before calling torch.compile"):
        mon = moewatch.attach(compiled, background=False)
    assert [g.name for g in mon.gates] == ["model.layers.0.mlp.gate"]
    mon.detach()
    torch._dynamo.reset()
