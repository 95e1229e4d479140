"""The Grafana dashboard: its structure, the metric names it uses, and every panel query evaluated
(variables substituted as Grafana would) against a real Prometheus scraping a running monitor."""
from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.parse

import pytest
import yaml

from moewatch import schema

from alert_rules_helpers import (DASHBOARD, GRAFANA_DIR, RUNBOOK, Child, metric_names, recorded_names,
                                 recording_rules, render_rules, rule_texts)
from export_helpers import load_local_stack, start_stack

VARIABLES = ("datasource", "model", "layer", "rank")
# What Grafana puts in place of its built-in variables (scrape interval 1 s in these tests).
BUILTINS = {"$__rate_interval": "10s", "$__interval": "2s", "$__range": "1m"}


def load_dashboard() -> dict:
    with open(DASHBOARD) as fh:
        return json.load(fh)


def all_panels(dashboard: dict):
    """Every panel, rows' nested panels included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def query_panels(dashboard: dict):
    return [p for p in all_panels(dashboard) if p["type"] != "row"]


def dashboard_exprs(dashboard: dict):
    exprs = [t["expr"] for p in query_panels(dashboard) for t in p["targets"]]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


# -- structure -------------------------------------------------------------------------------
def test_dashboard_structure():
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = list(all_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(VARIABLES) <= set(variables)
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("model", "layer", "rank"):
        assert variables[name]["datasource"]["uid"] == "${datasource}", name
    assert variables["layer"]["includeAll"] and variables["rank"]["includeAll"]
    for panel in panels:
        pos = panel["gridPos"]
        assert all(isinstance(pos[k], int) for k in ("h", "w", "x", "y")), panel["title"]
        assert pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        assert panel["title"].strip(), panel["id"]
    for panel in query_panels(dashboard):
        title = panel["title"]
        assert panel["description"].strip(), f"{title}: no description"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel["targets"], title
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), title
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", title
            expr = target["expr"]
            assert "$model" in expr, f"{title}: {expr} ignores the model variable"
            # Rates use $__rate_interval, never a fixed range (recording rules carry their own).
            for window in re.findall(r"\(\s*[a-z_:]+\{[^}]*\}\[([^\]]+)\]", expr):
                assert window == "$__rate_interval", f"{title}: {expr}"
            if re.search(r"\b(rate|irate|increase)\(", expr):
                assert "[$__rate_interval]" in expr, f"{title}: {expr}"
    # Panels overlap nowhere.
    cells = set()
    for panel in panels:
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))


def test_the_panels_the_issue_asks_for():
    titles = {p["title"]: p for p in query_panels(load_dashboard())}
    for title in ("Gate health", "Effective experts per layer (vs baseline)", "Expert load share (layer × expert)",
                  "Routing entropy vs baseline", "Router logit std vs baseline",
                  "Top-1 probability and margin vs baseline", "Drop rate", "Firing alerts"):
        assert title in titles, title
    exprs = " ".join(t["expr"] for t in titles["Effective experts per layer (vs baseline)"]["targets"])
    assert "moewatch_gate_baseline_effective_experts" in exprs
    matrix = titles["Expert load share (layer × expert)"]["transformations"][0]
    assert matrix["id"] == "groupingToMatrix"
    assert (matrix["options"]["rowField"], matrix["options"]["columnField"]) == ("layer", "expert")
    assert "ALERTS" in titles["Firing alerts"]["targets"][0]["expr"]


def test_dashboard_metrics_are_in_the_schema_and_every_per_gate_signal_is_shown():
    exprs = dashboard_exprs(load_dashboard())
    used = set().union(*(metric_names(e) for e in exprs))
    assert sorted(used - set(schema.BY_NAME)) == [], "metrics on the dashboard but not in moewatch.schema"
    per_gate = {m.name for m in schema.METRICS if m.level in ("gate", "expert")}
    assert sorted(per_gate - used) == [], "per-gate signals of the schema missing from the dashboard"
    recorded = {r["record"] for r in recording_rules()}
    used_records = set().union(*(recorded_names(e) for e in exprs))
    assert used_records and sorted(used_records - recorded) == [], "recording rules the dashboard needs"
    # The rules too (both directions of the schema check live here and in test_alert_rules.py).
    in_rules = set().union(*(metric_names(t) for t in rule_texts()))
    assert sorted((in_rules | used) - set(schema.BY_NAME)) == []


def test_runbook_names_only_panels_that_exist():
    titles = {p["title"] for p in query_panels(load_dashboard())}
    with open(RUNBOOK) as fh:
        text = fh.read()
    # "Dashboard: *Panel*, *Other panel* ..." up to the next PromQL, bullet or paragraph.
    mentions = re.findall(r"Dashboard:(.*?)(?=PromQL|\n\s*-|\n\n)", text, flags=re.S)
    named = {m for mention in mentions for m in re.findall(r"\*([^*]+)\*", mention)}
    assert len(mentions) >= 10 and len(named) >= 10
    assert sorted(named - titles) == []


def test_provisioning_files():
    with open(os.path.join(GRAFANA_DIR, "provisioning", "datasources", "moewatch.yaml")) as fh:
        datasources = yaml.safe_load(fh)
    assert datasources["apiVersion"] == 1
    prometheus = [d for d in datasources["datasources"] if d["type"] == "prometheus"]
    assert len(prometheus) == 1 and prometheus[0]["url"].startswith("http")
    with open(os.path.join(GRAFANA_DIR, "provisioning", "dashboards", "moewatch.yaml")) as fh:
        providers = yaml.safe_load(fh)
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    # The dashboard's datasource variable selects the provisioned type.
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert variables["datasource"]["query"] == prometheus[0]["type"]


# -- every query against a real Prometheus ---------------------------------------------------
def regex_escape(value: str) -> str:
    """Grafana's escaping of a variable value inside a PromQL regex matcher."""
    return re.sub(r"([\\$^*{}\[\]'+?.()|])", r"\\\\\1", value)


