"""Overhead of moewatch on a Mixtral-shaped model, measured side by side in one run.

Six set-ups run interleaved round by round (so drifting machine load hits them alike):
  none      the model alone
  moewatch  moewatch.attach(model) with its background reader
  naive     a forward hook per gate copying the routing to the host every call (.tolist(),
            as hand-written monitors do)
  router    output_router_logits=True and statistics computed on the host from the outputs
  compiled  torch.compile(model, fullgraph=True) (inductor, static shapes), alone
  comp+mw   the same with moewatch attached before compiling (its ops traced into the graph)

Prefill (batch 8 x 512 tokens) and decode with a static KV cache (transformers' StaticCache, the
cache compiled decoding uses; batch 1, 8, 64), every set-up alike. Prints, per set-up,
tokens/s and the medians of wall time and process CPU time with their ratios to the model alone,
and for moewatch the share of each forward spent inside its hooks (measured in the same forward,
so it does not depend on the machine's load); then host memory after many small monitored forwards.

    python benchmarks/overhead.py                 # the full run (several minutes on 2 cores)
    python benchmarks/overhead.py --quick         # fewer repeats, smaller decode batches
    python benchmarks/overhead.py --no-compiled   # without the two compiled set-ups

Also printed: ATen ops dispatched per gate call with moewatch (eager), from one forward.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import numpy as np
import torch

import moewatch


def mixtral_shaped(hidden: int, layers: int, experts: int, top_k: int, vocab: int, dtype=torch.float32):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 7 // 2,
                           num_hidden_layers=layers, num_attention_heads=hidden // 128,
                           num_key_value_heads=max(1, hidden // 512), num_local_experts=experts,
                           num_experts_per_tok=top_k, max_position_embeddings=4096)
    model = MixtralForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # a learned-looking router: varied, not uniform
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(std=0.05)
    return model


class NaiveHostMonitor:
    """What hand-written monitors do: copy each gate's choices to the host every forward."""

    def __init__(self, model, experts: int):
        self.counts: Dict[str, np.ndarray] = {}
        self.handles = []
        for name, module in model.named_modules():
            if type(module).__name__ == "MixtralTopKRouter":
                self.counts[name] = np.zeros(experts, dtype=np.int64)
                self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, args, output):
            indices = output[2].tolist()
            flat = [e for row in indices for e in row]
            self.counts[name] += np.bincount(flat, minlength=len(self.counts[name]))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def host_router_stats(router_logits, top_k: int) -> None:
    """Statistics from output_router_logits=True, computed on the host."""
    for logits in router_logits:
        p = torch.softmax(logits.float(), dim=-1).numpy()
        top = np.argsort(-p, axis=1)[:, :top_k]
        np.bincount(top.reshape(-1), minlength=p.shape[1])
        -(p * np.log(np.clip(p, 1e-30, None))).sum(axis=1).mean()


def setups(model, experts: int, top_k: int, compiled: bool = True) -> Dict[str, tuple]:
    """name -> (enter, exit, forward kwargs, after-forward callback, the module to call)."""
    state = {}

    def attach_moewatch():
        state["mon"] = moewatch.attach(model, window_tokens=1 << 30, window_seconds=1.0)

    def attach_naive():
        state["naive"] = NaiveHostMonitor(model, experts)

    nothing = (lambda: None, lambda: None)
    cases = {
        "none": (*nothing, {}, None, model),
        "moewatch": (attach_moewatch, lambda: state.pop("mon").detach(), {}, None, model),
        "naive": (attach_naive, lambda: state.pop("naive").remove(), {}, None, model),
        "router": (*nothing, {"output_router_logits": True},
                   lambda out: host_router_stats(out.router_logits, top_k), model),
    }
    if compiled:
        import copy

        # A copy of the model, monitored for the whole run and compiled with the monitor's ops in
        # its graph; the model itself compiled alone (its eager set-ups detach before it traces).
        twin = copy.deepcopy(model)
        # one graph per shape (prefill, each batch's prompt and step): raise Dynamo's limit
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        cases["compiled"] = (*nothing, {}, None, torch.compile(model, fullgraph=True))
        state["twin"] = moewatch.attach(twin, window_tokens=1 << 30, window_seconds=1.0)
        cases["comp+mw"] = (*nothing, {}, None, torch.compile(twin, fullgraph=True))
    return cases


