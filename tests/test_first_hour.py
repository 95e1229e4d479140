"""What a new user meets first: the CLI's version and help, the submodules the docs name, the
extras the README names, and a baseline recorded from too little traffic saying how much."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest
import torch

import moewatch
from moewatch.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parsers(parser: argparse.ArgumentParser, path=("moewatch",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                assert helps.get(name), f"{' '.join(path)} {name}: no help text"
                yield from _parsers(sub, path + (name,))


def test_every_subcommand_and_argument_has_help():
    seen = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help and action.help.strip(), f"{' '.join(path)} {action.dest}: no help text"
            seen.append((path, action.dest))
    names = {" ".join(p) for p, _ in seen}
    assert {"moewatch", "moewatch demo", "moewatch report", "moewatch baseline record",
            "moewatch baseline build", "moewatch baseline show"} <= names


def test_version():
    done = subprocess.run([sys.executable, "-m", "moewatch", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"moewatch {moewatch.__version__}"


def test_submodules_the_docs_name_are_reachable_after_import_moewatch():
    code = ("import moewatch; f = moewatch.faults.two_expert_collapse; c = moewatch.integrations.MoewatchCallback; "
            "r = moewatch.report.summary_text; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    with pytest.raises(AttributeError):
        moewatch.no_such_module  # noqa: B018


def test_readme_names_the_extras_of_pyproject():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as fh:
        extras = re.findall(r"^(\w+) = \[", fh.read().split("[project.optional-dependencies]")[1].split("\n[")[0], re.M)
    assert {"transformers", "report"} <= set(extras)
    for extra in ("transformers", "report"):
        assert f"moewatch[{extra}]" in readme, extra


def test_baseline_from_too_little_traffic_says_how_much(tiny_windows=2):
    from tests.conftest import tiny_mixtral

    model = tiny_mixtral()
    mon = moewatch.attach(model, background=False, window_tokens=8192)
    with torch.no_grad():
        for _ in range(5):  # 5 x 2048 = 10,240 tokens, as in the first hour
            model(torch.randint(0, 128, (8, 256)))
    with pytest.raises(moewatch.BaselineError) as info:
        mon.baseline()  # no flush(): baseline() closes the current window itself
    message = str(info.value)
    # one full window of 8192 tokens and the 2048 left over (closed by baseline() itself)
    assert re.search(r"closed [12] window\(s\) from 10,240 tokens", message), message
    assert "at window_tokens=8,192 that is 65,536 tokens (55,296 more)" in message
    assert "window_tokens=1,280" in message
    mon.detach()
    # following the advice works: 8 windows of the same traffic
    with moewatch.attach(model, background=False, window_tokens=1280) as rec:
        with torch.no_grad():
            for _ in range(8):
                model(torch.randint(0, 128, (5, 256)))
                rec.flush()
        base = rec.baseline()
    assert min(g.windows for g in base.gates.values()) == 8
