"""Detection benchmark: the calibrated detector on the trained router model (moewatch.pretrained).

    python benchmarks/detection.py                 # ~20-30 min on 2 busy CPU cores (traffic shapes: most)
    python benchmarks/detection.py --quick         # fewer windows, trials and seeds (~3-5 min)
    python benchmarks/detection.py --shapes-only   # the traffic-shape tables only
    python benchmarks/detection.py --skip-shapes   # everything but the traffic-shape tables

What it does (see docs/detection.md for the method and the results):

1. Baseline: windows of *training-distribution* traffic (the stdlib files the model was trained
   on) become a ``moewatch.Baseline``.
2. Healthy traffic: held-out stdlib files the model never saw.
   * Live: every fault trial starts with healthy windows on a freshly attached monitor.
   * Replayed: 10,000 windows. Running 10,000 real windows (20M tokens) is too slow for a CPU
     benchmark, so each forward pass of held-out traffic (a "chunk") is recorded once as a
     window of its own, and a replayed window is the sum of ``forwards_per_window`` chunks
     drawn at random. Window statistics are sums over forward passes (counts, token sums,
     drops), so a composed window is exactly what the monitor would have closed had those
     chunks run back to back; what replay cannot reproduce is correlation between windows
     beyond that of the chunk pool, so it measures the detector against held-out routing
     variation, not against serving-time burstiness.
3. Faults (moewatch.faults), each injected at one gate, once per layer: two-expert collapse,
   one dead expert, logits x8 (saturation), a capacity squeeze. Detection delay = windows from
   the injection until the faulted gate is flagged (1 = the first faulted window).
4. Domain shift: English prose instead of code; it may be called drift, never collapse.
5. The detector's cost per window for 64 gates x 256 experts (synthetic over-dispersed traffic).
6. Traffic shapes (detection_shapes.py): the same baseline, healthy held-out traffic served as
   requests of 64-512 tokens, windows of one request to 16k tokens and windows closed by the
   clock; false alarms per 10,000 windows for each, over several seeds. Then the detection
   delay of each fault when every window holds one request, in windows and in tokens.

The monitor counts would-be drops with ``capacity_factor=1.25`` (Mixtral is dropless), so the
baseline, the healthy traffic and the capacity squeeze all carry a drop rate.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))

import moewatch  # noqa: E402
from moewatch import faults, pretrained  # noqa: E402
from moewatch.baseline import Baseline  # noqa: E402
from moewatch.detector import BaselineDetector  # noqa: E402
from moewatch.options import Options  # noqa: E402
from moewatch.routing import GateInfo  # noqa: E402
from moewatch.stats import (ENTROPY, LOGIT_FINITE, LOGIT_SQSUM, LOGIT_SUM, NUM_SCALARS, TOKENS,  # noqa: E402
                            TOP1)
from moewatch.windows import Window, windows_frame  # noqa: E402
import detection_shapes as shapes  # noqa: E402
from detection_shapes import compose  # noqa: E402

CAPACITY_FACTOR = 1.25


@dataclass
class Setup:
    batch_size: int = 4  # sequences of 128 bytes per forward pass (512 tokens)
    forwards_per_window: int = 4  # a window = 2048 tokens per gate
    baseline_windows: int = 64
    healthy_chunks: int = 192  # forward passes of held-out traffic recorded for replay
    replay_windows: int = 10_000
    healthy_before: int = 2  # live healthy windows before each injection
    fault_windows: int = 4  # live windows with the fault in
    prose_windows: int = 12
    layers: Sequence[int] = (0, 1, 2, 3)
    # traffic shapes
    shape_seeds: Sequence[int] = (0, 1, 2)
    shape_windows: int = 10_000
    shape_requests: Dict[int, int] = field(default_factory=lambda: {64: 600, 128: 1000, 512: 300})
    small_lengths: Sequence[int] = (128, 512)  # one request per window, for the fault delays
    small_warmup: int = 24  # healthy windows before the fault
    small_limit: int = 120  # faulted windows at most
    shape_table: bool = True  # run the traffic-shape table ...
    small_trials: bool = True  # ... and the fault trials with one request per window


FAULTS: Dict[str, Callable] = {
    "two-expert collapse": lambda model, layer: faults.two_expert_collapse(model, (0, 1), layers=[layer]),
    "dead expert": lambda model, layer: faults.dead_expert(model, 3, layers=[layer]),
    "saturation (logits x8)": lambda model, layer: faults.saturate(model, 8.0, layers=[layer]),
    "capacity squeeze": lambda model, layer: faults.capacity_squeeze(model, 5, layers=[layer]),
}
TARGETS = {"two-expert collapse": ("collapse", 2), "dead expert": ("flag", 3),
           "saturation (logits x8)": ("flag", 3), "capacity squeeze": ("flag", 3)}


# -- traffic ----------------------------------------------------------------------------
WARMUP_LIMIT = 12  # at most this many more healthy windows before a fault trial's first verdict


def forward(model: torch.nn.Module, batch: torch.Tensor) -> None:
    with torch.no_grad():
        model(input_ids=batch)


def record_chunks(model, kind: str, forwards: int, batch_size: int, seed: int):
    """One window per forward pass of ``kind`` traffic (a monitor flushed after each pass).

    Returns (windows, the monitored gates)."""
    chunks: List[Window] = []
    with moewatch.attach(model, background=False, capacity_factor=CAPACITY_FACTOR) as mon:
        mon.add_listener(lambda window, health: chunks.append(window))
        for batch in pretrained.batches(kind, batch_size, seed=seed, count=forwards):
            forward(model, batch)
            mon.flush()
        gates = mon.gates
    return chunks, gates


def build_baseline(chunks: List[Window], gates: Sequence[GateInfo], per_window: int) -> Baseline:
    windows = [compose(i, chunks[i * per_window:(i + 1) * per_window]) for i in range(len(chunks) // per_window)]
    return Baseline.from_frame(windows_frame(windows, gates), model_name=shapes.MODEL_NAME)


# -- healthy replay -----------------------------------------------------------------------
def replay(chunks: List[Window], gates, baseline: Baseline, setup: Setup, seed: int) -> dict:
    opts = Options()
    detector = BaselineDetector(gates, baseline, opts.ert_windows, opts.persistence)
    rng = np.random.default_rng(seed)
    severities: Counter = Counter()
    episodes, previous = 0, "ok"
    reasons: Counter = Counter()
    for i in range(setup.replay_windows):
        picks = rng.integers(0, len(chunks), size=setup.forwards_per_window)
        health = detector.update(compose(i, [chunks[j] for j in picks]), gates)
        severities[health.severity] += 1
        if health.severity != "ok":
            episodes += previous == "ok"
            for g in health.gates.values():
                reasons.update(r.split(" [")[-1].split(":")[0] for r in g.reasons)
        previous = health.severity
    alarms = severities["drift"] + severities["collapse"]
    return {"windows": setup.replay_windows, "alarms": alarms, "episodes": episodes, "collapse": severities["collapse"],
            "per_10k": alarms * 10_000 / setup.replay_windows, "checks": dict(reasons)}


# -- live trials -------------------------------------------------------------------------
@dataclass
class Trial:
    fault: str
    layer: int
    healthy_alarms: int = 0
    first_flag: Optional[int] = None  # windows after injection, 1-based
    first_collapse: Optional[int] = None
    severities: List[str] = field(default_factory=list)  # of the faulted gate, per faulted window
    reasons: List[str] = field(default_factory=list)  # at the first flag
    downstream_flagged: int = 0  # windows in which a later gate alarmed too (it sees faulted inputs)
    upstream_flagged: int = 0  # windows in which an earlier gate alarmed (it cannot see the fault)
    share_note: str = ""


def run_trial(model, baseline: Baseline, name: str, layer: int, setup: Setup, seed: int) -> Trial:
    trial = Trial(name, layer)
    traffic = pretrained.heldout_batches(setup.batch_size, seed=seed)
    with moewatch.attach(model, baseline=baseline, background=False, capacity_factor=CAPACITY_FACTOR,
                         model_name=shapes.MODEL_NAME) as mon:
        gate = mon.gates[layer].name
        # healthy windows until the monitor's first verdict (it first measures the traffic's
        # make-up on the pairs of its first windows), and at least healthy_before of them
        for n in range(setup.healthy_before + WARMUP_LIMIT):
            for _ in range(setup.forwards_per_window):
                forward(model, next(traffic))
            health = mon.flush()
            trial.healthy_alarms += health.severity != "ok"
            if n + 1 >= setup.healthy_before and health.verdict_on is not None:
                break
        with FAULTS[name](model, layer):
            for w in range(1, setup.fault_windows + 1):
                for _ in range(setup.forwards_per_window):
                    forward(model, next(traffic))
                health = mon.flush()
                verdict = health.gates[gate]
                trial.severities.append(verdict.severity)
                flagged = [i for i, g in enumerate(mon.gates) if health.gates[g.name].severity != "ok"]
                trial.downstream_flagged += any(i > layer for i in flagged)
                trial.upstream_flagged += any(i < layer for i in flagged)
                if verdict.severity != "ok" and trial.first_flag is None:
                    trial.first_flag, trial.reasons = w, list(verdict.reasons)
                if verdict.severity == "collapse" and trial.first_collapse is None:
                    trial.first_collapse = w
        row = mon.windows()
        last = row[row["gate"] == gate].iloc[-1]
        trial.share_note = (f"top share {last['top_share']:.0%}, effective experts {last['effective_experts']:.2f}, "
                            f"dead {last['dead_experts']}, logit std {last['logit_std']:.2f}, "
                            f"top-1 p {last['top1_prob_mean']:.2f}, drops {last['drop_rate']:.1%}")
    return trial


def run_prose(model, baseline: Baseline, setup: Setup, seed: int, capacity_factor: Optional[float]) -> dict:
    """English prose for ``setup.prose_windows`` windows; with ``capacity_factor=None`` the
    monitor counts no drops (a dropless deployment: routing checks only)."""
    counts: Counter = Counter()
    checks: Counter = Counter()  # (check, severity) over alarmed gates
    reasons: List[str] = []
    first_flag = None
    with moewatch.attach(model, baseline=baseline, background=False, capacity_factor=capacity_factor,
                         model_name=shapes.MODEL_NAME) as mon:
        traffic = pretrained.prose_batches(setup.batch_size, seed=seed)
        for w in range(1, setup.prose_windows + 1):
            for _ in range(setup.forwards_per_window):
                forward(model, next(traffic))
            health = mon.flush()
            counts[health.severity] += 1
            for verdict in health.gates.values():
                checks.update(f"{c}={v}" for c, v in verdict.checks.items() if v != "ok")
            if health.severity != "ok" and first_flag is None:
                first_flag = w
                reasons = [f"{g}: {r}" for g, h in health.gates.items() for r in h.reasons][:3]
        drops = mon.windows()["drop_rate"]
    return {"windows": setup.prose_windows, "severities": dict(counts), "first_flag": first_flag, "reasons": reasons,
            "checks": dict(checks), "drop_rate": (float(drops.median()), float(drops.max()))}


# -- detector cost -------------------------------------------------------------------------
def synthetic_windows(rng, gates: Sequence[GateInfo], count: int, tokens: int, alpha: float = 200.0) -> List[Window]:
    """Over-dispersed (Dirichlet-multinomial) routing windows for ``gates``."""
    g, e = len(gates), gates[0].num_experts
    k = gates[0].top_k
    base = rng.dirichlet(np.full(e, 20.0), size=g)  # [G, E] each gate's healthy shares
    out = []
    for i in range(count):
        shares = np.stack([rng.dirichlet(alpha * b) for b in base])  # [G, E]
        counts = np.stack([rng.multinomial(tokens * k, s) for s in shares])  # [G, E]
        sums = np.zeros((g, NUM_SCALARS + e))
        sums[:, TOKENS] = tokens
        sums[:, ENTROPY] = tokens * rng.normal(3.5, 0.02, g)
        sums[:, LOGIT_FINITE] = tokens * e
        sums[:, LOGIT_SUM] = tokens * e * rng.normal(0.0, 0.01, g)
        sums[:, LOGIT_SQSUM] = tokens * e * rng.normal(1.0, 0.01, g)
        sums[:, TOP1] = tokens * rng.normal(0.2, 0.005, g)
        sums[:, NUM_SCALARS:] = shares * tokens
        both = np.zeros((g, 2, e), dtype=np.int64)
        both[:, 0] = counts
        out.append(Window(index=i, t_start=float(i), t_end=float(i + 1), sums=sums, counts=both,
                          absmax=np.full(g, 5.0)))
    return out


def detector_cost(gates_n: int = 64, experts: int = 256, repeats: int = 200, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    gates = [GateInfo(name=f"model.layers.{i}.mlp.gate", num_experts=experts, top_k=8, family="synthetic")
             for i in range(gates_n)]
    base = synthetic_windows(rng, gates, 64, tokens=8192)
    baseline = Baseline.from_frame(windows_frame(base, gates))
    opts = Options()
    start = time.perf_counter()
    detector = BaselineDetector(gates, baseline, opts.ert_windows, opts.persistence)
    calibration = time.perf_counter() - start
    live = synthetic_windows(rng, gates, 20, tokens=8192)
    for w in live[:5]:  # warm up
        detector.update(w, gates)
    times = []
    for i in range(repeats):
        w = live[i % len(live)]
        start = time.perf_counter()
        detector.update(w, gates)
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1e3
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.quantile(ms, 0.9)), "calibration_s": calibration}


# -- report ---------------------------------------------------------------------------------
def fmt(value) -> str:
    return "-" if value is None else str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer windows and trials")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", default=str(pretrained.ASSET_DIR), help="a trained router model")
    parser.add_argument("--shapes-only", action="store_true", help="only the traffic-shape tables")
    parser.add_argument("--skip-shapes", action="store_true", help="everything but the traffic-shape tables")
    parser.add_argument("--shape-seeds", default=None, help="comma-separated seeds of the traffic-shape table")
    parser.add_argument("--shape-windows", type=int, default=None, help="windows per row and seed of the traffic-shape table")
    parser.add_argument("--shape-requests", type=float, default=1.0,
                        help="scale the pools of recorded requests per seed (default 1: 600, 1000, 300 of 64, 128, 512 tokens)")
    parser.add_argument("--no-small-trials", action="store_true", help="traffic shapes: leave out the fault trials")
    parser.add_argument("--small-trials-only", action="store_true", help="traffic shapes: only the fault trials")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = Setup()
    if args.quick:
        setup = Setup(baseline_windows=32, healthy_chunks=96, layers=(1, 2), prose_windows=6, shape_seeds=(0,),
                      shape_windows=2000, shape_requests={64: 200, 128: 400, 512: 120}, small_lengths=(128,))
    if args.shape_seeds is not None:
        setup.shape_seeds = tuple(int(x) for x in args.shape_seeds.split(","))
    if args.shape_windows is not None:
        setup.shape_windows = args.shape_windows
    setup.shape_requests = {k: max(1, int(round(v * args.shape_requests))) for k, v in setup.shape_requests.items()}
    setup.shape_table = not args.small_trials_only
    setup.small_trials = not args.no_small_trials
    started = time.time()
    model, _ = pretrained.load_router_model(directory=Path(args.model_dir))
    per = setup.forwards_per_window
    print(f"model: byte-level MixtralForCausalLM, {model.config.num_hidden_layers} gates x "
          f"{model.config.num_local_experts} experts, top-{model.config.num_experts_per_tok}; "
          f"window = {per} forwards x {setup.batch_size} x {pretrained.SEQ_LEN} = "
          f"{per * setup.batch_size * pretrained.SEQ_LEN} tokens; capacity_factor={CAPACITY_FACTOR}; "
          f"detector defaults: ert_windows={Options().ert_windows:g}, persistence={Options().persistence}")

    if args.shapes_only:
        run_shapes(model, setup, args.seed)
        print(f"total {time.time() - started:.0f} s")
        return 0
    base_chunks, gates = record_chunks(model, "training", setup.baseline_windows * per, setup.batch_size, args.seed)
    baseline = build_baseline(base_chunks, gates, per)
    healthy_chunks, _ = record_chunks(model, "heldout", setup.healthy_chunks, setup.batch_size, args.seed + 1)
    print(f"baseline: {setup.baseline_windows} windows of training-distribution traffic; "
          f"healthy pool: {setup.healthy_chunks} forwards of held-out files ({time.time() - started:.0f} s)")

    for name, gate in baseline.gates.items():
        frame = gate.frame()
        share = gate.expert_counts.sum(0) / gate.expert_counts.sum()
        print(f"  baseline {name}: expert shares {np.round(share, 3).tolist()}, effective experts "
              f"{frame['effective_experts'].median():.2f}, top-1 p {frame['top1_prob_mean'].median():.2f}, "
              f"logit std {frame['logit_std'].median():.2f}, drop rate {frame['drop_rate'].median():.1%}")

    healthy = replay(healthy_chunks, gates, baseline, setup, args.seed + 2)
    live_real = [compose(i, healthy_chunks[i * per:(i + 1) * per]) for i in range(len(healthy_chunks) // per)]
    opts = Options()
    detector = BaselineDetector(gates, baseline, opts.ert_windows, opts.persistence)
    real_alarms = sum(detector.update(w, gates).severity != "ok" for w in live_real)

    trials: List[Trial] = []
    for n, name in enumerate(FAULTS):
        for layer in setup.layers:
            trials.append(run_trial(model, baseline, name, layer, setup, seed=100 + 10 * n + layer))
    prose = run_prose(model, baseline, setup, args.seed + 3, CAPACITY_FACTOR)
    # The baseline counted drops; a monitor without capacity_factor= reports none (0 %), which
    # the detector treats as "not above the baseline", so only the routing checks can fire.
    prose_routing = run_prose(model, baseline, setup, args.seed + 3, None)
    cost = detector_cost()
    elapsed = time.time() - started

    print()
    print("| scenario | windows | result | target | met |")
    print("|---|---|---|---|---|")
    live_healthy = sum(t.healthy_alarms for t in trials)
    live_windows = len(trials) * setup.healthy_before + len(live_real)
    print(f"| healthy, replayed (held-out chunks) | {healthy['windows']} | {healthy['alarms']} false alarms "
          f"({healthy['per_10k']:.1f} per 10,000 windows) | 0 per 10,000 | {'yes' if healthy['alarms'] == 0 else 'NO'} |")
    print(f"| healthy, live (held-out) | {live_windows} | {live_healthy + real_alarms} false alarms | 0 | "
          f"{'yes' if live_healthy + real_alarms == 0 else 'NO'} |")
    for name in FAULTS:
        mine = [t for t in trials if t.fault == name]
        kind, within = TARGETS[name]
        delays = [t.first_collapse if kind == "collapse" else t.first_flag for t in mine]
        missed = sum(d is None or d > setup.fault_windows for d in delays)
        met = all(d is not None and d <= within for d in delays)
        calls = Counter(t.severities[(t.first_flag or 1) - 1] for t in mine)
        delay_text = ", ".join(f"L{t.layer}: {fmt(t.first_flag)}/{fmt(t.first_collapse)}" for t in mine)
        print(f"| {name} | {len(mine)} x {setup.fault_windows} | delay flag/collapse {delay_text}; missed {missed}; "
              f"called {dict(calls)} | {kind} within {within} | {'yes' if met else 'NO'} |")
    for label, run in (("prose domain shift, routing checks (no capacity accounting)", prose_routing),
                       (f"prose domain shift, capacity_factor={CAPACITY_FACTOR}", prose)):
        sev = run["severities"]
        drops = f"; would-be drops {run['drop_rate'][0]:.1%} median, {run['drop_rate'][1]:.1%} max" \
            if run is prose else ""
        print(f"| {label} | {run['windows']} | {sev} (first flag: window {fmt(run['first_flag'])}){drops} | "
              f"never collapse | {'yes' if not sev.get('collapse') else 'NO'} |")
    print(f"| detector cost, 64 gates x 256 experts | 200 | {cost['median_ms']:.2f} ms median, "
          f"{cost['p90_ms']:.2f} ms p90 per window (calibration {cost['calibration_s']:.1f} s once) | < 5 ms | "
          f"{'yes' if cost['median_ms'] < 5 else 'NO'} |")
    print()
    print("first alarm of each fault (one layer each):")
    for name in FAULTS:
        t = next(t for t in trials if t.fault == name)
        print(f"  {name}, layer {t.layer}: {t.severities}; {t.share_note}")
        for reason in t.reasons[:3]:
            print(f"      {reason}")
    down = sum(t.downstream_flagged for t in trials)
    up = sum(t.upstream_flagged for t in trials)
    print(f"faulted windows in which a later gate (fed by the faulted layer) also alarmed: {down}; "
          f"an earlier gate (a false alarm): {up}; of {len(trials) * setup.fault_windows}")
    for label, run in (("routing checks only", prose_routing), (f"capacity_factor={CAPACITY_FACTOR}", prose)):
        print(f"prose ({label}), checks that fired (gate-windows): {run['checks']}")
        if run["reasons"]:
            print("    first alarm: " + " | ".join(run["reasons"]))
    if healthy["checks"]:
        print(f"replayed false alarms by check: {healthy['checks']}")
    print(f"({elapsed:.0f} s)")
    if not args.skip_shapes:
        run_shapes(model, setup, args.seed)
    print(f"total {time.time() - started:.0f} s")
    return 0


SMALL_FAULTS = ("two-expert collapse", "dead expert", "saturation (logits x8)")


def run_shapes(model, setup: Setup, seed: int) -> None:
    """The traffic-shape table, then fault delays with one request per window (a baseline of
    its own: one request per forward pass, as the live requests are)."""
    print()
    started = time.time()
    baseline, gates = shapes.request_baseline(model, setup.baseline_windows, 16, seed + 11, CAPACITY_FACTOR)
    print(f"traffic shapes: baseline of {setup.baseline_windows} windows of 16 training requests of "
          f"{pretrained.SEQ_LEN} tokens, one forward pass each ({time.time() - started:.0f} s)")
    if setup.shape_table:
        results = shapes.shape_table(model, gates, baseline, setup.shape_seeds, setup.shape_windows,
                                     setup.shape_requests, CAPACITY_FACTOR)
        print()
        shapes.print_shape_table(results, setup.shape_seeds)
    if not setup.small_trials:
        return
    started = time.time()
    trials = [shapes.small_window_trial(model, baseline, FAULTS, name, layer, length, setup.small_warmup,
                                        setup.small_limit, seed=500 + 10 * n + layer + length, capacity_factor=CAPACITY_FACTOR)
              for length in setup.small_lengths for n, name in enumerate(SMALL_FAULTS) for layer in setup.layers]
    print()
    shapes.print_small_trials(trials, SMALL_FAULTS)
    print(f"(fault trials with one request per window: {time.time() - started:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
