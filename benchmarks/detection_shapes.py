"""Traffic shapes for the detection benchmark: healthy traffic at every traffic level, and how
long a fault takes to be flagged when windows are small (see docs/detection.md).

Traffic arrives as *requests*: a request of L tokens is a contiguous stretch of a file (one
sequence, or rows of 128 for a request longer than the model's context), so its tokens route
alike, as a real request's do, and each is one forward pass. Each request is recorded once as a
window of its own; a replayed window is the sum of the requests it holds (window statistics are
sums, so that is exactly the window the monitor would have closed). Requests are drawn without
replacement (the pool is reshuffled when used up), so no window, and no pool of consecutive
windows, holds one request twice.

The baseline: 64 windows of 16 training-distribution requests of 128 tokens (2,048 tokens), one
forward pass each, as the live requests are. (The would-be drops of ``capacity_factor=`` are
counted per forward pass, so they depend on how many sequences a pass holds: a baseline of
4-sequence passes against 1-sequence live passes shows a higher would-be drop rate in every
live window, whatever its size; docs/detection.md.)
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

import moewatch
from moewatch import pretrained
from moewatch.detector import BaselineDetector
from moewatch.options import Options
from moewatch.windows import Window

LENGTHS = (64, 128, 512)
MODEL_NAME = "moewatch router model"


def compose(index: int, parts: Sequence[Window]) -> Window:
    """The window the monitor would close after ``parts`` ran back to back (sums add up)."""
    return Window(index=index, t_start=parts[0].t_start, t_end=parts[-1].t_end,
                  sums=np.sum([p.sums for p in parts], axis=0), counts=np.sum([p.counts for p in parts], axis=0),
                  absmax=np.max([p.absmax for p in parts], axis=0), rows=np.sum([p.rows for p in parts], axis=0))


def request(length: int, rng: np.random.Generator, kind: str = "heldout") -> torch.Tensor:
    """[rows, <=128] ids: ``length`` contiguous bytes of ``kind`` text, in rows of the model's context."""
    ids = pretrained.random_batch(kind, 1, rng, seq_len=length)
    return ids.reshape(-1, min(length, pretrained.SEQ_LEN))


def record_requests(model, length: int, count: int, seed: int, capacity_factor: float,
                    kind: str = "heldout") -> List[Window]:
    """``count`` requests of ``length`` tokens of traffic ``kind``, one window each."""
    rng = np.random.default_rng(seed)
    out: List[Window] = []
    with moewatch.attach(model, background=False, capacity_factor=capacity_factor, model_name=MODEL_NAME) as mon:
        mon.add_listener(lambda window, health: out.append(window))
        for _ in range(count):
            with torch.no_grad():
                model(input_ids=request(length, rng, kind))
            mon.flush()
    return out


def request_baseline(model, windows: int, per_window: int, seed: int, capacity_factor: float):
    """(baseline, gates): ``windows`` windows of ``per_window`` training requests of 128 tokens."""
    from moewatch.baseline import Baseline
    from moewatch.windows import windows_frame

    chunks = record_requests(model, pretrained.SEQ_LEN, windows * per_window, seed, capacity_factor, "training")
    with moewatch.attach(model, background=False) as mon:
        gates = mon.gates
    frame = windows_frame([compose(i, chunks[i * per_window:(i + 1) * per_window]) for i in range(windows)], gates)
    return Baseline.from_frame(frame, model_name=MODEL_NAME), gates


class Stream:
    """Requests of one length, drawn without replacement (reshuffled when all were used)."""

    def __init__(self, pool: List[Window], rng: np.random.Generator):
        self.pool, self.rng = pool, rng
        self.order: List[int] = []

    def take(self) -> Window:
        if not self.order:
            self.order = list(self.rng.permutation(len(self.pool)))
        return self.pool[self.order.pop()]


# -- shapes: (rng, streams) -> the requests of one window ------------------------------------
Shape = Callable[[np.random.Generator, Dict[int, Stream]], List[Window]]


def fixed(count: int, length: int) -> Shape:
    return lambda rng, streams: [streams[length].take() for _ in range(count)]


