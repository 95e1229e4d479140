"""Training with activation checkpointing: the forwards run again in the backward pass are not counted.

Checkpointing keeps a layer's (or a whole model's) inputs instead of its activations and runs
its forward again during the backward pass, so every gate of a checkpointed layer is called
twice per training step. The second call routes the same tokens the same way; counted, it
would double every count, token and drop of the window.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import moewatch
from tests.tiny_models import tiny_mixtral

STEPS = 3


def _train(model, backend: str, how: str):
    """Forward and backward passes (no optimizer step: the weights, and so the routing, stay);
    returns (counts, windows frame, rows of the last window)."""
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(4))
    with moewatch.attach(model, background=False, backend=backend) as mon:
        run = torch.compile(model, fullgraph=True) if how.endswith("compiled") else model
        for _ in range(STEPS):
            if how == "whole model":
                logits = checkpoint(lambda i: model(input_ids=i, use_cache=False).logits, ids, use_reentrant=False)
                loss = logits.float().logsumexp(-1).mean()
            else:
                loss = run(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            mon.flush()
        return mon.counts(), mon.windows(), mon._ring[-1].rows


@pytest.mark.parametrize("backend", ["staged", "device"])
@pytest.mark.parametrize("how", ["layers, non-reentrant", "layers, reentrant", "whole model",
                                 "layers, non-reentrant, compiled"])
def test_a_checkpointed_step_counts_what_the_step_without_checkpointing_counts(how, backend, one_thread):
    """(Compiled, the backward pass runs no moewatch op again: the op has no output to recompute.)"""
    model = tiny_mixtral().train()
    torch._dynamo.reset()
    plain_counts, plain_frame, plain_rows = _train(model, backend, "plain")
    if how.startswith("layers"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": ", reentrant" in how})
    counts, frame, rows = _train(model, backend, how)

    assert set(counts) == set(plain_counts)
    for name, expected in plain_counts.items():
        assert expected.sum() == STEPS * 16 * 2, name  # 2 x 8 tokens a step, top-2
        np.testing.assert_array_equal(counts[name], expected, err_msg=name)
    assert frame["tokens"].tolist() == plain_frame["tokens"].tolist()
    np.testing.assert_allclose(rows, plain_rows)  # the requests: the rows of the forwards run once
