"""Automatic collapse dumps, as docs/dumps.md says: one per window in which gates first collapse,
naming all of them; a gate collapsing in a later window gets its own; none twice for a gate."""
from __future__ import annotations

import os

import torch

import moewatch
from moewatch import faults
from moewatch.dump import read_dump
from tests.conftest import tiny_mixtral, until_first_verdict

GATES = [f"model.layers.{i}.mlp.gate" for i in range(3)]


def _window(model, mon, gen):
    with torch.no_grad():
        model(torch.randint(0, 128, (4, 32), generator=gen))
    return mon.flush()


def test_one_dump_per_window_naming_every_gate_that_collapsed(tmp_path):
    model = tiny_mixtral(seed=0, layers=3)
    gen = torch.Generator().manual_seed(0)
    with moewatch.attach(model, background=False) as recorder:
        for _ in range(10):
            _window(model, recorder, gen)
        baseline = recorder.baseline()
    folder = tmp_path / "dumps"
    mon = moewatch.attach(model, baseline=baseline, background=False, dump_dir=str(folder))
    until_first_verdict(lambda: _window(model, mon, gen))
    # layers 1 and 2 together (layer 0, before them, cannot see it)
    with faults.two_expert_collapse(model, experts=(0, 1), layers=[1, 2]):
        verdicts = [_window(model, mon, gen) for _ in range(2)]
    first = next(v for v in verdicts if v.severity == "collapse")
    together = sorted(n for n, g in first.gates.items() if g.severity == "collapse")
    assert together == GATES[1:], together
    # then layer 0 as well: a new gate, a new dump; layers 1 and 2 do not trigger again
    with faults.two_expert_collapse(model, experts=(0, 1), layers=[0, 1, 2]):
        for _ in range(2):
            _window(model, mon, gen)
    mon.detach()
    names = sorted(n for n in os.listdir(folder) if "-collapse-" in n)
    assert len(names) == 2, names
    dumps = sorted((read_dump(str(folder / n)) for n in names), key=lambda d: d.metadata["trigger"]["window"])
    assert dumps[0].metadata["trigger"]["gates"] == GATES[1:]
    assert "collapse-model_layers_1_mlp_gate-and-1-more" in os.path.basename(dumps[0].path)
    assert dumps[1].metadata["trigger"]["gates"] == GATES[:1]
    assert os.path.basename(dumps[1].path).endswith("-collapse-model_layers_0_mlp_gate.parquet")


def test_docs_describe_it():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "dumps.md"), encoding="utf-8") as fh:
        text = fh.read()
    assert "one per window in which gates first collapse" in text and "one per gate" not in text
