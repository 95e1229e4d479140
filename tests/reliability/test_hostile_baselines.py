"""Baselines from elsewhere: every bad file is one BaselineError naming the file and the field,
from ``Baseline.load``, from ``attach`` and from ``moewatch baseline show`` (exit 2, one line);
reading is bounded in memory; saving never writes through a planted link (SECURITY.md)."""
from __future__ import annotations

import copy
import json
import os
import stat
import threading

import numpy as np
import pytest
import torch

import moewatch
from moewatch.baseline import MIN_WINDOWS, Baseline, BaselineError, GateBaseline
from moewatch.baseline_file import MAX_CELLS, MAX_FILE_BYTES, MAX_WINDOWS
from moewatch.cli import main

from memory_helpers import measure
from reliability_helpers import ToyMoE, forward, no_hooks

GATES = ("routers.g0", "routers.g1")


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    """A real baseline of ToyMoE (two gates, four experts, top-2), as the dict of its file."""
    model = ToyMoE()
    with moewatch.attach(model, gates="routers.*", top_k=2, background=False, window_tokens=10) as mon:
        for seed in range(12):
            forward(model, torch.randn(1, 10, 8, generator=torch.Generator().manual_seed(seed)))
            mon.flush()
        path = tmp_path_factory.mktemp("good") / "good.json"
        mon.baseline().save(path)
    return json.loads(path.read_text())


def gate0(d: dict) -> dict:
    return d["gates"][0]


def per0(d: dict) -> dict:
    return d["gates"][0]["per_window"]


def set_in(target: dict, key, value) -> None:
    target[key] = value


def raw(text: str):
    return lambda d: text


# name -> (how the file is made from the good one, a word the error must hold)
HOSTILE = {
    "meta is a list": (lambda d: set_in(d, "meta", [1, 2]), "meta"),
    "a count of 10**30": (lambda d: per0(d)["expert_counts"][0].__setitem__(0, 10 ** 30), "expert_counts"),
    "top_k is Infinity": (lambda d: set_in(gate0(d), "top_k", float("inf")), "top_k"),
    "a 5000-digit integer": (lambda d: "BIG", "top_k"),
    "nesting 100,000 deep": (raw("[" * 100_000 + "]" * 100_000), "nested deeper"),
    "all-zero expert counts": (lambda d: [row.__setitem__(slice(None), [0] * len(row))
                                          for row in per0(d)["expert_counts"]], "no expert assignment"),
    "zero windows": (lambda d: set_in(gate0(d), "per_window", {k: [] for k in per0(d)}), "expert_counts"),
    "fewer windows than a baseline needs": (lambda d: set_in(gate0(d), "per_window",
                                                              {k: v[:3] for k, v in per0(d).items()}), "at least"),
    "num_experts a string": (lambda d: set_in(gate0(d), "num_experts", "4"), "num_experts"),
    "num_experts huge": (lambda d: set_in(gate0(d), "num_experts", 10 ** 9), "num_experts"),
    "a row shorter than num_experts": (lambda d: per0(d)["expert_counts"][2].pop(), "expert_counts[2]"),
    "strings among the counts": (lambda d: per0(d)["expert_counts"][1].__setitem__(0, "7"), "expert_counts"),
    "a negative count": (lambda d: per0(d)["expert_counts"][1].__setitem__(0, -3), "expert_counts"),
    "a series one value short": (lambda d: per0(d)["logit_std"].pop(), "logit_std"),
    "tokens missing": (lambda d: per0(d).pop("tokens"), "tokens"),
    "tokens of zero": (lambda d: per0(d)["tokens"].__setitem__(0, 0), "tokens"),
    "a fractional token count": (lambda d: per0(d)["tokens"].__setitem__(0, 2.5), "tokens"),
    "a gate twice": (lambda d: d["gates"].append(copy.deepcopy(gate0(d))), "twice"),
    "a gate that is a number": (lambda d: d["gates"].append(5), "gates[2]"),
    "gates an object": (lambda d: set_in(d, "gates", {"a": 1}), "gates"),
    "no gates": (lambda d: set_in(d, "gates", []), "gates"),
    "model_name a list": (lambda d: set_in(d, "model_name", ["x"]), "model_name"),
    "version true": (lambda d: set_in(d, "version", True), "version"),
    "per_window a list": (lambda d: set_in(gate0(d), "per_window", [1, 2, 3]), "per_window"),
    "a duplicate key": (lambda d: "DUP", "duplicate key"),
    "NaN tokens": (lambda d: "NAN", "tokens"),
}