class Clock:
    """Wall and process-CPU seconds of a block. CPU time is far less disturbed than wall time by
    other processes on a shared machine; both are reported."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


class HookTimer:
    """Seconds spent inside moewatch's gate hooks (on the model's thread), summed."""

    def __init__(self):
        from moewatch import hooks

        self.total = 0.0
        self._hooks, self._original = hooks, hooks.GateHook.__call__
        timer = self

        def timed(hook, *args):
            if torch.compiler.is_compiling():  # traced into a graph: nothing to time here
                return timer._original(hook, *args)
            start = time.perf_counter()
            try:
                return timer._original(hook, *args)
            finally:
                timer.total += time.perf_counter() - start

        hooks.GateHook.__call__ = timed

    def close(self):
        self._hooks.GateHook.__call__ = self._original


def time_prefill(model, cases, batch: int, length: int, repeats: int, vocab: int) -> Dict[str, List[tuple]]:
    """(wall, cpu, in-hook) seconds per forward, per set-up."""
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))
    times = {name: [] for name in cases}
    timer = HookTimer()
    try:
        for _ in range(repeats + 1):  # the first round warms up (and compiles) and is dropped
            for name, (enter, leave, kwargs, after, module) in cases.items():
                enter()
                timer.total = 0.0
                with torch.no_grad(), Clock() as clock:
                    out = module(ids, **kwargs)
                    if after:
                        after(out)
                times[name].append((clock.wall, clock.cpu, timer.total))
                leave()
    finally:
        timer.close()
    return {name: t[1:] for name, t in times.items()}


def time_decode(model, cases, batch: int, prompt: int, steps: int, repeats: int, vocab: int) -> Dict[str, List[tuple]]:
    """(wall, cpu, in-hook) seconds per decode step (one token per sequence, static KV cache)."""
    from transformers import StaticCache

    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (batch, prompt), generator=gen)
    times = {name: [] for name in cases}
    timer = HookTimer()
    try:
        for round_ in range(repeats + 2):  # two warm-up rounds: compiled code settles its shapes
            for name, (enter, leave, kwargs, after, module) in cases.items():
                # No attention mask (there is no padding): a static cache's mask is its full length.
                cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 1)
                with torch.no_grad():
                    out = module(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(prompt))
                token = out.logits[:, -1:].argmax(-1)
                enter()
                timer.total = 0.0
                with torch.no_grad(), Clock() as clock:
                    for step in range(steps):
                        out = module(token, past_key_values=cache, use_cache=True,
                                     cache_position=torch.tensor([prompt + step]), **kwargs)
                        if after:
                            after(out)
                        token = out.logits[:, -1:].argmax(-1)
                times[name].append((clock.wall / steps, clock.cpu / steps, timer.total / steps))
                leave()
    finally:
        timer.close()
    return {name: t[2:] for name, t in times.items()}


def report(title: str, times: Dict[str, List[tuple]], tokens: int) -> None:
    """Medians of wall and CPU time, their ratios to the model alone, and moewatch's in-hook share."""
    def med(name, i):
        return statistics.median(t[i] for t in times[name])

    def spread(name, base):
        """median and min-max over rounds of the round's wall ratio to the same round's baseline
        (paired: a round's set-ups ran one after another, under the same machine load)"""
        ratios = [t[0] / b[0] for t, b in zip(times[name], times[base])]
        return statistics.median(ratios), min(ratios), max(ratios)

    print(f"\n{title}")
    print(f"  {'set-up':<10}{'tokens/s':>10}{'wall ms':>10}{'vs base':>9}{'paired: median [min-max]':>27}"
          f"{'cpu ms':>10}{'vs base':>9}{'in hooks':>10}")
    for name in times:
        base = "compiled" if name == "comp+mw" else "none"
        wall, cpu = med(name, 0), med(name, 1)
        share = statistics.median(t[2] / t[0] for t in times[name]) if name == "moewatch" else None
        hooks = f"{share:>9.2%}" if share is not None else f"{'':>9}"
        mid, low, high = spread(name, base)
        print(f"  {name:<10}{tokens / wall:>10.1f}{wall * 1e3:>10.2f}{wall / med(base, 0):>9.3f}"
              f"{f'{mid:.3f} [{low:.3f}-{high:.3f}]':>27}{cpu * 1e3:>10.2f}{cpu / med(base, 1):>9.3f} {hooks}")
    print("  (vs base: moewatch, naive, router and compiled against none; comp+mw against compiled)")


