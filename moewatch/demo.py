"""``moewatch demo``: a small trained MoE on the CPU, watched from healthy routing to a collapse.

The model is the byte-level Mixtral shipped in ``moewatch/assets/router_model`` (trained on the
Python standard library's source). The demo records a baseline from training-distribution
traffic, serves held-out files (healthy), then injects a router collapse, a dead expert and
logit saturation at one gate (``moewatch.faults``), and removes them again.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

import moewatch
from moewatch import faults, pretrained

WINDOW_FORWARDS = 2  # forwards of 8 x 128 bytes per window: 2048 tokens per gate


def _run_windows(model, mon: moewatch.Monitor, traffic: Iterator[torch.Tensor], windows: int):
    """Feed ``windows`` windows of traffic; yield each window's verdict."""
    for _ in range(windows):
        for _ in range(WINDOW_FORWARDS):
            with torch.no_grad():
                model(next(traffic))
        yield mon.flush()


def _line(window: int, health: moewatch.Health, mon: moewatch.Monitor) -> str:
    frame = mon.windows()
    last = frame[frame["window"] == frame["window"].max()]
    eff = " ".join(f"{v:4.1f}" for v in last["effective_experts"])
    top = " ".join(f"{v:4.0%}" for v in last["top_share"])
    return f"  window {window:>2}  {health.severity:<9} effective experts [{eff}]  top share [{top}]"


def _print_reasons(health: moewatch.Health) -> None:
    for name, gate in health.gates.items():
        if gate.severity != "ok":
            print(f"      {name}: {gate.severity}")
            for reason in gate.reasons[:3]:
                print(f"        - {reason}")


def run(windows: int = 3, serve: Optional[int] = None, seed: int = 0) -> int:
    started = time.monotonic()
    model, _ = pretrained.load_router_model()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: byte-level Mixtral trained on Python's standard library, {params:.1f}M parameters, "
          f"{model.config.num_hidden_layers} MoE layers x {model.config.num_local_experts} experts, top-2\n")

    print("1. record a baseline from training-distribution traffic")
    with moewatch.attach(model, background=False, model_name="demo") as recorder:
        for _ in _run_windows(model, recorder, pretrained.training_batches(seed=seed), 24):
            pass
        baseline = recorder.baseline()
    path = Path(tempfile.mkdtemp(prefix="moewatch-demo-")) / "baseline.json"
    baseline.save(path)
    print(f"   {len(baseline.gates)} gates, 24 windows of 2048 tokens -> {path}\n")

    mon = moewatch.attach(model, baseline=path, background=False, model_name="demo")
    if serve is not None:
        port = mon.serve_prometheus(port=serve)
        print(f"   Prometheus metrics on http://127.0.0.1:{port}/metrics\n")
    print(f"2. serve held-out files ({len(mon.gates)} gates watched: {', '.join(g.name for g in mon.gates)})")
    traffic = pretrained.heldout_batches(seed=seed + 1)
    index = 0
    for health in _run_windows(model, mon, traffic, windows):
        print(_line(index, health, mon))
        index += 1
    layer = 2
    drills = [
        ("a router collapse: layer 2's gate sends most tokens to experts 0 and 1",
         lambda: faults.two_expert_collapse(model, experts=(0, 1), layers=[layer])),
        ("a dead expert: expert 3 of layer 2 is never chosen",
         lambda: faults.dead_expert(model, expert=3, layers=[layer])),
        ("logit saturation: layer 2's logits scaled x8",
         lambda: faults.saturate(model, scale=8.0, layers=[layer])),
    ]
    for step, (what, inject) in enumerate(drills, start=3):
        print(f"\n{step}. inject {what}")
        with inject():
            for health in _run_windows(model, mon, traffic, windows):
                print(_line(index, health, mon))
                index += 1
        _print_reasons(health)
        print("   fault removed:")
        for health in _run_windows(model, mon, traffic, 2):
            print(_line(index, health, mon))
            index += 1
    errors = mon.error_counts()
    mon.detach()
    print(f"\ndone in {time.monotonic() - started:.0f} s; internal errors: {errors or 'none'}")
    if serve is not None:
        print("(the metrics endpoint stopped with the monitor)")
    return 0