def hostile_text(good: dict, name: str) -> str:
    make, _ = HOSTILE[name]
    data = copy.deepcopy(good)
    out = make(data)
    if isinstance(out, str) and out not in ("BIG", "DUP", "NAN"):
        return out
    text = json.dumps(data)
    if out == "BIG":
        return text.replace('"top_k": 2', '"top_k": ' + "9" * 5000, 1)
    if out == "DUP":
        return text.replace('"top_k": 2', '"top_k": 2, "top_k": 2', 1)
    if out == "NAN":
        tokens = json.dumps(per0(data)["tokens"])
        return text.replace(tokens, "[NaN" + tokens[tokens.index(","):], 1)
    return text


@pytest.mark.parametrize("name", list(HOSTILE))
def test_every_bad_baseline_is_one_error_naming_file_and_field(good, name, tmp_path, capsys):
    path = tmp_path / "hostile.json"
    path.write_text(hostile_text(good, name))
    word = HOSTILE[name][1]
    with pytest.raises(BaselineError) as caught:
        Baseline.load(path)
    message = str(caught.value)
    assert str(path) in message and word in message, message
    # attach: the same error, and the model is left as it was
    model = ToyMoE()
    with pytest.raises(BaselineError, match="hostile.json"):
        moewatch.attach(model, gates="routers.*", top_k=2, background=False, baseline=str(path))
    assert no_hooks(model)
    # the command: exit 2, one line
    assert main(["baseline", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err, err


def test_the_good_file_still_loads(good, tmp_path):
    path = tmp_path / "good.json"
    path.write_text(json.dumps(good))
    base = Baseline.load(path)
    assert list(base.gates) == list(GATES) and base.gates["routers.g0"].windows == 12


def test_a_baseline_built_in_code_is_held_to_the_same_rules(good, tmp_path):
    path = tmp_path / "good.json"
    path.write_text(json.dumps(good))
    base = Baseline.load(path)
    few = base.gates["routers.g0"]
    base.gates["routers.g0"] = GateBaseline(few.name, few.num_experts, few.top_k, few.family,
                                            {k: v[:3] for k, v in few.series.items()}, few.expert_counts[:3])
    model = ToyMoE()
    with pytest.raises(BaselineError, match="at least 8"):
        moewatch.attach(model, gates="routers.*", top_k=2, background=False, baseline=base)
    assert no_hooks(model)


def test_files_that_are_not_regular_files_are_refused_without_hanging(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    done = {}

    def load(path):
        try:
            Baseline.load(path)
        except BaselineError as error:
            done[path] = str(error)

    for path in (str(fifo), "/dev/zero", str(tmp_path)):
        worker = threading.Thread(target=load, args=(path,), daemon=True)
        worker.start()
        worker.join(10)
        assert not worker.is_alive(), f"Baseline.load({path!r}) hangs"
        assert path in done, path
    assert "regular file" in done[str(fifo)] and "regular file" in done["/dev/zero"]


def big_baseline_text(windows: int, gates: int = 1, experts: int = 4) -> str:
    """A well-formed baseline file of ``gates`` x ``windows`` x ``experts``, written as text
    (fast) the way Baseline.save lays it out."""
    row = "[" + ", ".join(["25"] * experts) + "]"
    series = lambda value: "[" + ", ".join([value] * windows) + "]"  # noqa: E731
    per = ('{"tokens": %s, "assignments": %s, "dropped": %s, "entropy_mean": %s, "logit_std": %s, '
           '"top1_prob_mean": %s, "nonfinite_logits": %s, "expert_counts": [%s]}'
           % (series("50"), series(str(25 * experts)), series("0"), series("0.6931"), series("1.25"),
              series("0.5"), series("0"), ", ".join([row] * windows)))
    gate = ('{"name": "routers.g%d", "num_experts": %d, "top_k": 2, "family": "custom", "windows": %d, '
            '"per_window": %s}')
    body = ", ".join(gate % (g, experts, windows, per) for g in range(gates))
    return '{"format": "moewatch-baseline", "version": 1, "model_name": "x", "meta": {}, "gates": [%s]}' % body


def test_baseline_memory_is_bounded(tmp_path):
    """The issue's case: a 46 MiB baseline of 1.2 million windows took 0.8 GB to load, then
    attach asked for 23.8 GiB. Now it is refused before its arrays exist; a file of the
    largest allowed shape loads, and attaches, in bounded memory."""
    huge = tmp_path / "huge.json"
    huge.write_text(big_baseline_text(1_200_000))
    assert 40 * 2 ** 20 < huge.stat().st_size < MAX_FILE_BYTES
    widest = tmp_path / "widest.json"  # the most windows a gate may have, on both gates of ToyMoE
    widest.write_text(big_baseline_text(MAX_WINDOWS, gates=2))
    cells = tmp_path / "cells.json"  # the most window x expert counts a file may hold
    cells.write_text(big_baseline_text(2048, gates=MAX_CELLS // (2048 * 256), experts=256))
    over = tmp_path / "over.json"
    over.write_text(big_baseline_text(2049, gates=MAX_CELLS // (2048 * 256), experts=256))
    numbers = tmp_path / "numbers.json"  # as many numbers as fit in the largest file allowed
    row = "[" + ", ".join(["1"] * 4096) + "]"
    rows = ", ".join([row] * ((MAX_FILE_BYTES - 1000) // (len(row) + 2)))
    numbers.write_text('{"format": "moewatch-baseline", "version": 1, "gates": [{"name": "g", "num_experts": 4096, '
                       '"top_k": 1, "per_window": {"expert_counts": [%s]}}]}' % rows)
    attach = ("from reliability_helpers import ToyMoE\n"
              f"moewatch.attach(ToyMoE(), gates='routers.*', top_k=2, background=False, baseline={str(widest)!r}).detach()")
    load_huge, load_widest, attach_widest, load_cells, load_over, load_numbers = measure([
        f"moewatch.Baseline.load({str(huge)!r})",
        f"moewatch.Baseline.load({str(widest)!r})",
        "import sys; sys.path.insert(0, 'tests/reliability')\n" + attach,
        f"moewatch.Baseline.load({str(cells)!r})",
        f"moewatch.Baseline.load({str(over)!r})",
        f"moewatch.Baseline.load({str(numbers)!r})",
    ], timeout=600)
    assert load_huge["error"][0] == "BaselineError" and "numbers" in load_huge["error"][1], load_huge
    assert load_huge["peak_mib"] < 256, load_huge
    assert load_widest["error"] is None and load_widest["peak_mib"] < 64, load_widest
    assert attach_widest["error"] is None and attach_widest["peak_mib"] < 1024, attach_widest
    assert load_cells["error"] is None and load_cells["peak_mib"] < 400, load_cells
    assert load_over["error"][0] == "BaselineError" and "8,388,608" in load_over["error"][1], load_over
    assert load_over["peak_mib"] < 400, load_over
    assert load_numbers["error"][0] == "BaselineError" and "numbers in lists" in load_numbers["error"][1], load_numbers
    assert load_numbers["peak_mib"] < 400, load_numbers


def test_save_never_writes_through_a_planted_link(tmp_path, good):
    """A link planted at <path>.tmp, or at <path> itself, is never written through: the file
    is written under a fresh exclusive name and renamed over <path>."""
    path = tmp_path / "baseline.json"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, f"{path}.tmp")
    source = tmp_path / "good.json"
    source.write_text(json.dumps(good))
    base = Baseline.load(source)
    base.save(path)
    assert victim.read_text() == "precious"
    assert os.path.islink(f"{path}.tmp") and os.readlink(f"{path}.tmp") == str(victim)
    assert Baseline.load(path).gates.keys() == base.gates.keys()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    # a link at the path itself is replaced, its target left alone
    os.unlink(path)
    os.symlink(victim, path)
    base.save(path)
    assert victim.read_text() == "precious" and not os.path.islink(path)
    assert Baseline.load(path).model_name == base.model_name
    assert sorted(os.listdir(tmp_path)) == sorted(["baseline.json", "baseline.json.tmp", "victim.txt", "good.json"])
    # a failed save leaves nothing behind
    with pytest.raises(OSError):
        base.save(tmp_path / "missing-dir" / "b.json")
    assert sorted(os.listdir(tmp_path)) == sorted(["baseline.json", "baseline.json.tmp", "victim.txt", "good.json"])


def test_a_baseline_past_the_limits_is_not_built(good, tmp_path):
    """What save could write but load would refuse is refused when it is built."""
    from moewatch.windows import WINDOW_COLUMNS
    import pandas as pd

    rows = [{c: 0 for c in WINDOW_COLUMNS} | {"window": w, "gate": "g", "num_experts": 2, "top_k": 1,
                                              "tokens": 5, "assignments": 5, "expert_counts": np.array([3, 2])}
            for w in range(MAX_WINDOWS + 1)]
    with pytest.raises(BaselineError, match="at most 4,096"):
        Baseline.from_frame(pd.DataFrame(rows))
    assert MIN_WINDOWS <= MAX_WINDOWS
