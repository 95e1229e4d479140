"""Baselines from incident dumps leave the flagged windows out and keep the model name; a dump
passed for a baseline says so; a baseline of another model warns."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import moewatch
from moewatch import faults
from moewatch.baseline import Baseline, BaselineError
from moewatch.baseline_build import baseline_from_dump, flagged_rows
from moewatch.cli import main as cli_main
from moewatch.detector import same_model
from moewatch.dump import dump_table, read_dump, write_table_atomic
from tests.conftest import tiny_mixtral

COLLAPSING = "model.layers.1.mlp.gate"


def _windows(model, mon, n, gen):
    for _ in range(n):
        with torch.no_grad():
            model(torch.randint(0, 128, (4, 32), generator=gen))
        mon.flush()


@pytest.fixture(scope="module")
def incident(tmp_path_factory):
    """12 healthy windows, then 3 with a two-expert collapse at layer 1, dumped."""
    folder = tmp_path_factory.mktemp("incident")
    model = tiny_mixtral(seed=0)
    gen = torch.Generator().manual_seed(0)
    with moewatch.attach(model, background=False, model_name="tiny-moe") as recorder:
        _windows(model, recorder, 10, gen)
        baseline = recorder.baseline()
    mon = moewatch.attach(model, baseline=baseline, background=False, model_name="tiny-moe")
    _windows(model, mon, 12, gen)
    with faults.two_expert_collapse(model, experts=(0, 1), gates=[COLLAPSING]):
        _windows(model, mon, 3, gen)
    path = mon.dump(str(folder / "incident.parquet"))
    mon.detach()
    return path


def test_flagged_windows_are_left_out_and_named(incident, tmp_path, capsys):
    dump = read_dump(incident)
    flagged = flagged_rows(dump)
    collapsed = sorted(w for (w, gate), why in flagged.items() if gate == COLLAPSING and why == "collapse")
    assert len(collapsed) >= 2, flagged  # the injected collapse is in the timeline
    out = tmp_path / "b.json"
    assert cli_main(["baseline", "build", incident, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"left out {len(flagged)} gate-window(s) the dump flagged" in printed
    assert f"{COLLAPSING}: " in printed and "collapse" in printed and "--keep-flagged" in printed
    base = Baseline.load(out)
    assert base.model_name == "tiny-moe"  # the dump's model name, not ""
    frame = dump.windows
    for gate, g in base.gates.items():
        kept = [w for w in frame[frame["gate"] == gate]["window"] if (int(w), gate) not in flagged]
        assert g.windows == len(kept)
        expected = np.stack([c for w, c in zip(frame[frame["gate"] == gate]["window"],
                                                frame[frame["gate"] == gate]["expert_counts"])
                             if (int(w), gate) not in flagged])
        np.testing.assert_array_equal(g.expert_counts, expected)
    assert base.meta["flagged_windows_left_out"] == len(flagged)


def test_keep_flagged_keeps_them_and_model_name_can_be_overridden(incident, tmp_path, capsys):
    out = tmp_path / "all.json"
    assert cli_main(["baseline", "build", incident, "-o", str(out), "--keep-flagged", "--model-name", "other"]) == 0
    assert "left out" not in capsys.readouterr().out
    base = Baseline.load(out)
    frame = read_dump(incident).windows
    assert base.model_name == "other"
    assert base.gates[COLLAPSING].windows == int((frame["gate"] == COLLAPSING).sum())


def test_too_few_healthy_windows_says_what_was_left_out(incident, tmp_path):
    """The dump's last 9 windows (6 healthy, 3 collapsed), written back as a real dump."""
    dump = read_dump(incident)
    frame = dump.windows
    last = sorted(frame["window"].unique())[-9:]
    short = frame[frame["window"].isin(last)].reset_index(drop=True)
    meta = {k: v for k, v in dump.metadata.items() if k not in ("window_columns", "rows")}
    path = str(tmp_path / "short.parquet")
    write_table_atomic(dump_table(short, dump.decisions, meta), path)
    with pytest.raises(BaselineError, match=r"3 flagged window\(s\) were left out .*--keep-flagged"):
        baseline_from_dump(path)


