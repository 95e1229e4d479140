"""``moewatch demo``: a small trained MoE on the CPU, watched from healthy routing to a collapse.

The model is the byte-level Mixtral shipped in ``moewatch/assets/router_model`` (trained on the
Python standard library's source). The demo records a baseline from training-distribution
traffic (with a progress bar), serves held-out files (healthy), then injects a router collapse,
a dead expert and logit saturation at one gate (``moewatch.faults``), and removes them again.
It leaves the baseline and a dump of every window in ``--out`` (``./moewatch-demo``), names the
commands to read them, and with ``--serve PORT`` keeps ``/metrics`` up until Ctrl-C. It writes
nothing anywhere else.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

import moewatch
from moewatch import faults, pretrained

WARMUP_WINDOWS = 8  # at most this many more healthy windows before the first verdict
WINDOW_FORWARDS = 2  # forwards of 8 x 128 bytes per window: 2048 tokens per gate
WINDOW_TOKENS = WINDOW_FORWARDS * 8 * pretrained.SEQ_LEN
BASELINE_WINDOWS = 24
DEFAULT_OUT = "moewatch-demo"


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


class Progress:
    """A one-line progress bar on a terminal (redrawn in place); elsewhere a line per quarter."""

    def __init__(self, total: int, what: str, stream=None):
        self.total, self.what, self.stream = total, what, stream or sys.stdout
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._printed = 0  # quarters printed (not a terminal)

    def update(self, done: int) -> None:
        elapsed = time.monotonic() - self.started
        filled = round(20 * done / self.total)
        text = (f"   [{'#' * filled}{'.' * (20 - filled)}] {done}/{self.total} {self.what}, "
                f"{done * WINDOW_TOKENS:,} tokens, {elapsed:.0f} s")
        if self.tty:
            self.stream.write("\r" + text + ("\n" if done == self.total else ""))
            self.stream.flush()
        elif done * 4 >= (self._printed + 1) * self.total:
            self._printed = done * 4 // self.total
            print(text, file=self.stream, flush=True)


def _record_baseline(model, windows: int, seed: int, out: Path) -> Path:
    print(f"1. record a baseline from training-distribution traffic ({windows} windows of "
          f"{WINDOW_TOKENS:,} tokens per gate)")
    progress = Progress(windows, "windows")
    with moewatch.attach(model, background=False, model_name="demo") as recorder:
        for done, _ in enumerate(_run_windows(model, recorder, pretrained.training_batches(seed=seed), windows), 1):
            progress.update(done)
        baseline = recorder.baseline()
    path = out / "baseline.json"
    baseline.save(path)
    print(f"   {len(baseline.gates)} gates -> {path}\n")
    return path


def run(windows: int = 3, serve: Optional[int] = None, seed: int = 0, out: str = DEFAULT_OUT,
        baseline_windows: int = BASELINE_WINDOWS, wait: Optional[threading.Event] = None) -> int:
    """The demo; returns the exit code. ``wait``: with ``serve``, the event that ends serving
    (default: Ctrl-C)."""
    started = time.monotonic()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    model, _ = pretrained.load_router_model()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: byte-level Mixtral trained on Python's standard library, {params:.1f}M parameters, "
          f"{model.config.num_hidden_layers} MoE layers x {model.config.num_local_experts} experts, top-2\n")
    baseline_path = _record_baseline(model, baseline_windows, seed, folder)

    mon = moewatch.attach(model, baseline=baseline_path, background=False, model_name="demo")
    try:
        if serve is not None:
            port = mon.serve_prometheus(port=serve)
            print(f"   Prometheus metrics on http://127.0.0.1:{port}/metrics\n")
        _drills(model, mon, windows, seed)
        dump = mon.dump(str(folder / "demo.parquet"))
        errors = mon.error_counts()
        print(f"\ndone in {time.monotonic() - started:.0f} s; internal errors: {errors or 'none'}")
        print(f"wrote {baseline_path} (the baseline) and {dump} (every window, with its verdict)\n")
        print("next:")
        print(f"  moewatch report {dump} --out {folder / 'report'}   # the incidents, worst experts, plots")
        print(f"  moewatch baseline show {baseline_path}")
        if _rebuildable(dump):
            print(f"  moewatch baseline build {dump} -o {folder / 'rebuilt.json'}   # from its healthy windows")
        if serve is not None:
            _serve_until_stopped(port, wait)
    finally:
        mon.detach()
    return 0


def _drills(model, mon: moewatch.Monitor, windows: int, seed: int) -> None:
    print(f"2. serve held-out files ({len(mon.gates)} gates watched: {', '.join(g.name for g in mon.gates)})")
    traffic = pretrained.heldout_batches(seed=seed + 1)
    index = 0
    # a fresh monitor first measures the traffic's make-up on the pairs of its first windows:
    # serve healthy traffic until the first verdict is in
    for health in _run_windows(model, mon, traffic, windows + WARMUP_WINDOWS):
        print(_line(index, health, mon))
        index += 1
        if index >= windows and not health.waiting:
            break
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


def _rebuildable(path: str) -> bool:
    """Whether every gate has enough windows the dump judged ok for ``moewatch baseline build``."""
    from .baseline import MIN_WINDOWS
    from .baseline_build import healthy_frame
    from .dump import read_dump

    frame, _ = healthy_frame(read_dump(path))
    return bool(len(frame)) and int(frame.groupby("gate")["window"].count().min()) >= MIN_WINDOWS


def _serve_until_stopped(port: int, wait: Optional[threading.Event]) -> None:
    """Keep the monitor (and its /metrics endpoint) up until Ctrl-C, or until ``wait`` is set."""
    print(f"\nserving http://127.0.0.1:{port}/metrics until Ctrl-C", flush=True)
    try:
        if wait is not None:
            wait.wait()
        else:
            threading.Event().wait()  # Ctrl-C (SIGINT) raises KeyboardInterrupt here
    except KeyboardInterrupt:
        pass
    print("stopped serving", flush=True)
