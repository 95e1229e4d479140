"""Routing decisions gathered across data-parallel ranks (``moewatch.hotpath.gathered``).

An engine's naive data-parallel dispatch (vLLM's ``allgather_reducescatter``) gathers every
rank's tokens before the router's top-k, so a layer's decisions cover all ranks' rows while its
gate's logits are this rank's. Here a model of the test's own does exactly that in one process
(the other ranks' logits are fixed tensors placed before and after this rank's), served by an
engine of the test's own that says where this rank's rows start. Each rank must count its own
rows: counts equal a bincount of the router's decisions at those rows, eager and compiled
(``fullgraph=True``), on both backends; and where no engine places the rows the calls are
counted as errors, never raised into the model, never counted as tokens.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import moewatch
import moewatch.engines as engines
from moewatch.adapters.base import GateSpec
from moewatch.engines.base import Engine
from moewatch.routing import GateInfo, Routing

EXPERTS, TOP_K, HIDDEN = 8, 2, 16


class GatheredGate(nn.Module):
    """This rank's logits [T, E] and the top-k over every rank's tokens [T_before + T + T_after, k]."""

    def __init__(self, before: int, after: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.proj = nn.Linear(HIDDEN, EXPERTS, bias=False)
        # the other ranks' router logits, as the dispatch would hand them over
        self.register_buffer("before", torch.randn(before, EXPERTS, generator=generator) * 3)
        self.register_buffer("after", torch.randn(after, EXPERTS, generator=generator) * 3)

    def forward(self, hidden):  # hidden [T, H]
        logits = self.proj(hidden)  # [T, E]
        everyone = torch.cat([self.before, logits, self.after])  # [T_all, E]
        return logits, torch.topk(everyone, TOP_K, dim=-1).indices  # [T, E], [T_all, k]


class GatheredMoE(nn.Module):
    def __init__(self, before: int = 5, after: int = 3, layers: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, HIDDEN)
        self.gates = nn.ModuleList([GatheredGate(before, after, seed) for seed in range(layers)])
        self.mix = nn.ModuleList([nn.Linear(HIDDEN, HIDDEN) for _ in range(layers)])

    def forward(self, ids):  # ids [T]
        hidden = self.embed(ids)
        for gate, mix in zip(self.gates, self.mix):
            logits, _ = gate(hidden)
            hidden = hidden + mix(hidden) * logits.softmax(-1).max(-1, keepdim=True).values
        return hidden


def _extract(module, args, kwargs, output) -> Routing:
    logits, indices = output
    return Routing(logits=logits, indices=indices)


class DataParallelEngine(Engine):
    """An engine whose router gathers every rank's tokens: this rank's start after ``before`` rows."""

    name = "data-parallel"

    def __init__(self, start):
        self.start = start
        self.asked = []

    def gates(self, model, options):
        return [GateSpec(info=GateInfo(name=f"gates.{i}", num_experts=EXPERTS, top_k=TOP_K, family="test"),
                         module=gate, extract=_extract) for i, gate in enumerate(model.gates)]

    def row_locator(self):
        return self.local_rows

    def local_rows(self, local, gathered):
        self.asked.append((local, gathered))
        return self.start


def _expected(model, ids) -> dict:
    """Per gate: bincount of the router's decisions at this rank's rows, as the model made them."""
    out, hidden = {}, model.embed(ids)
    for i, (gate, mix) in enumerate(zip(model.gates, model.mix)):
        logits, indices = gate(hidden)
        start = gate.before.shape[0]
        out[f"gates.{i}"] = torch.bincount(indices[start:start + ids.shape[0]].reshape(-1), minlength=EXPERTS)
        hidden = hidden + mix(hidden) * logits.softmax(-1).max(-1, keepdim=True).values
    return out


def _attach(monkeypatch, model, engine, backend):
    monkeypatch.setattr(engines, "_CLAIMS", [lambda m: engine if m is model else None])
    return moewatch.attach(model, background=False, backend=backend)


@pytest.mark.parametrize("backend", ["staged", "device"])
@pytest.mark.parametrize("compiled", [False, True])
def test_each_rank_counts_its_own_rows_of_gathered_decisions(monkeypatch, backend, compiled):
    model = GatheredMoE().eval()
    engine = DataParallelEngine(start=5)
    calls = [torch.randint(0, 64, (t,), generator=torch.Generator().manual_seed(t)) for t in (4, 7, 1, 7)]
    with torch.no_grad():
        alone = [model(ids) for ids in calls]
        expected = {name: sum(_expected(model, ids)[name] for ids in calls) for name in ("gates.0", "gates.1")}
    mon = _attach(monkeypatch, model, engine, backend)
    run = torch.compile(model, fullgraph=True, backend="eager", dynamic=False) if compiled else model
    with torch.no_grad():
        watched = [run(ids) for ids in calls]
    mon.flush()
    counts = mon.counts()
    errors = mon.error_counts()
    mon.detach()
    assert errors == {}
    for name, want in expected.items():
        assert counts[name].tolist() == want.tolist(), (name, counts[name], want)
        assert int(counts[name].sum()) == TOP_K * sum(len(ids) for ids in calls)  # this rank's tokens only
    assert all((local, gathered) == (local, local + 8) for local, gathered in engine.asked)
    assert all(torch.equal(a, b) for a, b in zip(alone, watched))  # the model is untouched


@pytest.mark.parametrize("backend", ["staged", "device"])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("start", [None, 9])  # not placed; placed past the 12 gathered rows
def test_gathered_decisions_no_engine_places_are_errors_not_tokens(monkeypatch, backend, compiled, start):
    model = GatheredMoE().eval()
    engine = DataParallelEngine(start=start)
    ids = torch.randint(0, 64, (4,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        alone = model(ids)
    mon = _attach(monkeypatch, model, engine, backend)
    run = torch.compile(model, fullgraph=True, backend="eager", dynamic=False) if compiled else model
    with torch.no_grad():
        watched = run(ids)  # never raises into the forward
    mon.flush()
    errors, counts = mon.error_counts(), mon.counts()
    mon.detach()
    assert torch.equal(alone, watched)
    assert sum(errors.values()) >= 2, errors  # each gate's call, counted
    assert all(int(c.sum()) == 0 for c in counts.values())