def mixed(lo: int, hi: int) -> Shape:
    """lo..hi requests, each 64, 128 or 512 tokens long (1:2:1)."""
    def shape(rng, streams):
        n = int(rng.integers(lo, hi + 1))
        return [streams[int(rng.choice(LENGTHS, p=(0.25, 0.5, 0.25)))].take() for _ in range(n)]
    return shape


def time_closed(period: int = 500, low: float = 0.3, high: float = 12.0) -> Shape:
    """Windows closed by the clock: a Poisson number of requests of mixed length whose mean
    follows a day (``low`` at night to ``high`` at the peak, over ``period`` windows). A
    window in which no request arrived does not close (nothing to judge)."""
    state = {"i": 0}

    def shape(rng, streams):
        while True:
            phase = 2 * np.pi * state["i"] / period
            state["i"] += 1
            mean = low + (high - low) * 0.5 * (1 - np.cos(phase))
            n = int(rng.poisson(mean))
            if n:
                return [streams[int(rng.choice(LENGTHS, p=(0.25, 0.5, 0.25)))].take() for _ in range(n)]
    return shape


SHAPES = [  # (label, shape factory); factories, as time_closed keeps a clock
    ("1 request of 64 tokens", lambda: fixed(1, 64)),
    ("1 request of 128 tokens", lambda: fixed(1, 128)),
    ("1 request of 512 tokens", lambda: fixed(1, 512)),
    ("2 requests of 128 tokens", lambda: fixed(2, 128)),
    ("2-4 requests of 64/128/512 tokens", lambda: mixed(2, 4)),
    ("time-closed, Poisson 0.3-12 requests of 64/128/512", lambda: time_closed()),
    ("16 requests of 128 (the baseline's window)", lambda: fixed(16, 128)),
    ("16k tokens: 128 requests of 128", lambda: fixed(128, 128)),
]


@dataclass
class ShapeResult:
    label: str
    windows: int = 0
    verdicts: int = 0  # windows after which the detector judged (alone or pooled)
    alarms: int = 0  # verdicts that were not ok (each a page)
    alarmed_windows: int = 0  # windows whose health showed an alarm (a verdict stands while pooling)
    tokens: int = 0
    checks: Counter = field(default_factory=Counter)
    kappa: float = 1.0  # live dispersion over the baseline's at the end (mean over gates)


def replay_shape(label: str, shape: Shape, pools: Dict[int, List[Window]], gates, baseline,
                 windows: int, seed: int) -> ShapeResult:
    opts = Options()
    detector = BaselineDetector(gates, baseline, opts.ert_windows, opts.persistence)
    rng = np.random.default_rng(seed)
    streams = {length: Stream(pool, rng) for length, pool in pools.items()}
    out = ShapeResult(label)
    for i in range(windows):
        window = compose(i, shape(rng, streams))
        health = detector.update(window, gates)
        out.windows += 1
        out.tokens += int(window.tokens.max())
        judged = not health.waiting
        out.verdicts += judged
        if health.severity != "ok":
            out.alarmed_windows += 1
            if judged:
                out.alarms += 1
                for g in health.gates.values():
                    out.checks.update(r.split(" [")[-1].split(":")[0] for r in g.reasons)
    pool = getattr(detector, "_pool", None)  # the evidence rule's state (absent before it existed)
    out.kappa = float(pool.kappa().mean()) if pool is not None else 1.0
    return out


def shape_table(model, gates, baseline, seeds: Sequence[int], windows: int, requests: Dict[int, int],
                capacity_factor: float) -> List[List[ShapeResult]]:
    """Per seed, every shape of SHAPES replayed for ``windows`` windows."""
    results = []
    for seed in seeds:
        started = time.time()
        pools = {length: record_requests(model, length, requests[length], 1000 * seed + length, capacity_factor)
                 for length in LENGTHS}
        recorded = time.time() - started
        results.append([replay_shape(label, make(), pools, gates, baseline, windows, 7 * seed + n)
                        for n, (label, make) in enumerate(SHAPES)])
        print(f"  traffic shapes, seed {seed}: {sum(requests.values())} requests recorded in {recorded:.0f} s, "
              f"replayed in {time.time() - started - recorded:.0f} s", flush=True)
        print_shape_table(results, seeds[:len(results)])  # so far
        print(flush=True)
    return results


