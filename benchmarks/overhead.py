"""Overhead of moewatch on a Mixtral-shaped model, measured side by side in one run.

Set-ups, interleaved forward by forward (so drifting machine load hits them alike):
  none      the model alone
  none'     the model alone again: its ratio to none shows what the measurement resolves
  moewatch  moewatch.attach(model) with its background reader
  naive     a forward hook per gate copying the routing to the host every call (.tolist(),
            as hand-written monitors do)
  router    output_router_logits=True and statistics computed on the host from the outputs, on a
            twin of the model (its modules copied, its weights shared: the hooks transformers
            leaves on a model that was asked for its router logits stay off the model)
  compiled  torch.compile(model, fullgraph=True) (inductor, static shapes), alone; compiled' again
  comp+mw   the same with moewatch attached before compiling (its ops traced into the graph), on
            a twin of the model's modules that shares its weights
  kept      a twin of the model (its modules copied, its weights shared) with moewatch attached
            for the whole run (moewatch attaches and detaches around each of its samples; kept is
            the steady state of a served model); copy  a twin alone, its control; held  kept with
            prefill-sized calls held by reference until the reader reduces them, not copied into
            its arena. Only where --setups names them.

Shapes: prefill (batch 4 x 128 tokens) and one decode step on a static KV cache (transformers'
StaticCache, the cache compiled decoding uses; batch 1, 8, 64). A sample is one forward; each
round runs every set-up once, in a rotating order; rounds go on for ``--seconds`` a shape. Printed
per set-up: tokens/s, the medians of wall and process CPU time, the median of the round-by-round
wall ratio to the model alone with its 95% confidence interval, and the share of each forward
spent inside the monitor's hooks (moewatch's, the naive hook's: measured inside the same forward,
so independent of the machine's load); then moewatch against the naive hook and
output_router_logits pair by pair, the verdict on the target (decode batch 1 and 8 <= 2%,
batch 64 and prefill <= 1%: met when the whole interval is under it), and host memory after many
small monitored forwards.

    python benchmarks/overhead.py                 # the full run (about 30 min on 2 cores)
    python benchmarks/overhead.py --quick         # 30 s a shape, decode batch 1 and 8
    python benchmarks/overhead.py --no-compiled   # without the compiled set-ups
    python benchmarks/overhead.py --no-compiled --decode-batches --setups copy kept held  # prefill, steady state

Also printed: ATen ops dispatched per gate call with moewatch (eager), from one forward.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import threading
import time
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

import moewatch
from paired import median_ci, verdict  # benchmarks/paired.py


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
            self.observe(name, output)
        return hook

    def observe(self, name, output) -> None:
        indices = output[2].tolist()
        flat = [e for row in indices for e in row]
        self.counts[name] += np.bincount(flat, minlength=len(self.counts[name]))

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


# the enter and exit of a set-up that attaches nothing around its samples
NOTHING = (lambda: None, lambda: None)


def setups(model, experts: int, top_k: int, compiled: bool = True, kept: Sequence[str] = ()) -> Dict[str, tuple]:
    """name -> (enter, exit, forward kwargs, after-forward callback, the module to call).

    ``none'`` is the model alone a second time: its ratio to ``none`` is what the measurement
    resolves (an A/A control), read beside every other ratio. ``compiled'`` is the same for the
    compiled model. ``kept`` names which of these to make: ``kept``, a twin of the model
    monitored for the whole run (the steady state of a served model: ``moewatch`` attaches and
    detaches around each of its samples), ``held`` the same with its prefill calls held, and
    ``copy``, a twin alone (:class:`Twins`)."""
    state = {}

    def attach_moewatch():
        state["mon"] = moewatch.attach(model)  # as a user attaches it: the default windows

    def attach_naive():
        state["naive"] = NaiveHostMonitor(model, experts)

    cases = {
        "none": (*NOTHING, {}, None, model),
        "none'": (*NOTHING, {}, None, model),
        "moewatch": (attach_moewatch, lambda: state.pop("mon").detach(), {}, None, model),
        "naive": (attach_naive, lambda: state.pop("naive").remove(), {}, None, model),
        # on a twin: transformers installs hooks that capture the router logits at the first
        # forward that asks for them and leaves them on the model, where every later forward
        # pays for them (0.3-0.5% at decode batch 1), the model alone's included
        "router": (*NOTHING, {"output_router_logits": True},
                   lambda out: host_router_stats(out.router_logits, top_k), sharing_weights(model)),
    }
    if kept:
        global TWINS
        TWINS = Twins(model, cases, kept)
    if compiled:
        # A twin of the model, monitored for the whole run and compiled with the monitor's ops in
        # its graph; the model itself compiled alone (its eager set-ups detach before it traces).
        # The twin's modules are its own (hooks on them leave the model's alone) but its weights
        # are the model's very tensors: copies of the weights land elsewhere in memory and ran
        # 0.98 of the model's time compiled, which would read as the monitor's cost.
        twin = sharing_weights(model)
        # one graph per shape (prefill, each batch's prompt and step): raise Dynamo's limit
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        plain = torch.compile(model, fullgraph=True)
        cases["compiled"] = (*NOTHING, {}, None, plain)
        cases["compiled'"] = (*NOTHING, {}, None, plain)
        state["twin"] = moewatch.attach(twin)
        cases["comp+mw"] = (*NOTHING, {}, None, torch.compile(twin, fullgraph=True))
    return cases


def sharing_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules whose parameters and buffers are ``model``'s own tensors."""
    import copy

    shared = {id(tensor): tensor for tensor in (*model.parameters(), *model.buffers())}
    twin = copy.deepcopy(model, memo=shared)
    assert all(a is b for a, b in zip(twin.parameters(), model.parameters()))
    return twin