def dispatch_report(model, experts: int, top_k: int) -> None:
    """ATen ops dispatched per gate call by moewatch in eager mode, from one decode-shaped forward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    ids = torch.zeros(8, 1, dtype=torch.long)
    counts = []
    for attached in (False, True):
        mon = moewatch.attach(model, background=False) if attached else None
        with torch.no_grad(), Count() as count:
            model(ids)
        counts.append(count.ops)
        if mon is not None:
            gates = len(mon.gates)
            mon.detach()
    print(f"ATen ops per forward (8 tokens): model alone {counts[0]}, with moewatch {counts[1]}: "
          f"{(counts[1] - counts[0]) / gates:.1f} added per gate call (eager; the reader's batched "
          "reduction runs on its own thread)")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_soak(forwards: int) -> None:
    """Host memory and ring size over many small monitored forwards."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=8, num_experts_per_tok=2)).eval()
    ids = torch.randint(0, 128, (1, 4))
    mon = moewatch.attach(model, window_tokens=256, ring_windows=256)
    marks = {}
    with torch.no_grad():
        for i in range(1, forwards + 1):
            model(ids)
            if i in (forwards // 10, forwards // 2, forwards):
                gc.collect()
                marks[i] = (rss_mib(), mon.windows()["window"].nunique())
    mon.detach()
    print(f"\nhost memory over {forwards:,} small monitored forwards (ring capped at 256 windows)")
    for i, (rss, ring) in marks.items():
        print(f"  after {i:>9,}: RSS {rss:8.1f} MiB, ring {ring} windows")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192,
                        help="vocabulary (default 8192: a smaller LM head than Mixtral's 32000 makes "
                             "the model cheaper, so the overhead ratios are conservative)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--prefill", type=int, nargs=2, default=[8, 512], metavar=("BATCH", "LEN"))
    parser.add_argument("--memory-forwards", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="3 repeats, decode batch 1 and 8, 10k soak")
    parser.add_argument("--no-compiled", dest="compiled", action="store_false",
                        help="leave out the two torch.compile set-ups (their compilation takes minutes)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.decode_batches, args.memory_forwards = 3, [1, 8], 10_000
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"moewatch {moewatch.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads; python {sys.version.split()[0]}")
    model = mixtral_shaped(args.hidden, args.layers, args.experts, args.top_k, args.vocab)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"Mixtral-shaped: hidden {args.hidden}, {args.layers} layers, {args.experts} experts, "
          f"top-{args.top_k}, vocab {args.vocab}, {params:.0f}M parameters, float32; medians of {args.repeats} rounds")
    dispatch_report(model, args.experts, args.top_k)
    cases = setups(model, args.experts, args.top_k, args.compiled)
    vocab = args.vocab
    batch, length = args.prefill
    report(f"prefill {batch} x {length}", time_prefill(model, cases, batch, length, args.repeats, vocab),
           batch * length)
    for b in args.decode_batches:
        t = time_decode(model, cases, b, prompt=32, steps=args.decode_steps, repeats=args.repeats, vocab=vocab)
        report(f"decode, batch {b}, static KV cache (per step)", t, b)
    if args.memory_forwards:
        memory_soak(args.memory_forwards)
    return 0


if __name__ == "__main__":
    sys.exit(main())