def print_shape_table(results: List[List[ShapeResult]], seeds: Sequence[int]) -> None:
    print("| live traffic (baseline: 16 x 128-token sequences per window) | windows per seed | tokens per window "
          "(mean) | windows per verdict | false alarms per 10,000 windows, seeds " + ", ".join(map(str, seeds))
          + " | kappa | met |")
    print("|---|---|---|---|---|---|---|")
    for n in range(len(SHAPES)):
        rows = [r[n] for r in results]
        first = rows[0]
        per_10k = [r.alarms * 10_000 / r.windows for r in rows]
        per_verdict = sum(r.windows for r in rows) / max(sum(r.verdicts for r in rows), 1)
        tokens = sum(r.tokens for r in rows) / sum(r.windows for r in rows)
        print(f"| {first.label} | {first.windows} | {tokens:,.0f} | {per_verdict:.1f} | "
              + ", ".join(f"{x:g}" for x in per_10k)
              + f" | {np.mean([r.kappa for r in rows]):.2f} | {'yes' if all(r.alarms == 0 for r in rows) else 'NO'} |")
    checks = Counter()
    for r in (r for rows in results for r in rows):
        checks.update(r.checks)
    if checks:
        print(f"false alarms by check: {dict(checks)}")


# -- detection delay when windows are small -------------------------------------------------
@dataclass
class SmallTrial:
    fault: str
    layer: int
    length: int
    healthy_alarms: int = 0
    delay: Optional[int] = None  # windows from the injection until the faulted gate is flagged
    severity: str = ""  # of that first flag
    collapse: Optional[int] = None  # ... until it is called collapse


def small_window_trial(model, baseline, faults, name: str, layer: int, length: int, warmup: int,
                       limit: int, seed: int, capacity_factor: float) -> SmallTrial:
    """One request of ``length`` tokens per window: ``warmup`` healthy windows, then the fault
    until the faulted gate is flagged (at most ``limit`` windows)."""
    trial = SmallTrial(name, layer, length)
    rng = np.random.default_rng(seed)
    with moewatch.attach(model, baseline=baseline, background=False, capacity_factor=capacity_factor,
                         model_name=MODEL_NAME) as mon:
        gate = mon.gates[layer].name
        for _ in range(warmup):
            with torch.no_grad():
                model(input_ids=request(length, rng))
            trial.healthy_alarms += mon.flush().severity != "ok"
        with faults[name](model, layer):
            for w in range(1, limit + 1):
                with torch.no_grad():
                    model(input_ids=request(length, rng))
                health = mon.flush()
                severity = health.gates[gate].severity
                if severity != "ok" and trial.delay is None:
                    trial.delay, trial.severity = w, severity
                if severity == "collapse":
                    trial.collapse = w
                    break
    return trial


def _delays(values: List[Optional[int]], length: int) -> str:
    got = [d for d in values if d is not None]
    windows = ", ".join("-" if d is None else str(d) for d in values)
    if not got:
        return f"{windows} | -"
    return f"{windows} | {np.median(got) * length:,.0f} ({max(got) * length:,})"


def print_small_trials(trials: List[SmallTrial], names: Sequence[str]) -> None:
    print("| fault (one layer at a time) | window | first flag: windows, L0-L3 | tokens, median (max) | "
          "collapse: windows, L0-L3 | tokens, median (max) | first flag called | alarms before the fault |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        for length in sorted({t.length for t in trials}):
            mine = [t for t in trials if t.fault == name and t.length == length]
            if not mine:
                continue
            called = dict(Counter(t.severity for t in mine if t.severity))
            print(f"| {name} | 1 request of {length} tokens | {_delays([t.delay for t in mine], length)} | "
                  f"{_delays([t.collapse for t in mine], length)} | {called} | "
                  f"{sum(t.healthy_alarms for t in mine)} |")
