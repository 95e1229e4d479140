"""End to end: a real Prometheus loads alert_rules/, scrapes a monitored model in a child process
and sends to a real Alertmanager. An injected collapse fires MoewatchRouterCollapse there;
removing the fault resolves it.

Only the `for:` of MoewatchRouterCollapse is shortened (2m -> 2s) in a rendered copy of the rule
files (alert_rules_helpers.render_rules); every other rule is loaded as shipped.
"""
from __future__ import annotations

import glob
import os

import pytest
import yaml

from alert_rules_helpers import Child, render_rules
from export_helpers import start_stack

ALERT = "MoewatchRouterCollapse"
MODEL = "e2e-mixtral"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def collapse_alerts(alerts):
    return [a for a in alerts if a["labels"].get("alertname") == ALERT and a["labels"].get("model") == MODEL]


@pytest.fixture(scope="module")
def setup(request, tmp_path_factory):
    child = Child("--model-name", MODEL)
    request.addfinalizer(child.stop)
    rules = render_rules(str(tmp_path_factory.mktemp("rules")), {ALERT: "2s"})
    stack = start_stack(request, rule_files=rules, scrape_interval="1s", evaluation_interval="1s")
    stack.set_targets([f"127.0.0.1:{child.port}"])
    return child, stack


def test_rules_load_in_prometheus(setup):
    _, stack = setup
    from export_helpers import load_local_stack

    groups = load_local_stack()._get_json(f"{stack.prometheus_url}/api/v1/rules")["data"]["groups"]
    names = {g["name"] for g in groups}
    shipped = {g["name"] for path in glob.glob(os.path.join(ROOT, "alert_rules", "*.yml"))
               for g in (yaml.safe_load(open(path)) or {}).get("groups", [])}
    assert {"moewatch.recording", "moewatch.router", "moewatch.monitor"} <= shipped
    assert names == shipped  # every group the repository ships is loaded, none failed to parse
    assert all(rule["health"] != "err" for g in groups for rule in g["rules"]), groups


def test_injected_collapse_fires_in_alertmanager_and_resolves(setup):
    child, stack = setup
    gates = child.info["gates"]
    # Healthy traffic: both gates scraped at severity ok over several windows; nothing fires.
    stack.wait_query(f'moewatch_windows_total{{model="{MODEL}"}} > 5', lambda r: len(r) == 1)
    healthy = stack.wait_query(f'max_over_time(moewatch_gate_severity{{model="{MODEL}"}}[1h])',
                               lambda r: len(r) == len(gates))
    assert {float(s["value"][1]) for s in healthy} == {0.0}
    assert collapse_alerts(stack.alerts()) == []
    assert not [a for a in stack.prometheus_alerts() if a["labels"]["alertname"] == ALERT]

    # Fault: every gate collapses onto experts 0 and 1.
    assert child.send("collapse")["fault"] == gates
    fired = stack.wait_alerts(lambda a: len(collapse_alerts(a)) == len(gates), active="true")
    for alert in collapse_alerts(fired):
        labels, notes = alert["labels"], alert["annotations"]
        assert alert["status"]["state"] == "active"
        assert labels["severity"] == "critical"
        assert labels["rank"] == "0"
        assert labels["layer"] in gates
        assert "instance" not in labels and "job" not in labels  # same labels as moewatch's own alerts
        assert notes["runbook_url"] == "docs/runbook.md#moewatchroutercollapse"
        assert labels["layer"] in notes["summary"]
        # The template's query ran against the real Prometheus: it lists the failing checks.
        failing = stack.query(f'moewatch_gate_check_severity{{model="{MODEL}",layer="{labels["layer"]}"}} == 2')
        assert failing and all(s["metric"]["check"] in notes["description"] for s in failing)
        assert alert["generatorURL"].startswith("http")  # sent by Prometheus, not by the client
    assert sorted(a["labels"]["layer"] for a in collapse_alerts(fired)) == sorted(gates)
    # Prometheus holds it as firing too (ALERTS series, shown on the dashboard).
    firing = stack.query(f'ALERTS{{alertname="{ALERT}",alertstate="firing",model="{MODEL}"}}')
    assert len(firing) == len(gates)

    # Remove the fault: healthy windows turn the verdict back to ok and the alert resolves.
    assert child.send("heal")["fault"] == []
    stack.wait_query(f'max(moewatch_gate_severity{{model="{MODEL}"}})', lambda r: r and r[0]["value"][1] == "0")
    stack.wait_alerts(lambda a: collapse_alerts(a) == [])
    stack.wait_query(f'ALERTS{{alertname="{ALERT}",model="{MODEL}"}}', lambda r: r == [])