# Which set-ups are interleaved together, and the set-up each is compared with.
GROUPS = (("none", "none'", "moewatch", "naive", "router", "copy", "kept", "held"),
          ("compiled", "compiled'", "comp+mw"))
BASE = {"none'": "none", "moewatch": "none", "naive": "none", "router": "none", "copy": "none", "kept": "none",
        "held": "none",
        "compiled'": "compiled", "comp+mw": "compiled"}
KEPT = ("copy", "kept", "held")  # made only where --setups names one (three twins of the model)
# moewatch against the alternatives a user has, pair by pair in the same rounds
VERSUS = (("moewatch", "naive"), ("moewatch", "router"), ("kept", "naive"), ("kept", "held"))
SAVE = None  # --save: a file the raw samples are appended to
READER_SECONDS = 20.0  # --reader-seconds: how long each monitor's reader is timed in steady state
# kept's and held's readers, their CPU seconds a forward in the last shape run: in steady state
# (forwards back to back, as served: what their own code is charged), and over the interleaved
# rounds (each twin runs 2 forwards a round, so its reader's wake-ups while the other set-ups
# run, a fixed cost a second, are charged to few forwards: shown beside, not charged)
READER_A_FORWARD: Dict[str, float] = {}
READER_INTERLEAVED: Dict[str, float] = {}


class Twins:
    """The twins behind the ``copy``, ``kept`` and ``held`` set-ups: the model's modules copied,
    its weights shared (:func:`sharing_weights`); ``kept``'s and ``held``'s monitors attached for
    the whole run, as a served model's is.

    Deep copies of the model ran at their own speed for as long as they lived (where their
    weights landed: in one run a copy alone took 0.95 of the model's time at decode batch 64,
    and a monitored copy 1.10), so a monitored copy against the model measured the copies.
    Twins read the model's own weights: ``copy``, a twin alone, is the control that a twin
    costs nothing by itself. Each monitor's reader thread's CPU time is read from its clock."""

    def __init__(self, model, cases: dict, names: Sequence[str]):
        self.monitors: Dict[str, object] = {}  # referenced for the whole run: attached until it ends
        self._clocks: Dict[str, list] = {}
        for name in (name for name in KEPT if name in names):
            twin = sharing_weights(model)
            cases[name] = (*NOTHING, {}, None, twin)
            if name == "copy":
                continue
            monitor = self.monitors[name] = moewatch.attach(twin)
            if name == "held":  # prefill calls held by reference, not copied into the arena
                for bank in monitor._banks.banks:
                    bank.arena_min_tokens = float("inf")
            self._clocks[name] = HookTimer.monitor_clock(monitor)

    def reader_seconds(self, name: str) -> float:
        """CPU seconds ``name``'s monitor's reader has run since it started."""
        return HookTimer.reader_seconds(self._clocks.get(name, []))


