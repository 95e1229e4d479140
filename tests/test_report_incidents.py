"""`moewatch report` on a dump with three incidents at one gate (a real tiny Mixtral, faults
injected and removed): each incident is examined in its own window, reasons and experts from the
same window, bands printed with the digits that tell their edges apart, and plots over time
with the incidents and the baseline band in the legend, narrow bands visible."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import moewatch
from moewatch import faults
from moewatch.cli import main
from moewatch.dump import read_dump
from moewatch.report import baseline_band, band_digits, band_text, expert_findings, gate_summaries, incidents, summary_text
from tests.conftest import tiny_mixtral, until_first_verdict

GATE = "model.layers.1.mlp.gate"


WARM = []  # windows the monitor took to its first verdict


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    model = tiny_mixtral(seed=0)
    gen = torch.Generator().manual_seed(0)

    def window(mon):
        with torch.no_grad():
            model(torch.randint(0, 128, (4, 32), generator=gen))
        return mon.flush()

    with moewatch.attach(model, background=False, model_name="tiny") as recorder:
        for _ in range(12):
            window(recorder)
        baseline = recorder.baseline()
    mon = moewatch.attach(model, baseline=baseline, background=False, model_name="tiny")
    WARM.append(until_first_verdict(lambda: window(mon)))
    for fault in (lambda: faults.two_expert_collapse(model, experts=(0, 1), gates=[GATE]),
                  lambda: faults.dead_expert(model, expert=3, gates=[GATE]),
                  lambda: faults.saturate(model, scale=8.0, gates=[GATE])):
        for _ in range(2):
            window(mon)
        with fault():
            for _ in range(2):
                window(mon)
    for _ in range(2):
        window(mon)
    path = mon.dump(str(tmp_path_factory.mktemp("dump") / "three.parquet"))
    mon.detach()
    return read_dump(path)


def test_every_incident_is_examined(dump):
    runs = incidents(dump, GATE)
    w = WARM[0]  # windows before the first verdict
    assert [r.windows for r in runs] == [[w + 2, w + 3], [w + 6, w + 7], [w + 10, w + 11]]
    assert all(r.severity == "collapse" for r in runs)
    text = summary_text(dump)
    assert f"{GATE}: 3 incident(s), worst collapse" in text
    for n, run in enumerate(runs, start=1):
        assert f"incident {n}: windows {run.windows[0]}-{run.windows[-1]} (" in text


def test_reasons_and_experts_come_from_the_examined_window(dump):
    timeline = {e["window"]: e for e in dump.timeline}
    text = summary_text(dump)
    block = text.split("Worst experts")[1].split("Against the baseline")[0]
    parts = re.split(r"\n    incident \d+: ", block)[1:]
    runs = incidents(dump, GATE)
    assert len(parts) == 3
    for part, run in zip(parts, runs):
        examined = int(re.search(r"examined in window (\d+):", part).group(1))
        assert examined == run.worst_window and examined in run.windows
        frame = dump.windows[(dump.windows["gate"] == GATE) & (dump.windows["window"].isin(run.windows))]
        fewest = int(frame.sort_values(["effective_experts", "window"]).iloc[0]["window"])
        assert examined == fewest  # both windows collapse: the one with fewer effective experts
        reasons = [line.split("reason: ", 1)[1] for line in part.splitlines() if "reason: " in line]
        assert reasons == timeline[examined]["gates"][GATE]["reasons"][:3]
        for line in expert_findings(dump, GATE, examined):
            assert line in part
    # the first incident is the two-expert collapse: its reasons name experts 0 and 1, not the
    # saturation of the last incident (the report once took the last flagged window's reasons)
    assert "experts 0,1 take" in parts[0] and "router-logit std" not in parts[0]
    assert "router-logit std" in parts[2]
    summary = next(g for g in gate_summaries(dump) if g.name == GATE)
    assert summary.reasons == timeline[summary.worst_window]["gates"][GATE]["reasons"]


def test_bands_print_with_the_digits_that_tell_their_edges_apart(dump):
    assert band_text(2.0712, 2.0748) == "2.071-2.075"
    assert band_text(2.07, 2.07).endswith("in every baseline window")
    assert band_digits(7.9412, 7.99, 7.9387) == 4  # a value just outside prints unlike the edge
    text = summary_text(dump)
    bands = re.findall(r"5-95% ([-0-9.e+]+)-([0-9.e+]+)\)", text)
    assert bands and all(lo != hi for lo, hi in bands)
    for line in text.split("Against the baseline")[1].splitlines():
        m = re.search(r" ([-0-9.e+]+) \(baseline median [^,]+, 5-95% ([-0-9.e+]+)-([0-9.e+]+)\)", line)
        if m:
            value, lo, hi = m.groups()
            assert value not in (lo, hi), line  # outside the band, and printed so


def _legend_texts(fig):
    return [t.get_text() for legend in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
            for t in legend.get_texts()]


def test_plots_run_over_time_with_incidents_and_band_in_the_legend(dump):
    from matplotlib import dates

    from moewatch.report_plots import MIN_BAND_FRACTION, load_figure, stats_figure

    fig = stats_figure(dump, [GATE, "model.layers.0.mlp.gate"], [("logit_std", "router-logit std")])
    ax = fig.axes[0]
    assert ax.get_title() == GATE and fig.axes[1].get_xlabel() == "time (UTC)"
    rows = dump.windows[dump.windows["gate"] == GATE].sort_values("window")
    line = ax.get_lines()[0]
    expected = dates.date2num(rows["t_end"].astype("datetime64[s]").dt.tz_localize("UTC").dt.to_pydatetime())
    np.testing.assert_allclose(line.get_xdata(), expected, atol=1 / 86400)
    texts = _legend_texts(fig)
    assert {"baseline 5-95%", "baseline median", "collapse (incident)"} <= set(texts)
    # the incident shading spans the incidents' own times
    spans = [p for p in ax.patches if p.get_label() != "baseline 5-95%"]
    assert len(spans) == 3
    # the band is visible however narrow: at least MIN_BAND_FRACTION of the panel's data range
    band = next(p for p in ax.patches if p.get_label() == "baseline 5-95%")
    low, high = band.get_bbox().y0, band.get_bbox().y1
    values = rows["logit_std"].to_numpy(dtype=float)
    assert high - low >= 0.999 * MIN_BAND_FRACTION * (values.max() - values.min())
    q05, _, q95 = baseline_band(dump.baseline, GATE, "logit_std")
    assert q95 - q05 < high - low  # this band was too narrow to see: widened around its median
    heat = load_figure(dump, GATE)
    assert heat.axes[0].get_xlabel() == "time (UTC)" and "collapse (incident)" in _legend_texts(heat)


def test_report_command_writes_the_plots(dump, tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["report", dump.path, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 incident(s)" in text and "load_model.layers.1.mlp.gate.png" in text
