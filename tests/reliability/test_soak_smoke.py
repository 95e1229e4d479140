"""benchmarks/soak.py keeps working: a short run with every exporter on is flat and counts exactly.

The full soak (1,000,000 forwards) is run by hand; its table is in docs/reliability.md.
"""
from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_short_soak_is_flat_and_exact(capsys):
    spec = importlib.util.spec_from_file_location("moewatch_soak", os.path.join(ROOT, "benchmarks", "soak.py"))
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    code = soak.main(["--forwards", "6000", "--report", "20", "--scrape-seconds", "0.05", "--window-seconds", "0.05"])
    out = capsys.readouterr().out
    assert "assignments counted 48,000 (expected 48,000)" in out
    assert code == 0 and out.rstrip().endswith("flat"), out
    assert len([line for line in out.splitlines() if line.startswith("| 1,200")]) == 1
