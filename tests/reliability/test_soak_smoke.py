"""benchmarks/soak.py keeps working: a short run with every exporter on is flat and counts exactly.

The soak runs in a process of its own, as it is run by hand: it counts the whole process's threads
and descriptors, and the test process has others that come and go meanwhile (the suite's
background vLLM engine runs, each with a reader thread and pipes to its child). The full soak
(1,000,000 forwards) is run by hand; its table is in docs/reliability.md.
"""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_short_soak_is_flat_and_exact():
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "soak.py"), "--forwards", "6000", "--report", "20",
         "--scrape-seconds", "0.05", "--window-seconds", "0.05"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    out = run.stdout
    assert "assignments counted 48,000 (expected 48,000)" in out, out + run.stderr
    assert run.returncode == 0 and out.rstrip().endswith("flat"), out + run.stderr
    assert len([line for line in out.splitlines() if line.startswith("| 1,200")]) == 1