TWINS = None  # the Twins of copy, kept and held, where --setups names one
# set-ups whose own code is timed (HookTimer): the monitors and output_router_logits' extra work
OWN_CODE = ("moewatch", "naive", "router", "kept", "held")


class Clock:
    """Wall and process-CPU seconds of a block, and the process's minor page faults in it. CPU
    time is far less disturbed than wall time by other processes on a shared machine; both are
    reported. Page faults: where the allocator hands a forward's activations back to the system
    and faults them in again (thousands a forward), their count moves its time."""

    def __enter__(self):
        self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.faults


def keep_heap() -> None:
    """Ask glibc's malloc to keep freed memory in the process (no trimming; blocks up to 32 MiB
    from the heap, not from mmap), so that a forward's activations are not faulted in afresh
    every forward. It applies to every set-up alike."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameters (malloc.h)
    if not (libc.mallopt(m_trim_threshold, 2**31 - 1) and libc.mallopt(m_mmap_threshold, 32 * 2**20)):
        raise SystemExit("--keep-heap: mallopt refused the settings (not glibc?)")


class HookTimer:
    """Seconds spent in each monitor's own code on the model's thread, summed: moewatch's hooks
    (the gates' and the root module's), the naive monitor's, and what output_router_logits adds
    that can be timed apart (the load-balancing loss the model then computes, and the host
    statistics; not the recording of the logits inside the model, so a lower bound for it).
    Also the CPU time of a monitor's reader thread (see :meth:`reader_clock`)."""

    def __init__(self):
        from transformers.models.mixtral import modeling_mixtral

        from moewatch import context, hooks

        self.total = 0.0
        self._patched = [(hooks.GateHook, "__call__"), (context.MaskTracker, "pre_hook"),
                         (context.MaskTracker, "post_hook"), (NaiveHostMonitor, "observe"),
                         (modeling_mixtral, "load_balancing_loss_func"),
                         (sys.modules[__name__], "host_router_stats")]
        self._originals = [getattr(owner, name) for owner, name in self._patched]
        for (owner, name), original in zip(self._patched, self._originals):
            setattr(owner, name, self._timed(original))

    def _timed(self, original):
        timer = self

        def timed(*args, **kwargs):
            if torch.compiler.is_compiling():  # traced into a graph: nothing to time here
                return original(*args, **kwargs)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timer.total += time.perf_counter() - start
        return timed

    @staticmethod
    def reader_clock(known) -> list:
        """(CPU clock, its reading now) of every moewatch reader thread not in ``known``."""
        clocks = []
        for thread in threading.enumerate():
            if thread.name == "moewatch-reader" and thread not in known and thread.ident is not None:
                try:
                    clock = time.pthread_getcpuclockid(thread.ident)
                    clocks.append((clock, time.clock_gettime(clock)))
                except (OSError, ProcessLookupError):
                    pass
        return clocks

    @staticmethod
    def monitor_clock(monitor) -> list:
        """(CPU clock, its reading now) of one attached monitor's reader thread, as :meth:`reader_clock`."""
        reader = getattr(monitor, "_reader", None)
        if reader is None or reader.ident is None:
            return []
        clock = time.pthread_getcpuclockid(reader.ident)
        return [(clock, time.clock_gettime(clock))]

    @staticmethod
    def reader_seconds(clocks: list) -> float:
        """CPU seconds the threads of :meth:`reader_clock` have run since it was read."""
        total = 0.0
        for clock, start in clocks:
            try:
                total += time.clock_gettime(clock) - start
            except OSError:  # the thread has ended
                pass
        return total

    def close(self):
        for (owner, name), original in zip(self._patched, self._originals):
            setattr(owner, name, original)


