"""Baselines: statistics with known answers, the file format, and the errors that name what differs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import moewatch
from moewatch.baseline import MIN_WINDOWS, Baseline, BaselineError
from moewatch.cli import main as cli_main
from tests.conftest import tiny_mixtral
from tests.detector_sim import HealthyTraffic, make_gates, make_window
from moewatch.windows import windows_frame


def _known_frame():
    """Two gates, 10 windows; gate 0 alternates two known count vectors."""
    gates = make_gates(2, 4, top_k=1)
    a, b = np.array([30, 10, 0, 0]), np.array([10, 30, 0, 0])
    windows = []
    for w in range(10):
        counts = np.stack([a if w % 2 == 0 else b, np.array([10, 10, 10, 10])])
        windows.append(make_window(w, counts, np.array([40.0, 40.0]), entropy=np.array([0.5, 1.0]),
                                   logit_std=np.array([1.0 + w, 2.0]), top1=np.array([0.6, 0.3]),
                                   dropped=np.stack([np.array([w % 3, 0, 0, 0]), np.zeros(4, int)])))
    return windows_frame(windows, gates)


def test_summary_statistics_have_known_answers():
    base = Baseline.from_frame(_known_frame())
    g0, g1 = base.gates["layers.0.gate"], base.gates["layers.1.gate"]
    assert g0.windows == 10 and g0.num_experts == 4 and g0.top_k == 1
    s0 = g0.summary()
    assert s0["expert_share"] == pytest.approx([0.5, 0.5, 0.0, 0.0])
    # shares alternate 0.75 / 0.25: sample std over 10 windows = 0.25 * sqrt(10 / 9)
    assert s0["expert_share_std"][0] == pytest.approx(0.25 * np.sqrt(10 / 9))
    assert s0["quantiles"]["top_share"]["q50"] == pytest.approx(0.75)
    assert s0["quantiles"]["logit_std"]["q50"] == pytest.approx(5.5)  # median of 1..10
    assert s0["quantiles"]["drop_rate"]["q99"] == pytest.approx(2 / 40, rel=0.05)
    s1 = g1.summary()
    assert s1["expert_share_std"] == pytest.approx([0, 0, 0, 0])
    assert s1["quantiles"]["effective_experts"]["q50"] == pytest.approx(4.0)
    assert s1["tokens_total"] == 400


def test_round_trip_is_exact_and_readable(tmp_path):
    base = Baseline.from_frame(_known_frame(), model_name="tiny")
    path = tmp_path / "b.json"
    base.save(path)
    text = path.read_text()
    data = json.loads(text)
    assert data["format"] == "moewatch-baseline" and data["version"] == 1
    assert "\n      \"per_window\": {" in text and len(text.splitlines()) < 200  # indented, lists kept on a line
    back = Baseline.load(path)
    assert back.model_name == "tiny" and list(back.gates) == list(base.gates)
    for name, gate in base.gates.items():
        other = back.gates[name]
        np.testing.assert_array_equal(other.expert_counts, gate.expert_counts)
        for key, values in gate.series.items():
            np.testing.assert_allclose(other.series[key], values)
        assert other.summary() == gate.summary()


@pytest.mark.parametrize("content, words", [
    ("{\"format\": \"moewatch-baseline\", \"vers", "not valid JSON"),
    ("{\"hello\": 1}", "not a moewatch baseline"),
    ("{\"format\": \"moewatch-baseline\", \"version\": 99, \"gates\": []}", "version 99"),
    ("{\"format\": \"moewatch-baseline\", \"version\": 1, \"gates\": [{\"name\": \"g\"}]}", "corrupt"),
])
def test_bad_files_raise_clear_errors(tmp_path, content, words):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(BaselineError, match=words):
        Baseline.load(path)


def test_truncated_series_is_named(tmp_path):
    base = Baseline.from_frame(_known_frame())
    data = base.to_dict()
    data["gates"][0]["per_window"]["logit_std"].pop()
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BaselineError, match="logit_std"):
        Baseline.load(path)


def test_too_few_windows_is_refused():
    sim = HealthyTraffic(2, 8)
    with pytest.raises(BaselineError, match=f"at least {MIN_WINDOWS}"):
        Baseline.from_frame(sim.frame(MIN_WINDOWS - 1))


def _record(model, windows=10):
    gen = torch.Generator().manual_seed(0)
    with moewatch.attach(model, background=False) as mon:
        for _ in range(windows):
            with torch.no_grad():
                model(torch.randint(0, 128, (2, 32), generator=gen))
            mon.flush()
        return mon.baseline()


def test_mon_baseline_and_attach_with_path(tmp_path, one_thread):
    model = tiny_mixtral()
    base = _record(model)
    assert set(base.gates) == {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate"}
    gate = base.gates["model.layers.0.mlp.gate"]
    assert gate.windows == 10 and gate.expert_counts.sum() == 10 * 64 * 2
    path = tmp_path / "b.json"
    base.save(path)
    with moewatch.attach(model, baseline=str(path), background=False) as mon:
        with torch.no_grad():
            model(torch.randint(0, 128, (2, 32)))
        health = mon.flush()
    assert health.has_baseline and health.detector


def test_mismatched_baseline_names_what_differs(one_thread):
    base = _record(tiny_mixtral())
    with pytest.raises(BaselineError) as info:
        moewatch.attach(tiny_mixtral(experts=4), baseline=base)
    assert "'model.layers.0.mlp.gate' has 4 experts, the baseline 8" in str(info.value)
    with pytest.raises(BaselineError) as info:
        moewatch.attach(tiny_mixtral(layers=3), baseline=base)
    assert "gates in the model but not in the baseline: 'model.layers.2.mlp.gate'" in str(info.value)
    with pytest.raises(BaselineError, match="top-1, the baseline top-2"):
        moewatch.attach(tiny_mixtral(top_k=1), baseline=base)


def test_cli_builds_a_baseline_from_a_parquet_dump(tmp_path, capsys):
    model = tiny_mixtral()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    with moewatch.attach(model, background=False) as mon:
        for _ in range(12):
            with torch.no_grad():
                model(ids)
            mon.flush()
        frame = mon.windows()
        dump = mon.dump(str(tmp_path / "dump.parquet"))
    out = tmp_path / "baseline.json"
    assert cli_main(["baseline", "build", str(dump), "-o", str(out)]) == 0
    base = Baseline.load(out)
    gate0, gate1 = "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"
    assert base.gates[gate1].windows == 12
    np.testing.assert_array_equal(base.gates[gate0].expert_counts,
                                  np.stack(frame[frame["gate"] == gate0]["expert_counts"].to_list()))
    foreign = tmp_path / "foreign.parquet"
    frame.drop(columns=[c for c in frame.columns if c.startswith("expert_")]).to_parquet(foreign)
    assert cli_main(["baseline", "build", str(foreign), "-o", str(tmp_path / "x.json")]) == 2  # bad input
    assert "moewatch baseline build:" in capsys.readouterr().err
    assert cli_main(["baseline", "show", str(out)]) == 0
    assert "model.layers.1.mlp.gate: 8 experts top-2, 12 windows" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{")
    assert cli_main(["baseline", "show", str(tmp_path / "bad.json")]) == 2
