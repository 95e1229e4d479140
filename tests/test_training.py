"""Training with moewatch attached: gradients and updates are those of the model alone, the
routing of every training forward is counted (padding excluded), and the monitor keeps no
autograd graph alive. Eager, and compiled with ``fullgraph=True``."""
from __future__ import annotations

import copy

import pytest
import torch

import moewatch
from tests.tiny_models import padded_batch, tiny_mixtral


def train(model, steps: int, compile_it: bool = False):
    """A few AdamW steps of next-token prediction on padded batches; returns the losses."""
    model.train()
    step_fn = torch.compile(model, fullgraph=True) if compile_it else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        ids, mask = padded_batch(seed=10 + step)
        out = step_fn(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())
    return torch.stack(losses)


def expected_assignments(steps: int, top_k: int) -> int:
    return sum(int(padded_batch(seed=10 + step)[1].sum()) for step in range(steps)) * top_k


@pytest.mark.parametrize("compile_it", [False, True], ids=["eager", "compiled-fullgraph"])
def test_training_is_untouched_and_counted(compile_it):
    torch.manual_seed(0)
    plain = tiny_mixtral(seed=3)
    plain.config.router_aux_loss_coef = 0.0
    watched = copy.deepcopy(plain)
    mon = moewatch.attach(watched, background=False, window_tokens=10**9)
    try:
        torch.manual_seed(1)
        losses_plain = train(plain, steps=3, compile_it=compile_it)
        torch.manual_seed(1)
        losses_watched = train(watched, steps=3, compile_it=compile_it)
        assert torch.equal(losses_plain, losses_watched)
        for (name, p), (_, q) in zip(plain.named_parameters(), watched.named_parameters()):
            assert torch.equal(p, q), name  # every update bit-identical
        mon.flush()
        counts = mon.counts()
        assert len(counts) == 2
        for name, c in counts.items():
            assert int(c.sum()) == expected_assignments(3, top_k=2), name  # padding left out
        assert mon.error_counts() == {}
    finally:
        mon.detach()


def test_the_monitor_keeps_no_autograd_graph_alive():
    """Calls staged for the reader hold tensors without history: the forward's graph (and the
    activations it saves) is freed at backward, not when the reader gets to the window."""
    model = tiny_mixtral(seed=4)
    model.train()
    mon = moewatch.attach(model, background=False, window_tokens=10**9)
    try:
        ids, mask = padded_batch(seed=5)
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        staged = [call for bank in mon._banks.banks for call in bank.waiting()]
        assert len(staged) == 2  # one call per gate, waiting for the reader
        for call in staged:
            for tensor in call.tensors():
                assert tensor is None or (not tensor.requires_grad and tensor.grad_fn is None)
        out.loss.backward()  # the graph is still whole: nothing staged was detached in place
        mon.flush()  # and the staged calls are read correctly afterwards
        assert all(int(c.sum()) == int(mask.sum()) * 2 for c in mon.counts().values())
    finally:
        mon.detach()