def interleave(cases, names, forward: Callable, seconds: float, min_rounds: int, max_rounds: int):
    """Samples of one forward per set-up and round, each bracketed by the base set-up.

    ``names[0]`` is the base (the model alone). A round is a chain: base, then for every other
    set-up (in an order rotated round by round) attach it, one untimed forward of it, one timed
    forward, detach, and the base again. So every timed sample has a base sample on each side
    (two and one forwards away): the machine's slow drift (its forward times are strongly
    correlated from one forward to the next) cancels in the ratio of a sample to the geometric
    mean of its two brackets, and every set-up, the A/A control included, is timed in the same
    position. Rounds go on until ``seconds`` have passed (at least ``min_rounds``).

    Per set-up and round: (wall, cpu, own code, bracket wall, bracket cpu) seconds, and the
    sample's minor page faults; own code is the time of the monitor's code on the forward's
    thread (see :class:`HookTimer`)."""
    base, others = names[0], list(names[1:])
    times = {name: [] for name in names}
    timer = HookTimer()
    # kept's and held's readers: their CPU time while the group runs, over every forward of
    # their set-up (timed or not), is their readers' cost a forward
    readers = {name: TWINS.reader_seconds(name) for name in ("kept", "held") if name in names}
    forwards = {name: 0 for name in readers}
    started = time.perf_counter()

    def timed(name):
        enter, leave, kwargs, after, module = cases[name]
        timer.total = 0.0
        with Clock() as clock:
            forward(module, kwargs, after)
        return clock.wall, clock.cpu, timer.total, clock.faults

    try:
        for round_ in range(max_rounds + 1):  # round 0 warms up (and compiles) and is dropped
            if round_ > min_rounds and time.perf_counter() - started > seconds:
                break
            shift = round_ % len(others)
            before = timed(base)
            for name in others[shift:] + others[:shift]:
                enter, leave, kwargs, after, module = cases[name]
                enter()
                forward(module, kwargs, after)  # untimed: a monitor's first forward sets up its state
                sample = timed(name)
                if name in forwards:
                    forwards[name] += 2
                leave()
                after_sample = timed(base)
                if round_:
                    bracket = [(b * a) ** 0.5 for b, a in zip(before[:2], after_sample[:2])]
                    times[name].append((*sample[:3], *bracket, sample[3]))
                    times[base].append((*before[:3], *before[:2], before[3]))
                before = after_sample
    finally:
        timer.close()
    for name, before in readers.items():  # the reader's CPU a forward, charged to each sample
        READER_INTERLEAVED[name] = (TWINS.reader_seconds(name) - before) / max(1, forwards[name])
    return times


def reader_cost(cases, forward: Callable, seconds: float, min_forwards: int = 20) -> float:
    """CPU seconds a forward of moewatch's work off the forward's thread, in steady state: one
    monitor attached and two untimed forwards (its reader thread starts meanwhile), then
    forwards for ``seconds`` and at least ``min_forwards`` (several windows: their cuts, closes
    and verdicts included) with the reader thread's CPU time, and the detach (its last flush
    reduces what the reader had not), divided by those forwards. The attach and the reader's
    start are one-offs, not a forward's cost."""
    enter, leave, kwargs, after, module = cases["moewatch"]
    known = set(threading.enumerate())
    enter()
    for _ in range(2):
        forward(module, kwargs, after)
    clocks = HookTimer.reader_clock(known)
    forwards = back_to_back(forward, module, kwargs, after, seconds, min_forwards)
    spent = HookTimer.reader_seconds(clocks)
    leave_started = time.thread_time()
    leave()
    return (spent + time.thread_time() - leave_started) / forwards


