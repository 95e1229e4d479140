"""Peak memory of an operation, measured in a child process.

The child imports moewatch (and torch) first, then, for each snippet, resets the kernel's
high-water mark of resident memory (``/proc/self/clear_refs``), runs the snippet and reads
``VmHWM``: the peak above the resident size at the start is what the snippet took, whatever
allocated it (Python objects, numpy, Arrow's pool). Linux only.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CHILD = r'''
import gc, json, sys, time
import moewatch, moewatch.dump, moewatch.report  # noqa: F401  (imports are not what is measured)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0

out = []
for snippet in json.loads(sys.argv[1]):
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    start, t0 = status("VmRSS"), time.monotonic()
    error = None
    try:
        exec(snippet, {"moewatch": moewatch})
    except BaseException as e:  # noqa: BLE001 - reported to the test, which asserts on it
        error = [type(e).__name__, str(e)]
    out.append({"peak_mib": status("VmHWM") - start, "seconds": time.monotonic() - t0, "error": error})
print("RESULT " + json.dumps(out))
'''


def measure(snippets: List[str], timeout: float = 300.0) -> List[Dict]:
    """[{peak_mib, seconds, error: [type, message] or None}] for each snippet, in one child."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak memory")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(snippets)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])
