"""Alert rules: promtool checks and unit tests, mixin conventions, metric names from the schema,
runbook links that resolve."""
from __future__ import annotations

import os
import re
import shutil

import yaml

from moewatch import schema
from moewatch.export import alertmanager as am_client

from alert_rules_helpers import (ALERT_PREFIX, RULE_TESTS_DIR, RULES_DIR, alerting_rules, load_rules, metric_names,
                                 promtool, recorded_names, recording_rules, rule_files, rule_test_files, rule_texts,
                                 runbook_anchors)

# The alerts the rules must provide (issue: collapse, dead experts, saturation, dropping, drift,
# the monitor stale or absent, failing, or without data yet).
REQUIRED_ALERTS = {"MoewatchRouterCollapse", "MoewatchRoutingDrift", "MoewatchExpertLoadConcentrated",
                   "MoewatchDeadExperts", "MoewatchRouterLogitSaturation", "MoewatchTokensDropped",
                   "MoewatchMonitorAbsent", "MoewatchMonitorStale", "MoewatchMonitoringFailing",
                   "MoewatchMonitorNoData"}


def test_promtool_check_rules_accepts_every_rule_file():
    files = rule_files()
    assert files, "no rule files in alert_rules/"
    done = promtool("check", "rules", *files)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in done.stdout


def test_promtool_unit_tests_pass():
    files = rule_test_files()
    assert files, "no promtool tests in alert_rules/tests/"
    done = promtool("test", "rules", *files)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == len(files), done.stdout


def test_rule_tests_fail_without_persistence(tmp_path):
    """The unit tests can fail: with every `for:` at 0 the pending-phase checks must break."""
    rules_dir = tmp_path / "alert_rules"
    (rules_dir / "tests").mkdir(parents=True)
    for path in rule_files():
        with open(path) as fh:
            text = fh.read()
        (rules_dir / os.path.basename(path)).write_text(re.sub(r"(?m)^(\s+)for: \S+$", r"\1for: 0s", text))
    for path in rule_test_files():
        shutil.copy(path, rules_dir / "tests")
    done = promtool("test", "rules", *sorted(str(p) for p in (rules_dir / "tests").glob("*.yml")))
    assert done.returncode != 0
    report = done.stdout + done.stderr
    for alert in ("MoewatchRouterCollapse", "MoewatchRoutingDrift", "MoewatchDeadExperts",
                  "MoewatchRouterLogitSaturation", "MoewatchMonitorStale", "MoewatchMonitoringFailing",
                  "MoewatchMonitorNoData"):
        assert f"alertname: {alert}" in report, f"{alert}: no test notices a missing `for:`"


def test_alerts_follow_the_mixin_conventions():
    alerts = alerting_rules()
    names = {r["alert"] for r in alerts}
    assert REQUIRED_ALERTS <= names, sorted(REQUIRED_ALERTS - names)
    for rule in alerts:
        name = rule["alert"]
        assert re.fullmatch(ALERT_PREFIX + r"(?:[A-Z][a-z0-9]+)+", name), name
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        notes = rule["annotations"]
        assert set(notes) >= {"summary", "description", "runbook_url"}, name
        assert notes["runbook_url"] == f"docs/runbook.md#{name.lower()}", name
        assert notes["summary"].strip() and notes["description"].strip()
    # Both levels are in use: pages for a broken router, tickets for the rest.
    assert {r["labels"]["severity"] for r in alerts} == {"critical", "warning"}
    critical = {r["alert"] for r in alerts if r["labels"]["severity"] == "critical"}
    assert {"MoewatchRouterCollapse", "MoewatchTokensDropped", "MoewatchMonitoringFailing"} <= critical


def test_recording_rules_aggregate_across_ranks():
    records = recording_rules()
    assert records
    for rule in records:
        level, _metric, _ops = rule["record"].split(":")
        expr = " ".join(rule["expr"].split())
        # A fleet record keeps only its level's labels: never rank, instance or job.
        labels = level.split("_")
        assert "rank" not in labels, rule["record"]
        for by in re.findall(r"by \(([^)]*)\)", expr):
            assert {b.strip() for b in by.split(",")} <= set(labels), (rule["record"], by)


def test_every_metric_in_the_rules_is_in_the_schema():
    used = set()
    for text in rule_texts():
        used |= metric_names(text)
    unknown = sorted(n for n in used if n not in schema.BY_NAME)
    assert not unknown, f"metrics used in alert_rules/ but not in moewatch.schema: {unknown}"
    # ... and the promtool tests feed only real metrics (or the rules' own records).
    fed = set()
    for path in rule_test_files():
        with open(path) as fh:
            doc = yaml.safe_load(fh)
        for test in doc["tests"]:
            for series in test.get("input_series", []):
                fed.add(series["series"].split("{")[0])
    assert fed and sorted(fed - set(schema.BY_NAME)) == []
    assert {"moewatch_gate_severity", "moewatch_expert_assignments_total", "moewatch_up",
            "moewatch_last_window_timestamp_seconds", "moewatch_gate_dropped_assignments_total"} <= used


def test_recorded_names_used_by_the_rules_are_recorded():
    recorded = {r["record"] for r in recording_rules()}
    used = set()
    for text in rule_texts():
        used |= recorded_names(text)
    assert used and sorted(used - recorded) == []


def test_every_alert_has_a_firing_and_a_quiet_case_in_the_promtool_tests():
    fired, quiet = set(), set()
    for path in rule_test_files():
        with open(path) as fh:
            doc = yaml.safe_load(fh)
        assert doc["rule_files"] == ["../" + os.path.basename(p) for p in rule_files()]
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {r["alert"] for r in alerting_rules()}
    assert sorted(names - fired) == [], "alerts never shown firing"
    assert sorted(names - quiet) == [], "alerts never shown quiet or resolved"


def test_runbook_urls_point_at_runbook_sections():
    anchors = runbook_anchors()
    for rule in alerting_rules():
        url = rule["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path == "docs/runbook.md" and anchor in anchors, f"{rule['alert']}: {url} has no section"
    # The alerts moewatch posts to Alertmanager itself link to <runbook_url>#<alertname lower>.
    for alertname, _severity in am_client.ALERTS.values():
        assert alertname.lower() in anchors, f"{alertname}: no section in docs/runbook.md"
    assert os.path.isdir(RULES_DIR) and os.path.isdir(RULE_TESTS_DIR)