def kept_reader_cost(cases, name: str, forward: Callable, seconds: float, min_forwards: int = 20) -> float:
    """CPU seconds a forward of ``name``'s (kept's, held's) reader in steady state: its twin,
    monitored since the run began, runs forwards back to back for ``seconds`` (at least
    ``min_forwards``), as a served model does; its reader thread's CPU time over them, and a
    flush on this thread of what the reader had not reduced yet (up to a look's 5 s of forwards),
    are divided by them (as :func:`reader_cost` does for ``moewatch``, whose detach flushes)."""
    module, kwargs, after = cases[name][4], cases[name][2], cases[name][3]
    forward(module, kwargs, after)  # untimed: the twin's first forward after the other set-ups' rounds
    before = TWINS.reader_seconds(name)
    forwards = back_to_back(forward, module, kwargs, after, seconds, min_forwards)
    spent = TWINS.reader_seconds(name) - before
    flush_started = time.thread_time()
    TWINS.monitors[name].flush()
    return (spent + time.thread_time() - flush_started) / forwards


def back_to_back(forward: Callable, module, kwargs, after, seconds: float, min_forwards: int) -> int:
    """Run forwards of ``module`` one after the other for ``seconds``, at least ``min_forwards``;
    returns how many ran."""
    forwards, started = 0, time.perf_counter()
    while forwards < min_forwards or time.perf_counter() - started < seconds:
        forward(module, kwargs, after)
        forwards += 1
    return forwards


def prefill_forward(batch: int, length: int, vocab: int) -> Callable:
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))

    def forward(module, kwargs, after):
        with torch.no_grad():
            out = module(ids, **kwargs)
            if after:
                after(out)
    return forward


def decode_forward(model, batch: int, prompt: int, vocab: int) -> Callable:
    """One decode step (one token per sequence) on a static KV cache holding ``prompt`` tokens,
    rewound before each step: every step does the same work, whatever ran before it."""
    from transformers import StaticCache

    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(2))
    # No attention mask (there is no padding): a static cache's mask is its full length.
    cache = StaticCache(config=model.config, max_cache_len=prompt + 2)
    with torch.no_grad():
        token = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    position = torch.tensor([prompt])

    def forward(module, kwargs, after):
        for layer in cache.layers:  # back to the prompt: the step writes the same slot again
            layer.cumulative_length.fill_(prompt)
        with torch.no_grad():
            out = module(token, past_key_values=cache, use_cache=True, cache_position=position, **kwargs)
            if after:
                after(out)
    return forward


