"""Placement benchmark: `moewatch placement` on the trained router model (moewatch.pretrained).

    python benchmarks/placement.py            # ~2 min on 2 busy CPU cores
    python benchmarks/placement.py --windows 60

The model has 4 gates x 8 experts, top-2. What it does (docs/placement.md has the results):

1. Traffic: held-out stdlib code (files the model never saw), one window per batch of 8 x 128
   tokens, with sample_decisions=0.25; dumped. The dump's first 2/3 of windows are fitted on,
   the last 1/3 held out (`moewatch.placement.plan`, what the CLI runs).
2. For R = 2 and 4: per gate, the current placement (contiguous: E/R consecutive experts per
   rank) and the proposed one (METIS, E/R per rank, max/mean load <= 1.1 on the fitted windows).
3. Measured on the held-out windows: ranks per token from the sampled decisions (what the CLI
   prints), and from every token: the same held-out batches are run again with the monitor
   attached with expert_placement= set to each placement, and moewatch's own all-to-all count
   (exact for every token, in the hot path) is read back. Max/mean rank load from every token.
4. Limits: the same two placements on a domain shift (English prose), every token.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import moewatch  # noqa: E402
from moewatch import pretrained  # noqa: E402
from moewatch.dump import read_dump  # noqa: E402
from moewatch.placement.plan import placement_json, plan  # noqa: E402
from moewatch.placement.traffic import load_imbalance  # noqa: E402


def live_measure(model, batches, placement_file: str) -> dict:
    """{gate: (ranks per token over every token, max/mean rank load)} under a placement file."""
    with moewatch.attach(model, background=False, window_tokens=10**9, expert_placement=placement_file) as mon:
        with torch.no_grad():
            for ids in batches:
                model(ids)
                mon.flush()
        frame = mon.expert_parallel()
        tokens = mon.windows().groupby("gate")["tokens"].sum()
        counts = mon.counts()
        out = {}
        for gate, rows in frame.groupby("gate"):
            ranks = mon.placement.ranks[gate]
            out[gate] = (rows["alltoall_sends"].sum() / tokens[gate],
                         load_imbalance(counts[gate].astype(float), ranks, mon.placement.num_ranks))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=30, help="windows of 8 x 128 tokens (default 30)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    for var in ("RANK", "LOCAL_RANK"):  # a token's home rank unknown: every rank it needs counts
        os.environ.pop(var, None)
    torch.manual_seed(0)
    start = time.time()
    model, _ = pretrained.load_router_model()
    code = list(pretrained.heldout_batches(batch_size=8, seed=0, count=args.windows))
    prose = list(pretrained.prose_batches(batch_size=8, seed=0, count=max(4, args.windows // 3)))
    tmp = tempfile.mkdtemp(prefix="moewatch-placement-")
    with moewatch.attach(model, background=False, window_tokens=10**9, sample_decisions=0.25) as mon:
        with torch.no_grad():
            for ids in code:
                model(ids)
                mon.flush()
        dump = read_dump(mon.dump(os.path.join(tmp, "code.parquet")))
    print(f"# {args.windows} windows of 8 x 128 tokens of held-out stdlib code; torch threads "
          f"{torch.get_num_threads()}; fitted on windows 0-{args.windows - round(args.windows / 3) - 1}, "
          f"measured on the rest")
    print()
    print("| R | gate | placement | ranks/token, held-out code (sampled) | ranks/token, held-out code "
          "(every token) | max/mean load, held-out code | ranks/token, prose | max/mean load, prose |")
    print("|---|---|---|---|---|---|---|---|")
    summary = {}
    for num_ranks in args.ranks:
        plans = plan(dump, num_ranks, "contiguous", max_imbalance=1.1)
        files = {}
        for label in ("current", "proposed"):
            doc = placement_json(plans, num_ranks)
            if label == "current":
                doc["gates"] = {p.gate: p.current.tolist() for p in plans}
            files[label] = os.path.join(tmp, f"{label}-{num_ranks}.json")
            with open(files[label], "w") as fh:
                json.dump(doc, fh)
        held = code[len(plans[0].fit_windows):]
        live = {label: live_measure(model, held, path) for label, path in files.items()}
        shifted = {label: live_measure(model, prose, path) for label, path in files.items()}
        for p in plans:
            short = p.gate.replace("model.layers.", "layer ").replace(".mlp.gate", "")
            for label, m in (("current", p.held_current), ("proposed", p.held_proposed)):
                every, load = live[label][p.gate]
                prose_volume, prose_load = shifted[label][p.gate]
                print(f"| {num_ranks} | {short} | {label} | {m.ranks_per_token:.3f} | {every:.3f} | {load:.3f} | "
                      f"{prose_volume:.3f} | {prose_load:.3f} |")
                summary.setdefault((num_ranks, label), []).append(every)
    print()
    for num_ranks in args.ranks:
        cur, new = np.mean(summary[(num_ranks, "current")]), np.mean(summary[(num_ranks, "proposed")])
        print(f"R = {num_ranks}: mean over gates, held-out code, every token: {cur:.3f} -> {new:.3f} ranks/token "
              f"({new / cur - 1:+.1%})")
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
