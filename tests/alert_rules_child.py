"""A monitored model serving traffic in a process of its own, for the alert-rule and dashboard
tests: a real Prometheus scrapes it while the parent injects and removes faults.

Usage: ``python alert_rules_child.py [--baseline] [--capacity-factor F] [--model-name NAME]
[--expert-placement contiguous:R]``.
Serves /metrics on a free port and prints ``{"port": ..., "gates": [...]}``; then runs a forward
and closes a window every ``--period`` seconds until told to stop. Commands on stdin, one per
line, each answered by one JSON line once applied between two forwards:

* ``collapse`` / ``collapse LAYER`` -- :func:`moewatch.faults.two_expert_collapse` on every gate
  (or on the gate at position LAYER);
* ``heal`` -- remove the fault;
* ``quit`` -- detach and exit (closing stdin does the same).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import moewatch  # noqa: E402
import moewatch.faults  # noqa: E402
from conftest import tiny_mixtral  # noqa: E402
from export_helpers import run_forwards  # noqa: E402


def _read_commands(commands: "queue.Queue[str]") -> None:
    for line in sys.stdin:
        commands.put(line.strip())
    commands.put("quit")  # stdin closed: the parent is gone


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", action="store_true", help="record a baseline, then monitor with it")
    parser.add_argument("--capacity-factor", type=float, default=None)
    parser.add_argument("--model-name", default="tiny-mixtral")
    parser.add_argument("--period", type=float, default=0.25)
    parser.add_argument("--expert-placement", default=None, help="expert_placement= (e.g. contiguous:2)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = tiny_mixtral()
    options = dict(model_name=args.model_name, background=False, capacity_factor=args.capacity_factor)
    baseline = None
    if args.baseline:
        with moewatch.attach(model, **options) as recorder:
            for i in range(12):
                run_forwards(model, steps=1, batch=4, seed=1000 + i)
                recorder.flush()
            baseline = recorder.baseline()
    mon = moewatch.attach(model, baseline=baseline, expert_placement=args.expert_placement, **options)
    port = mon.serve_prometheus(port=0)
    commands: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=_read_commands, args=(commands,), daemon=True).start()
    print(json.dumps({"port": port, "gates": [g.name for g in mon.gates]}), flush=True)
    fault = None
    step = 0
    while True:
        try:
            command = commands.get_nowait()
        except queue.Empty:
            command = None
        if command == "quit":
            break
        if command is not None:
            parts = command.split()
            if fault is not None:
                fault.remove()
                fault = None
            if parts and parts[0] == "collapse":
                where = {"layers": [int(parts[1])]} if len(parts) > 1 else {}
                fault = moewatch.faults.two_expert_collapse(model, **where)
            print(json.dumps({"command": command, "fault": fault.gates if fault else []}), flush=True)
        run_forwards(model, steps=1, batch=4, seed=step)  # 64 tokens: one window
        mon.flush()
        step += 1
        time.sleep(args.period)
    if fault is not None:
        fault.remove()
    mon.detach()


if __name__ == "__main__":
    main()