def report(title: str, times: Dict[str, List[tuple]], tokens: int, target: float, reader: float) -> None:
    """Per set-up: tokens/s, medians of wall and CPU time, the ratio of each sample to its two
    base brackets (median and 95% confidence interval, wall and CPU), and the time of the
    monitor's own code; then moewatch against the naive hook and output_router_logits, pair by
    pair, by wall time and by the time of each one's own code (moewatch's: its hooks, plus
    ``reader``, its steady-state work off the forward's thread a forward; kept's and held's: their
    hooks, plus their reader's in steady state, :func:`kept_reader_cost`), and the verdicts on
    the target."""
    readers = dict(READER_A_FORWARD, moewatch=reader)  # each monitor's reader CPU a forward
    own_code = {name: [t[2] + readers.get(name, 0.0) for t in samples] for name, samples in times.items()}
    rounds = min(len(t) for t in times.values())
    print(f"\n{title}: {rounds} rounds, one forward a sample, each between two of its base")
    print(f"  {'set-up':<10}{'tokens/s':>10}{'wall ms':>10}{'wall vs base [95% CI]':>26}"
          f"{'cpu ms':>10}{'cpu vs base [95% CI]':>26}{'own code':>10}{'faults':>9}")
    paired = {}
    for name, samples in times.items():
        wall = statistics.median(t[0] for t in samples)
        cpu = statistics.median(t[1] for t in samples)
        ratio = cpu_ratio = own = ""
        if name in BASE:
            paired[name] = median_ci([t[0] / t[3] for t in samples])
            ratio = "{:.3f} [{:.3f}, {:.3f}]".format(*paired[name])
            cpu_ratio = "{:.3f} [{:.3f}, {:.3f}]".format(*median_ci([t[1] / t[4] for t in samples]))
        if name in OWN_CODE:
            own = f"{statistics.median(o / t[0] for o, t in zip(own_code[name], samples)):.3%}"
        faults = statistics.median(t[5] for t in samples)
        print(f"  {name:<10}{tokens / wall:>10.1f}{wall * 1e3:>10.2f}{ratio:>26}{cpu * 1e3:>10.2f}"
              f"{cpu_ratio:>26}{own:>10}{faults:>9.0f}")
    print("  (base: none for the eager set-ups, compiled for comp+mw; none' and compiled' are the base "
          "again, timed as the others: what the measurement resolves; copy: a twin of the model alone (its "
          "modules copied, its weights shared), kept: a twin monitored the whole run (held: its prefill calls "
          "held, not copied). Own code: the monitor's time a "
          f"forward as a share of the forward; moewatch's includes its reader's, {reader * 1e6:.0f} us a "
          "forward in steady state" + "".join(
              f", {name}'s {readers[name] * 1e6:.0f} us (charged over the interleaved rounds: "
              f"{READER_INTERLEAVED[name] * 1e6:.0f} us)" for name in KEPT
              if name in readers and name in READER_INTERLEAVED and name in times) +
          "; router's is a lower bound. Faults: the process's minor page faults a forward, median)")
    for name, other in VERSUS:
        if name in times and other in times:
            mine, theirs = times[name], times[other]
            mid, low, high = median_ci([(t[0] / t[3]) / (o[0] / o[3]) for t, o in zip(mine, theirs)])
            line = f"  {name} / {other}: wall {mid:.3f} [{low:.3f}, {high:.3f}]: {_cheaper(low, high)}"
            mid, low, high = median_ci([m / o for m, o in zip(own_code[name], own_code[other]) if o > 0])
            spent = [statistics.median(own_code[n]) * 1e6 for n in (name, other)]
            line += (f"; own code {spent[0]:.0f} us vs {spent[1]:.0f} us a forward, "
                     f"{mid:.3f} [{low:.3f}, {high:.3f}]: {_cheaper(low, high)}")
            print(line)
    for name, control in (("moewatch", "none'"), ("kept", "copy"), ("held", "copy"), ("comp+mw", "compiled'")):
        if name not in paired:
            continue
        # against the A/A control too: it sits where the monitor does in the chain, so a bias of
        # the position (a timed forward right after one of its own) cancels; the verdict takes
        # the less favourable of the two comparisons
        intervals = {"base": paired[name]}
        if control in times:
            intervals[control] = median_ci([(t[0] / t[3]) / (c[0] / c[3])
                                            for t, c in zip(times[name], times[control])])
        verdicts = {verdict(low, high, target) for _, low, high in intervals.values()}
        final = verdicts.pop() if len(verdicts) == 1 else "not resolved"
        shown = "; ".join(f"vs {k} {m:.3f} [{lo:.3f}, {hi:.3f}]" for k, (m, lo, hi) in intervals.items())
        print(f"  target {name} <= {target:.2f}x: {final} ({shown})")


def _cheaper(low: float, high: float) -> str:
    return "cheaper" if high < 1 else ("dearer" if low > 1 else "not resolved")


