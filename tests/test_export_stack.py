"""A real Prometheus scrapes monitored models running in child processes (two ranks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from export_helpers import ROOT, free_ports, load_local_stack, start_stack

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "export_child.py")


@pytest.fixture(scope="module")
def ranks(request):
    """Two monitored processes (RANK 0 and 1, one host) and what each reported."""
    base = free_ports(2)
    children = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        child = subprocess.Popen([sys.executable, CHILD, str(rank + 1), str(base)], env=env, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        children.append(child)

    def stop():
        for child in children:  # nothing to save in them: stop at once
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            child.stdin.close()
            child.stdout.close()

    request.addfinalizer(stop)
    reports = []
    for child in children:
        line = child.stdout.readline()
        assert line, f"child exited with {child.wait()} before reporting"
        reports.append(json.loads(line))
    assert [r["port"] for r in reports] == [base, base + 1]  # base port + LOCAL_RANK
    return reports


@pytest.fixture(scope="module")
def prometheus(request, ranks):
    stack = start_stack(request, alertmanager=False)
    stack.set_targets([f"127.0.0.1:{r['port']}" for r in ranks])
    stack.wait_query("count(moewatch_up == 1)", lambda r: r and r[0]["value"][1] == "2")
    return stack


def by_labels(result, *keys):
    return {tuple(s["metric"][k] for k in keys): float(s["value"][1]) for s in result}


def test_promql_returns_exactly_the_counts_of_each_child(prometheus, ranks):
    expected = {(r["rank"], gate, str(e)): float(c)
                for r in ranks for gate, counts in r["counts"].items() for e, c in enumerate(counts)}
    result = prometheus.wait_query("moewatch_expert_assignments_total",
                                   lambda res: by_labels(res, "rank", "layer", "expert") == expected)
    assert len(result) == 2 * 2 * 8
    assert {s["metric"]["model"] for s in result} == {"tiny-mixtral"}


def test_prometheus_sums_over_ranks(prometheus, ranks):
    expected = {}
    for r in ranks:
        for gate, counts in r["counts"].items():
            for e, c in enumerate(counts):
                expected[(gate, str(e))] = expected.get((gate, str(e)), 0.0) + c
    result = prometheus.wait_query("sum by (layer, expert) (moewatch_expert_assignments_total)",
                                   lambda res: by_labels(res, "layer", "expert") == expected)
    assert len(result) == 16
    tokens = by_labels(prometheus.query("sum by (rank) (moewatch_gate_tokens_total)"), "rank")
    assert tokens == {(r["rank"],): sum(sum(c) for c in r["counts"].values()) / 2 for r in ranks}
    # Every target scraped cleanly.
    assert sorted(t["health"] for t in prometheus.targets()) == ["up", "up"]


def test_example_configs_are_valid():
    local_stack = load_local_stack()
    try:
        tools = local_stack.ensure_installed()
    except local_stack.StackUnavailable as why:
        pytest.skip(str(why))
    exporters = os.path.join(ROOT, "exporters")
    checks = [[tools["promtool"], "check", "config", os.path.join(exporters, "prometheus.yml")],
              [tools["amtool"], "check-config", os.path.join(exporters, "alertmanager.yml")]]
    for argv in checks:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    yaml = pytest.importorskip("yaml")
    with open(os.path.join(exporters, "otel-collector.yaml")) as fh:
        collector = yaml.safe_load(fh)
    pipeline = collector["service"]["pipelines"]["metrics"]
    assert pipeline["receivers"] == ["otlp"]
    assert all(name in collector["exporters"] for name in pipeline["exporters"])
    assert all(name in collector["processors"] for name in pipeline["processors"])


def test_local_stack_stops_its_servers(request):
    stack = start_stack(request)
    processes = list(stack._processes.values())
    assert stack.query("vector(1)")[0]["value"][1] == "1"
    assert stack.alerts() == []
    stack.stop()
    assert all(p.poll() is not None for p in processes)
    assert not os.path.exists(stack.workdir)


def test_free_ports_are_never_handed_out_twice_even_when_another_thread_seeds_random():
    """A seeded training run (``transformers.set_seed``) resets the ``random`` module; two
    engines whose ports were picked right after such a reset got the same one, and the second
    failed to start ("Address already in use")."""
    import random

    picked, state = [], random.getstate()
    try:
        for _ in range(20):
            random.seed(0)
            picked.append(free_ports(2))
    finally:
        random.setstate(state)
    ports = [base + offset for base in picked for offset in range(2)]
    assert len(set(ports)) == len(ports)