def substitute(expr: str, values: dict) -> str:
    for name, value in BUILTINS.items():
        expr = expr.replace(name, value)
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def label_values(stack, definition: str, values: dict):
    """Evaluate a ``label_values(selector, label)`` variable query as Grafana does."""
    match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", definition.strip())
    assert match, definition
    selector = substitute(match.group(1), values)
    url = f"{stack.prometheus_url}/api/v1/series?" + urllib.parse.urlencode({"match[]": selector})
    series = load_local_stack()._get_json(url)["data"]
    return sorted({s[match.group(2)] for s in series if match.group(2) in s})


def evaluate(stack, expr: str, instant: bool):
    """Run ``expr`` once; a PromQL error fails at once with Prometheus's message."""
    try:
        if instant:
            return stack.query(expr)
        now = time.time()
        params = {"query": expr, "start": f"{now - 30:.3f}", "end": f"{now:.3f}", "step": "2"}
        answer = load_local_stack()._get_json(f"{stack.prometheus_url}/api/v1/query_range?"
                                              + urllib.parse.urlencode(params))
        return answer["data"]["result"]
    except urllib.error.HTTPError as error:
        pytest.fail(f"{expr}: {error.code} {error.read().decode()}")


@pytest.fixture(scope="module")
def live(request, tmp_path_factory):
    """A monitor with a baseline, a capacity factor and an expert placement, scraped by a real Prometheus loading the
    rules (the `for:` of the detector-verdict alerts shortened), with a two-expert collapse
    injected at layer 1 so that an alert fires."""
    child = Child("--model-name", "grafana-mixtral", "--baseline", "--capacity-factor", "1.25",
                  "--expert-placement", "contiguous:2")
    request.addfinalizer(child.stop)
    rules = render_rules(str(tmp_path_factory.mktemp("rules")),
                         {"MoewatchRouterCollapse": "1s", "MoewatchRoutingDrift": "1s"})
    stack = start_stack(request, rule_files=rules, scrape_interval="1s", evaluation_interval="1s")
    stack.set_targets([f"127.0.0.1:{child.port}"])
    stack.wait_query('moewatch_windows_total{model="grafana-mixtral"} > 3', lambda r: len(r) == 1)
    child.send("collapse 1")
    # Against this baseline the detector calls it drift or collapse (logit std, load): either pages.
    stack.wait_query('ALERTS{alertname=~"MoewatchRouterCollapse|MoewatchRoutingDrift",alertstate="firing",'
                     'model="grafana-mixtral",layer="model.layers.1.mlp.gate"}', lambda r: len(r) >= 1)
    return child, stack


@pytest.mark.parametrize("selection", ["first", "all"])
def test_every_panel_query_returns_data(live, selection):
    child, stack = live
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    values = {"datasource": "moewatch-prometheus"}
    for name in ("model", "layer", "rank"):  # in dependency order, as Grafana resolves them
        found = label_values(stack, variables[name]["definition"], values)
        assert found, f"variable {name}: no values"
        if selection == "all" and variables[name].get("includeAll"):
            values[name] = variables[name]["allValue"]
        elif selection == "all" and len(found) > 1:
            values[name] = "(" + "|".join(regex_escape(v) for v in found) + ")"
        else:
            values[name] = regex_escape(found[0])
    assert label_values(stack, variables["layer"]["definition"], values) == sorted(child.info["gates"])
    checked = 0
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            expr = substitute(target["expr"], values)
            instant = target.get("instant", False)
            evaluate(stack, expr, instant)  # valid PromQL, or fail now with the error
            result = stack.wait_query(expr, lambda r: len(r) > 0, timeout=60) if instant else \
                _wait_range(stack, expr)
            assert result, f"{panel['title']} / {target['refId']}: no data for {expr}"
            checked += 1
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            assert stack.query(substitute(annotation["expr"], values))
    assert checked == sum(len(p["targets"]) for p in query_panels(dashboard))


def _wait_range(stack, expr):
    from export_helpers import wait_for

    return wait_for(lambda: evaluate(stack, expr, instant=False), timeout=60, interval=0.5)


def test_firing_alert_is_shown(live):
    _, stack = live
    panel = next(p for p in query_panels(load_dashboard()) if p["title"] == "Firing alerts")
    expr = substitute(panel["targets"][0]["expr"], {"model": "grafana-mixtral", "layer": ".*", "rank": ".*",
                                                    "datasource": "x"})
    rows = stack.query(expr)
    shown = {(r["metric"]["alertname"], r["metric"]["layer"]) for r in rows}
    assert shown & {("MoewatchRouterCollapse", "model.layers.1.mlp.gate"),
                    ("MoewatchRoutingDrift", "model.layers.1.mlp.gate")}, rows
    assert all(r["metric"]["severity"] in ("critical", "warning") for r in rows)