def run_shape(title: str, cases, forward: Callable, tokens: int, target: float, seconds: float,
              min_rounds: int, max_rounds: int) -> None:
    times = {}
    READER_A_FORWARD.clear()
    READER_INTERLEAVED.clear()
    groups = [[n for n in group if n in cases] for group in GROUPS]
    groups = [g for g in groups if len(g) > 1]  # a base with nothing to compare is not run
    total = sum(len(g) for g in groups)
    for group in groups:  # the time budget is shared by the groups, by their number of set-ups
        times.update(interleave(cases, group, forward, seconds * len(group) / total, min_rounds, max_rounds))
    reader = reader_cost(cases, forward, seconds=READER_SECONDS) if "moewatch" in cases else 0.0
    for name in READER_INTERLEAVED:
        READER_A_FORWARD[name] = kept_reader_cost(cases, name, forward, READER_SECONDS)
    report(title, times, tokens, target, reader)
    if SAVE:
        import json

        with open(SAVE, "a") as out:  # one line a shape: every sample, for analyses of one's own
            out.write(json.dumps({"shape": title, "reader": reader, "readers": READER_A_FORWARD,
                                  "readers_interleaved": READER_INTERLEAVED,
                                  "samples": times}) + "\n")


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
    parser.add_argument("--seconds", type=float, default=300.0,
                        help="time budget of each shape (rounds go on until it is spent)")
    parser.add_argument("--min-rounds", type=int, default=20)
    parser.add_argument("--max-rounds", type=int, default=2000)
    parser.add_argument("--decode-batches", type=int, nargs="*", default=[1, 8, 64],
                        help="decode batch sizes (none: prefill only)")
    parser.add_argument("--prompt", type=int, default=32, help="tokens in the KV cache of a decode step")
    parser.add_argument("--prefill", type=int, nargs=2, default=[4, 128], metavar=("BATCH", "LEN"))
    parser.add_argument("--memory-forwards", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true",
                        help="30 s a shape, 10 rounds at least, decode batch 1 and 8, 10k-forward soak")
    parser.add_argument("--no-compiled", dest="compiled", action="store_false",
                        help="leave out the compiled set-ups (their compilation takes minutes)")
    parser.add_argument("--setups", nargs="+", metavar="NAME",
                        help="only these set-ups beside the bases (none, compiled), e.g. \"none'\" "
                             "moewatch: more rounds a second, for a narrower interval on one target; "
                             "copy, kept and held (twins of the model, monitored the whole run) only when named")
    parser.add_argument("--no-prefill", dest="prefill_run", action="store_false", help="skip the prefill shape")
    parser.add_argument("--keep-heap", action="store_true",
                        help="glibc malloc keeps freed memory (no page faults a forward; every set-up alike)")
    parser.add_argument("--reader-seconds", type=float, default=20.0,
                        help="seconds of forwards back to back over which each monitor's reader is timed "
                             "in steady state (moewatch's, kept's, held's)")
    parser.add_argument("--save", metavar="FILE", help="append every sample to FILE (JSON, a line a shape)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.min_rounds, args.decode_batches, args.memory_forwards = 30.0, 10, [1, 8], 10_000
    global SAVE, READER_SECONDS
    SAVE, READER_SECONDS = args.save, args.reader_seconds
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_heap:
        keep_heap()
    print(f"moewatch {moewatch.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads; python {sys.version.split()[0]}"
          + ("; malloc keeps freed memory (--keep-heap)" if args.keep_heap else ""))
    model = mixtral_shaped(args.hidden, args.layers, args.experts, args.top_k, args.vocab)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"Mixtral-shaped: hidden {args.hidden}, {args.layers} layers, {args.experts} experts, "
          f"top-{args.top_k}, vocab {args.vocab}, {params:.0f}M parameters, float32; "
          f"{args.seconds:.0f} s a shape")
    dispatch_report(model, args.experts, args.top_k)
    cases = setups(model, args.experts, args.top_k, args.compiled,
                   kept=[name for name in KEPT if name in (args.setups or ())])
    if args.setups:
        unknown = set(args.setups) - set(cases)
        if unknown:
            parser.error(f"unknown set-ups {sorted(unknown)}; choose from {sorted(cases)}")
        cases = {name: case for name, case in cases.items() if name in args.setups or name not in BASE}
    budget = (args.seconds, args.min_rounds, args.max_rounds)
    batch, length = args.prefill
    if args.prefill_run:
        run_shape(f"prefill {batch} x {length}", cases, prefill_forward(batch, length, args.vocab),
                  batch * length, 1.01, *budget)
    for b in args.decode_batches:
        run_shape(f"decode, batch {b}, static KV cache of {args.prompt} tokens (one step)", cases,
                  decode_forward(model, b, args.prompt, args.vocab), b, 1.02 if b <= 8 else 1.01, *budget)
    if args.memory_forwards:
        memory_soak(args.memory_forwards)
    return 0


if __name__ == "__main__":
    sys.exit(main())
