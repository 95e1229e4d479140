"""Helpers for the alert-rule and dashboard tests: rule files, test-only renders, metric names
used in PromQL, runbook anchors, and a monitored model in a child process."""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from typing import Dict, Iterable, List, Optional, Set

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES_DIR = os.path.join(ROOT, "alert_rules")
RULE_TESTS_DIR = os.path.join(RULES_DIR, "tests")
RUNBOOK = os.path.join(ROOT, "docs", "runbook.md")
GRAFANA_DIR = os.path.join(ROOT, "grafana")
DASHBOARD = os.path.join(GRAFANA_DIR, "dashboards", "moewatch.json")
ALERT_PREFIX = "Moewatch"
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "alert_rules_child.py")


def rule_files() -> List[str]:
    """The rule files Prometheus loads (exporters/prometheus.yml: ../alert_rules/*.yml)."""
    return sorted(glob.glob(os.path.join(RULES_DIR, "*.yml")))


def rule_test_files() -> List[str]:
    return sorted(glob.glob(os.path.join(RULE_TESTS_DIR, "*.yml")))


def load_rules(paths: Optional[Iterable[str]] = None) -> List[dict]:
    """Every rule (recording and alerting) of the rule files, each with its group's name."""
    out = []
    for path in paths or rule_files():
        with open(path) as fh:
            doc = yaml.safe_load(fh)
        for group in doc["groups"]:
            for rule in group["rules"]:
                out.append(dict(rule, _group=group["name"], _file=path))
    return out


def alerting_rules() -> List[dict]:
    return [r for r in load_rules() if "alert" in r]


def recording_rules() -> List[dict]:
    return [r for r in load_rules() if "record" in r]


def render_rules(dest_dir: str, for_overrides: Dict[str, str]) -> List[str]:
    """Copies of the rule files in ``dest_dir`` with the ``for:`` of some alerts replaced.

    Test-only: the end-to-end tests cannot wait out production ``for:`` durations (minutes), so
    they load a rendered copy in which only the alerts they drive wait ``for_overrides[name]``;
    every other rule is byte-for-byte the production rule. Unknown names are an error.
    """
    known = {r["alert"] for r in alerting_rules()}
    unknown = set(for_overrides) - known
    if unknown:
        raise KeyError(f"no alert named {sorted(unknown)} in alert_rules/")
    out = []
    for path in rule_files():
        with open(path) as fh:
            doc = yaml.safe_load(fh)
        for group in doc["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") in for_overrides:
                    rule["for"] = for_overrides[rule["alert"]]
        target = os.path.join(dest_dir, os.path.basename(path))
        with open(target, "w") as fh:
            yaml.safe_dump(doc, fh, sort_keys=False, width=1000)
        out.append(target)
    return out


# -- metric names in PromQL and templates --------------------------------------------------
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(text: str) -> Set[str]:
    """Raw moewatch metric names in a PromQL expression or template (``moewatch_*`` identifiers
    that are not parts of a recording rule name like ``model_layer:moewatch_x:rate5m``)."""
    return {tok for tok in _IDENT.findall(text) if tok.startswith("moewatch_") and ":" not in tok}


def recorded_names(text: str) -> Set[str]:
    """Recording-rule names (``level:metric:operations``) used in a PromQL expression or template."""
    return {tok for tok in _IDENT.findall(text) if tok.count(":") == 2 and "moewatch_" in tok}


def rule_texts() -> List[str]:
    """Every expression and annotation of the rule files (where metric names can appear)."""
    out = []
    for rule in load_rules():
        out.append(rule["expr"])
        out.extend(rule.get("annotations", {}).values())
    return out


# -- the runbook ----------------------------------------------------------------------------
def slug(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def runbook_anchors(path: str = RUNBOOK) -> Set[str]:
    with open(path) as fh:
        lines = fh.read().splitlines()
    anchors = set()
    in_code = False
    for line in lines:
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(slug(line.lstrip("#")))
    return anchors


# -- promtool --------------------------------------------------------------------------------
def promtool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    from export_helpers import load_local_stack

    local_stack = load_local_stack()
    try:
        tools = local_stack.ensure_installed()
    except local_stack.StackUnavailable as why:
        import pytest

        pytest.skip(f"promtool unavailable: {why}")
    return subprocess.run([tools["promtool"], *args], capture_output=True, text=True, timeout=timeout)


# -- a monitored model in a child process ----------------------------------------------------
class Child:
    """``alert_rules_child.py`` running a monitored model; commands go to its stdin.

    Commands: ``collapse [LAYER]`` injects a two-expert collapse (all gates, or gate LAYER),
    ``heal`` removes it, ``quit`` stops. The child answers each command with a JSON line.
    """

    def __init__(self, *args: str, env: Optional[dict] = None):
        self.process = subprocess.Popen([sys.executable, CHILD, *args], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True,
                                        env=dict(os.environ, **(env or {})))
        self.info = self._read()
        self.port = self.info["port"]

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"monitored child exited with {self.process.wait()} before answering")
        return json.loads(line)

    def send(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
