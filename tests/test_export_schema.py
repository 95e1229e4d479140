"""The metric schema: naming conventions, the generated docs table, and that exporters use only it."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import moewatch
from moewatch import schema
from moewatch.export.samples import WINDOW_GAUGES, admitted_expert_families
from moewatch.windows import WINDOW_COLUMNS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_names_follow_prometheus_conventions():
    names = [m.name for m in schema.METRICS]
    assert len(names) == len(set(names))
    for m in schema.METRICS:
        assert re.fullmatch(r"moewatch_[a-z0-9_]+", m.name), m.name
        assert m.type in ("counter", "gauge")
        assert m.name.endswith("_total") == (m.type == "counter"), m.name
        assert "percent" not in m.name
        assert m.labels[:2] == ("model", "rank"), m.name
        assert m.unit in schema.OTEL_UNITS, m.unit
        assert m.help.strip()
        if m.level == "expert":
            assert m.labels[-2:] == ("layer", "expert")


def test_every_per_gate_signal_of_the_issue_is_listed():
    required = ["gate_tokens_total", "gate_dropped_assignments_total", "gate_effective_experts",
                "gate_top_share_ratio", "gate_routing_entropy_nats", "gate_load_entropy_nats",
                "gate_logit_std", "gate_logit_std_baseline_ratio", "gate_top1_probability",
                "gate_dead_experts", "gate_check_severity", "expert_assignments_total",
                "expert_load_share_ratio", "up", "build_info", "internal_errors_total",
                "last_window_timestamp_seconds"]
    for name in required:
        assert schema.metric(name).name == "moewatch_" + name
    # Window gauges read real columns of Monitor.windows().
    assert set(WINDOW_GAUGES.values()) <= set(WINDOW_COLUMNS)
    assert all(schema.metric(n).level == "gate" for n in WINDOW_GAUGES)


def test_docs_metrics_md_is_generated_from_the_schema():
    generated = subprocess.run([sys.executable, "-m", "moewatch.schema"], capture_output=True, text=True,
                               check=True).stdout
    with open(os.path.join(ROOT, "docs", "metrics.md")) as fh:
        committed = fh.read()
    assert committed == generated, "docs/metrics.md is stale: run `python -m moewatch.schema > docs/metrics.md`"
    for m in schema.METRICS:
        assert f"`{m.name}`" in committed


def test_series_budget_admits_families_in_order():
    assert admitted_expert_families([8, 8], budget=16) == ["moewatch_expert_assignments_total"]
    assert admitted_expert_families([8, 8], budget=15) == []
    assert admitted_expert_families([8] * 2) == list(schema.EXPERT_FAMILIES)
    # ~10k by default: 256 experts x 60 layers is over budget, 64 x 48 (two families) fits.
    assert admitted_expert_families([256] * 60) == []
    assert len(admitted_expert_families([64] * 48)) == 2


def test_unknown_metric_is_a_clear_error():
    try:
        schema.metric("moewatch_no_such_thing")
    except KeyError as error:
        assert "not a moewatch metric" in str(error)
    else:
        raise AssertionError("expected KeyError")
    assert moewatch.__version__


def test_rank_comes_from_the_option_torch_distributed_or_the_environment(monkeypatch, tmp_path):
    import torch.distributed as dist

    from moewatch.export.rank import process_rank
    from moewatch.options import Options

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert (process_rank(Options()).rank, process_rank(Options()).local_rank) == (0, 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert (process_rank(Options()).rank, process_rank(Options()).local_rank) == (3, 3)
    monkeypatch.setenv("RANK", "11")
    assert (process_rank(Options()).rank, process_rank(Options()).local_rank) == (11, 3)
    assert process_rank(Options(rank=5)).rank == 5
    # An initialised process group is asked first (world of one: rank 0 although RANK says 11).
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert process_rank(Options()).rank == 0
        assert process_rank(Options(rank=5)).rank == 5
    finally:
        dist.destroy_process_group()