def test_a_dump_where_a_baseline_goes_says_so(incident, tmp_path, capsys):
    with pytest.raises(BaselineError, match="is a moewatch dump, not a baseline: build a baseline from it"):
        Baseline.load(incident)
    with pytest.raises(BaselineError, match="is a moewatch dump, not a baseline"):
        moewatch.attach(tiny_mixtral(), baseline=incident)
    assert cli_main(["baseline", "show", incident]) == 2
    assert "moewatch dump, not a baseline" in capsys.readouterr().err
    other = tmp_path / "plain.parquet"
    read_dump(incident).windows[["window", "tokens"]].to_parquet(other)
    with pytest.raises(BaselineError, match="is a Parquet file, not a moewatch baseline"):
        Baseline.load(other)


def test_a_baseline_of_another_model_warns(incident, tmp_path):
    base, _ = baseline_from_dump(incident)
    assert base.model_name == "tiny-moe"
    model = tiny_mixtral()
    with pytest.warns(UserWarning, match="recorded on model 'tiny-moe', the monitored model is 'fine-tune'"):
        moewatch.attach(model, baseline=base, background=False, model_name="fine-tune").detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moewatch.attach(model, baseline=base, background=False, model_name="tiny-moe").detach()
    assert same_model("/models/tiny-moe/", "./tiny-moe") and same_model("", "anything")
    assert not same_model("org/model-a", "org/model-b")


def _part(incident, folder, gates, model_name=None) -> str:
    """The incident dump's rows of ``gates`` alone, written back as a real dump (a pipeline
    stage's worker dumps only the layers it holds)."""
    dump = read_dump(incident)
    frame = dump.windows
    rows = frame[frame["gate"].isin(gates)].reset_index(drop=True)
    meta = {k: v for k, v in dump.metadata.items() if k not in ("window_columns", "rows")}
    meta["gates"] = [gate for gate in meta["gates"] if gate["name"] in gates]
    if model_name is not None:
        meta["model_name"] = model_name
    path = str(folder / f"part-{'-'.join(g.split('.')[2] for g in gates)}-{model_name or 'same'}.parquet")
    write_table_atomic(dump_table(rows, dump.decisions, meta), path)
    return path


def test_the_dumps_of_a_models_parts_build_one_baseline_of_all_its_gates(incident, tmp_path, capsys):
    whole = tmp_path / "whole.json"
    assert cli_main(["baseline", "build", incident, "-o", str(whole)]) == 0
    gates = sorted(Baseline.load(whole).gates)
    assert len(gates) == 2 and COLLAPSING in gates
    parts = [_part(incident, tmp_path, [gate]) for gate in gates]
    capsys.readouterr()
    merged = tmp_path / "merged.json"
    assert cli_main(["baseline", "build", *parts, "-o", str(merged)]) == 0
    printed = capsys.readouterr().out
    assert f"{COLLAPSING}: " in printed and "collapse" in printed  # what its part's dump flagged
    expected, got = Baseline.load(whole), Baseline.load(merged)
    assert sorted(got.gates) == gates and got.model_name == "tiny-moe"
    for gate in gates:  # each gate as the whole dump gives it
        np.testing.assert_array_equal(got.gates[gate].expert_counts, expected.gates[gate].expert_counts)
    # and a stage of the model uses the whole baseline for the layers it holds
    stage = got.only([COLLAPSING, "model.layers.9.mlp.gate"])
    assert list(stage.gates) == [COLLAPSING] and stage.model_name == got.model_name


def test_parts_that_overlap_or_are_of_other_models_are_refused(incident, tmp_path, capsys):
    gate = COLLAPSING
    same = _part(incident, tmp_path, [gate])
    assert cli_main(["baseline", "build", same, same, "-o", str(tmp_path / "twice.json")]) == 2
    assert f"gate {gate!r} is in more than one of the baselines merged" in capsys.readouterr().err
    other = _part(incident, tmp_path, ["model.layers.0.mlp.gate"], model_name="another-moe")
    assert cli_main(["baseline", "build", same, other, "-o", str(tmp_path / "mixed.json")]) == 2
    assert "the baselines are of different models ('another-moe', 'tiny-moe')" in capsys.readouterr().err
    assert not (tmp_path / "twice.json").exists() and not (tmp_path / "mixed.json").exists()
