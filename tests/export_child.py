"""A monitored model in a process of its own, for the real-Prometheus tests.

Usage: ``python export_child.py SEED BASE_PORT`` with RANK / LOCAL_RANK set as a launcher would.
Serves /metrics on BASE_PORT + LOCAL_RANK, runs a few forwards, closes the window, prints one JSON
line (port, rank, counts()) and keeps serving until its stdin is closed.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import moewatch  # noqa: E402
from conftest import tiny_mixtral  # noqa: E402
from export_helpers import run_forwards  # noqa: E402


def main() -> None:
    seed, base = int(sys.argv[1]), int(sys.argv[2])
    model = tiny_mixtral()
    mon = moewatch.attach(model, model_name="tiny-mixtral", background=False)
    port = mon.serve_prometheus(port=base)
    run_forwards(model, steps=2 + seed % 3, seed=seed)
    mon.flush()
    counts = {gate: c.tolist() for gate, c in mon.counts().items()}
    print(json.dumps({"port": port, "rank": os.environ.get("RANK"), "counts": counts}), flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin
    mon.detach()


if __name__ == "__main__":
    main()
