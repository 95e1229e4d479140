"""vLLM tokens/s with and without moewatch, compilation on, measured side by side in one run.

Three engines of the same model run at once, each in a process of its own: two plain ("off",
and "off'": the same again, whose ratio to "off" shows what the measurement resolves) and one
with moewatch switched on the way users do it (``MOEWATCH_PORT``, the vLLM plugin). They take
turns, one short batch each, in an order rotated round by round, on two workloads, so that
drifting machine load and another job's bursts hit them alike:

  prefill-heavy  long prompts, one generated token each (tokens/s counts prompt tokens)
  decode-heavy   a few short prompts, generated tokens each (tokens/s counts generated ones)

Rounds go on for ``--seconds`` a workload. Printed per workload and engine: the median tokens/s
and its range, and the median of the round-by-round ratio of its time to the plain engine's with
a 95% confidence interval; then the verdict on the target (moewatch's cost <= 2%: met when the
whole interval is under it, against each plain engine). Every engine runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), where vLLM binds no thread, so each engine's process binds
itself, every thread of it, to the same core (``--core``, the last allowed core unless set), as
vLLM binds a served worker's process to its cores: moewatch's reader shares the core with the
model, it does not run beside it on an idle one. Run with the vLLM venv's python::

    .venv-vllm/bin/python benchmarks/vllm_overhead.py                    # a tiny random Mixtral
    .venv-vllm/bin/python benchmarks/vllm_overhead.py --size mixtral-shaped   # hidden 1024, 280M
    .venv-vllm/bin/python benchmarks/vllm_overhead.py --model DIR --seconds 600
    .venv-vllm/bin/python benchmarks/vllm_overhead.py --eager            # enforce_eager=True
    .venv-vllm/bin/python benchmarks/vllm_overhead.py --split --workloads decode   # what the cost is made of
    .venv-vllm/bin/python benchmarks/vllm_overhead.py --instances 3     # three processes per set-up
    .venv-vllm/bin/python benchmarks/vllm_overhead.py --switch --instances 3   # on and off in one process

``--switch`` compares each monitored process with itself: moewatch's work switched on and off
batch by batch (the reader's CPU time charged to the on batches), beside plain processes; what
the switch leaves on (each gate's op dispatched into Python, the emptied hooks, the step's
wrapper) is timed apart. Processes of one engine differ by a few % for as long as they live,
which the comparison of separate processes cannot tell from moewatch's cost.

Without ``--model`` it writes a random Mixtral (``tests/vllm_models.py``): by default the tests'
tiny one, whose experts are so small that moewatch's per-layer cost weighs far more than on a
real model; ``--size mixtral-shaped`` one of real proportions at a CPU-sized scale. On a CUDA device
vLLM captures CUDA graphs by default; the same script measures that set-up there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

from paired import median_ci, verdict  # benchmarks/paired.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = ("prefill", "decode")


def _prompts(kind: str, decode_tokens: int, vocab: int = 256) -> tuple:
    """(prompts, max_tokens) of a workload; token ids cycle through the vocabulary."""
    if kind == "prefill":
        return [[(7 * i + j) % vocab for j in range(128)] for i in range(2)], 1
    return [[(11 * i + j) % vocab for j in range(8)] for i in range(4)], decode_tokens


class _Switch:
    """moewatch's work in a monitored engine switched on and off between batches (``--switch``).

    Off: each gate's op still goes into Python and returns, the root forward's hooks return at
    once (the ``no-hooks`` variant of ``--split``). On: as attached. The reader reduces the on
    batches' calls when it would (at window cuts, every ``HOLD_CALLS`` calls), which may be
    during an off batch, or between batches while another engine runs: its CPU time is read
    before and after each batch (``charge``), taken off the off batches and added to the next on
    batch, so every second of it counts against moewatch."""

    def __init__(self) -> None:
        from moewatch.engines.vllm_plugin import monitors
        from moewatch.hotpath.staged import StagedBank

        self.monitors = monitors()
        if not self.monitors:
            raise RuntimeError("the engine has no monitor (is MOEWATCH_PORT set?)")
        self.banks = [monitor._masks.banks for monitor in self.monitors]
        from moewatch.engines.vllm import engine_of

        # the engines whose steps begin and end the forwards (VllmEngine.drive_steps), and what they drive
        self.engines = [(engine, list(engine._driven)) for engine in
                        {id(e): e for e in (engine_of(m._model()) for m in self.monitors)}.values()]
        self.staged = [bank for banks in self.banks for bank in banks.banks if isinstance(bank, StagedBank)]
        self.calls = 0  # gate calls while off (each one's op dispatched into Python, nothing staged)
        self.clocks = [time.pthread_getcpuclockid(monitor._reader.ident) for monitor in self.monitors
                       if monitor._reader is not None]  # the reader threads' CPU clocks
        self.carried = 0.0  # reader CPU seconds not yet charged to an on batch
        self.charged = 0.0  # reader CPU seconds in (or charged to) the on batches, per batch
        self.last = self.reader_seconds()  # at the end of the last batch

    def reader_seconds(self) -> float:
        return sum(time.clock_gettime(clock) for clock in self.clocks)

    def charge(self, on: bool, before: float, elapsed: float) -> float:
        """A batch's time with the reader's CPU time moved to on batches (``before``: the readers'
        CPU seconds when the batch began, ``elapsed``: its wall time)."""
        inside = self.reader_seconds() - before
        self.carried += before - self.last  # run between batches, while other engines ran
        self.last = before + inside
        if on:
            self.charged += inside + self.carried  # the reader's share of the on batches' time
            elapsed, self.carried = elapsed + self.carried, 0.0
        else:
            elapsed, self.carried = elapsed - inside, self.carried + inside
        return elapsed

    def _count(self, *args, **kwargs) -> None:
        self.calls += 1

    def set(self, on: bool) -> None:
        self.set_parts(stage=on, hooks=on)

    def set_parts(self, stage: bool, hooks: bool) -> None:
        """``stage``: each gate's op stages its call (else it goes into Python and returns, counted);
        ``hooks``: the root forward's hooks, or the engine's steps, mark the forwards (else the
        hooks return at once and the steps keep their requests alone)."""
        for bank in self.staged:  # the compiled op looks the bank's stage up at every call
            for method in ("stage", "stage_copy"):
                if stage:
                    bank.__dict__.pop(method, None)
                else:
                    setattr(bank, method, self._count)
        for monitor, banks in zip(self.monitors, self.banks):
            monitor._masks.banks = banks if hooks else None
        for engine, driven in self.engines:  # the steps' begin and end of the forward go with the hooks
            engine._driven = list(driven) if hooks else []

    def left_on_seconds(self, calls: int = 20000) -> dict:
        """What the off state still runs, each part timed in a loop (caches warm, so a lower
        bound of its cost in a step): "op" a gate's op dispatched into Python, returning at once
        (a decode step's shapes), per gate call; "step" the step's wrapper (the scheduler's
        requests, four of them) and the root forward's two hooks returning at once (a module's
        call with them less its call without), per step;
        "gates" the gates a step calls."""
        import types

        import torch
        from moewatch.engines.vllm import engine_of

        self.set(False)
        monitor, banks = self.monitors[0], self.banks[0]
        bank, row = banks.banks[0], 0
        logits = torch.randn(4, bank.gates[row].num_experts)  # [T, E]
        indices = torch.zeros(4, bank.gates[row].top_k, dtype=torch.int64)  # [T, k]
        op = torch.ops.moewatch.stage.routing  # what a vLLM router's call compiles to
        started = time.perf_counter()
        for _ in range(calls):
            op(logits, indices, banks.ticks, bank.bank_id, row)
        per_op = (time.perf_counter() - started) / calls
        model = monitor._model()
        engine, masks = engine_of(model), monitor._masks
        step = types.SimpleNamespace(num_scheduled_tokens={str(i): 1 for i in range(4)}, finished_req_ids=set())
        armed, engine.armed = engine.armed, False  # no request of this loop is counted
        started = time.perf_counter()
        for _ in range(calls):
            engine.begin_step(step)  # (off: the requests kept, nothing begun)
        per_step = (time.perf_counter() - started) / calls
        engine.armed = armed
        engine.requests()  # the loop's last step is not the next forward's
        # the root hooks, as the monitor registers them, on a module that does nothing: the
        # difference to the same module without them is what a step's root call pays for them
        probe, x = torch.nn.Identity(), torch.zeros(1)
        for hooked in (False, True):
            if hooked:
                probe.register_forward_pre_hook(masks.pre_hook, with_kwargs=True)
                probe.register_forward_hook(masks.post_hook, with_kwargs=True, always_call=True)
            started = time.perf_counter()
            for _ in range(calls):
                probe(x)
            took = (time.perf_counter() - started) / calls
            per_step += took if hooked else -took
        return {"op": per_op, "step": per_step, "gates": sum(len(b.gates) for b in self.banks for b in b.banks)}


def child(args) -> None:
    """One engine: start, say READY, then run each workload asked for on stdin; print its result."""
    # before vLLM starts a thread: every thread of the engine (the model's, moewatch's reader) on this core
    os.sched_setaffinity(0, {args.core})
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, skip_tokenizer_init=True, enforce_eager=args.eager, dtype="float32",
              max_model_len=512, max_num_seqs=8, max_num_batched_tokens=2048, seed=0,
              kv_cache_memory_bytes=256 * 2**20, enable_prefix_caching=False)
    switch = _Switch() if args.variant == "switch" else None
    if args.variant in ("no-stage", "no-hooks"):  # --split: parts of moewatch's work left out, to tell what each costs
        _Switch().set_parts(stage=False, hooks=args.variant == "no-stage")
    print("READY", flush=True)
    for line in sys.stdin:
        kind, _, state = line.strip().partition(" ")  # state: "on" or "off" (--switch), else ""
        if kind == "left-on":  # --switch: what the off state still runs, timed in loops
            print("RESULT " + json.dumps({"seconds": switch.left_on_seconds()}), flush=True)
            continue
        if switch is not None:
            switch.set(state == "on")
            switch.calls = switch.charged = 0
        prompts, max_tokens = _prompts(kind, args.decode_tokens)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False, ignore_eos=True)
        reader_before = switch.reader_seconds() if switch is not None else 0.0
        started = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        if switch is not None:
            elapsed = switch.charge(state == "on", reader_before, elapsed)
        tokens = sum(len(p) for p in prompts) if kind == "prefill" else sum(len(o.outputs[0].token_ids)
                                                                            for o in outputs)
        result = {"kind": kind, "tokens": tokens, "seconds": elapsed}
        if switch is not None and state == "off":
            result["gate_calls"] = switch.calls
        if switch is not None and state == "on":
            result["reader"] = switch.charged
        print("RESULT " + json.dumps(result), flush=True)


class Engine:
    def __init__(self, model: str, moewatch: bool, eager: bool, port: int, decode_tokens: int, core: int,
                 variant: str = ""):
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        env.pop("MOEWATCH_PORT", None)
        if moewatch:
            env["MOEWATCH_PORT"] = str(port)
        # every engine on the same core: they take turns, and an engine on another core would
        # differ by its core (a first run measured 2.6% between two plain ones)
        argv = [sys.executable, os.path.abspath(__file__), "--child", "--model", model, "--core", str(core),
                "--decode-tokens", str(decode_tokens)] + (["--eager"] if eager else []) \
            + (["--variant", variant] if variant else [])
        self.gate_calls: Dict[str, List[int]] = {}  # (--switch) per workload: gate calls of each batch run off
        # (--switch) per workload: (the reader's CPU seconds, the batch's seconds) of each on batch
        self.reader: Dict[str, List[tuple]] = {}
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True, env=env)
        self._expect("READY")

    def _expect(self, prefix: str) -> str:
        for line in self.process.stdout:
            if line.startswith(prefix):
                return line
        raise RuntimeError(f"the engine ended before {prefix}")

    def run(self, kind: str, state: str = "") -> tuple:
        """(tokens, seconds) of one batch of the workload; ``state``: "on"/"off" (--switch)."""
        self.process.stdin.write(f"{kind} {state}".strip() + "\n")
        self.process.stdin.flush()
        result = json.loads(self._expect("RESULT ")[len("RESULT "):])
        if "gate_calls" in result:
            self.gate_calls.setdefault(kind, []).append(result["gate_calls"])
        if "reader" in result:
            self.reader.setdefault(kind, []).append((result["reader"], result["seconds"]))
        return result["tokens"], result["seconds"]

    def left_on_seconds(self) -> dict:
        """(--switch) What the engine's off state still runs, timed in its process (_Switch)."""
        self.process.stdin.write("left-on\n")
        self.process.stdin.flush()
        return json.loads(self._expect("RESULT ")[len("RESULT "):])["seconds"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=120)


def measure(engines: Dict[str, "Engine"], kind: str, seconds: float, min_rounds: int) -> Dict[str, List[tuple]]:
    """(tokens, seconds) per engine and round; each round runs every engine once, rotated.
    A ``--switch`` engine ("switch#i") runs twice a round, as "on#i" and "emptied#i"."""
    runs = []  # (label, engine, state)
    for name, engine in engines.items():
        if name.split("#")[0] == "switch":
            suffix = name[len("switch"):]
            runs += [("on" + suffix, engine, "on"), ("emptied" + suffix, engine, "off")]
        else:
            runs.append((name, engine, ""))
    for _, engine, state in runs:  # one unmeasured batch each: the first call of a shape
        engine.run(kind, state)
    samples = {label: [] for label, _, _ in runs}
    started = time.perf_counter()
    round_ = 0
    # With a switched engine, a random order each round: run in a fixed order, its second state
    # would always follow its own first (caches warm) and the other engines' batches never would.
    shuffle = random.Random(0).shuffle if len(runs) > len(engines) else None
    while round_ < min_rounds or time.perf_counter() - started < seconds:
        shift = round_ % len(runs)
        order = runs[shift:] + runs[:shift]
        if shuffle is not None:
            shuffle(order)
        for label, engine, state in order:
            samples[label].append(engine.run(kind, state))
        round_ += 1
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a checkpoint directory (default: a random Mixtral of --size)")
    parser.add_argument("--size", choices=("tiny", "mixtral-shaped"), default="tiny",
                        help="without --model: the tests' tiny Mixtral (hidden 64, 2 layers), or a Mixtral of "
                             "real proportions (hidden 1024, experts 2048 wide, 4 layers, 32k vocabulary)")
    parser.add_argument("--seconds", type=float, default=300.0, help="time budget per workload (default 300)")
    parser.add_argument("--min-rounds", type=int, default=10)
    parser.add_argument("--eager", action="store_true", help="enforce_eager=True (default: compilation on)")
    parser.add_argument("--decode-tokens", type=int, default=16,
                        help="tokens generated per request by the decode-heavy workload (4 requests; default "
                             "16: short batches, many rounds)")
    parser.add_argument("--port", type=int, default=19480, help="MOEWATCH_PORT of the monitored engine")
    parser.add_argument("--target", type=float, default=0.02, help="the cost target (default 0.02: 2%%)")
    parser.add_argument("--core", type=int, default=max(os.sched_getaffinity(0)),
                        help="the core every engine's threads are bound to (default: the last allowed one)")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--split", action="store_true",
                        help="two more monitored engines, to tell what moewatch's cost is made of: 'no-stage' "
                             "(each gate's op is dispatched into Python but stages nothing: the reader has "
                             "nothing to reduce) and 'no-hooks' (that, and the root forward's hooks return at once)")
    parser.add_argument("--instances", type=int, default=1, choices=range(1, 9), metavar="N",
                        help="processes per set-up (default 1); each set-up's time per round is the mean of its "
                             "processes', so that two processes of the same engine, which differ by a few %% for "
                             "as long as they live, weigh less in the comparison")
    parser.add_argument("--switch", action="store_true",
                        help="plain engines and monitored ones whose moewatch is switched on and off batch by "
                             "batch: the work switched off is measured inside each process, where no "
                             "process's lasting offset enters (compilation on only)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=("no-stage", "no-hooks", "switch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.switch and (args.eager or args.split):
        parser.error("--switch runs compiled engines (not --eager), and not with --split")
    if args.child:
        child(args)
        return
    if args.model is None:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from vllm_models import mixtral, mixtral_shaped

        write = mixtral if args.size == "tiny" else mixtral_shaped
        args.model = write(os.path.join(tempfile.mkdtemp(prefix="moewatch-bench-"), "mixtral"))
    print(f"model {args.model}, compilation {'off (enforce_eager)' if args.eager else 'on'}, "
          f"{args.seconds:.0f} s per workload, engines taking turns batch by batch, every engine on core {args.core}")
    # each set-up's engines ("off", "off'", "on", the --split variants): --instances processes
    setups = [("off", False, ""), ("off'", False, ""), ("on", True, "")]
    if args.switch:
        setups = [("off", False, ""), ("switch", True, "switch")]
    if args.split:
        setups += [("no-stage", True, "no-stage"), ("no-hooks", True, "no-hooks")]
    engines: Dict[str, Engine] = {}
    ports = iter(range(args.port, args.port + 1000))
    for instance in range(1, args.instances + 1):
        for name, monitored, variant in setups:
            label = name if args.instances == 1 else f"{name}#{instance}"
            engines[label] = Engine(args.model, monitored, args.eager, next(ports) if monitored else args.port,
                                    args.decode_tokens, args.core, variant)
    try:
        measured = {kind: measure(engines, kind, args.seconds, args.min_rounds) for kind in args.workloads}
        if args.switch:
            left_on = {label: engine.left_on_seconds() for label, engine in engines.items()
                        if label.startswith("switch")}
    finally:
        for engine in engines.values():
            engine.close()
    if args.switch:
        report_switch(measured, engines, left_on, args.target)
        return
    results = {kind: pooled(samples, [name for name, _, _ in setups]) for kind, samples in measured.items()}
    print(f"{'workload':<9} {'engine':<9} {'rounds':>6} {'median tok/s':>13} {'min':>9} {'max':>9}"
          f"   time vs off, paired: median [95% CI]")
    for kind, samples in results.items():
        for name, runs in samples.items():
            rates = [tokens / took for tokens, took in runs]
            paired = ""
            if name != "off":
                ratios = [took / base[1] for (_, took), base in zip(runs, samples["off"])]
                paired = "{:.3f} [{:.3f}, {:.3f}]".format(*median_ci(ratios))
            print(f"{kind:<9} {name:<9} {len(runs):>6} {statistics.median(rates):>13.1f} {min(rates):>9.1f} "
                  f"{max(rates):>9.1f}   {paired}")
        if args.instances > 1:  # each process against the pool of plain ones: how far processes differ
            per_process = {}
            for label, runs in measured[kind].items():
                ratios = [took / base[1] for (_, took), base in zip(runs, samples["off"])]
                per_process[label] = median_ci(ratios)
                print(f"{kind:<9}   {label:<9} {len(runs):>4}   time vs the off pool's mean, paired: "
                      "{:.3f} [{:.3f}, {:.3f}]".format(*per_process[label]))
            plain = [mid for label, (mid, _, _) in per_process.items() if label.split("#")[0] in ("off", "off'")]
            monitored = [mid for label, (mid, _, _) in per_process.items() if label.split("#")[0] == "on"]
            mid, low, high = between_processes(monitored, plain)
            print(f"{kind:<9} between processes (each process's median, {len(monitored)} monitored against "
                  f"{len(plain)} plain; Welch): time {mid:.3f} [{low:.3f}, {high:.3f}]; moewatch's cost "
                  f"<= {args.target:.0%}: {verdict(low, high, 1 + args.target)}")
        # against each plain engine; the verdict takes the less favourable of the two
        bounds = [median_ci([on[1] / off[1] for on, off in zip(samples["on"], samples[plain])])
                  for plain in ("off", "off'")]
        low, high = max(b[1] for b in bounds), max(b[2] for b in bounds)
        against = ", ".join(f"against {plain} {mid:.3f} [{lo:.3f}, {hi:.3f}]"
                            for plain, (mid, lo, hi) in zip(("off", "off'"), bounds))
        print(f"{kind:<9} moewatch's cost <= {args.target:.0%}: {verdict(low, high, 1 + args.target)} "
              f"(time {against}; off' against off shows what the run resolves)")


def report_switch(measured: Dict[str, Dict[str, List[tuple]]], engines: Dict[str, "Engine"],
                  left_on: Dict[str, dict], target: float) -> None:
    """--switch: per workload, moewatch's work switched on against off inside each process
    ("on#i" against "emptied#i", round by round), pooled over processes; then what the switch
    leaves on (each gate's op dispatched into Python, the emptied hooks' calls, the step's
    wrapper), from the emptied processes against the plain ones and from its parts timed in loops;
    and the verdict by parts: the pooled interval times one plus that timed share."""
    from scipy import stats

    print(f"{'workload':<9} {'process':<10} {'rounds':>6}   time, moewatch's work on vs off in one process: "
          "median [95% CI]")
    for kind, samples in measured.items():
        labels = sorted(label[len("on"):] for label in samples if label.startswith("on"))  # "#1", ...
        ratios = {suffix: [on[1] / off[1] for on, off in zip(samples["on" + suffix], samples["emptied" + suffix])]
                  for suffix in labels}
        for suffix in labels:
            reader = engines["switch" + suffix].reader[kind]
            share = sum(r for r, _ in reader) / sum(t for _, t in reader)
            print(f"{kind:<9} {'on' + suffix:<10} {len(ratios[suffix]):>6}   "
                  "{:.3f} [{:.3f}, {:.3f}]".format(*median_ci(ratios[suffix])) +
                  f"   (the reader's CPU: {share:.2%} of the on batches' time)")
        # per round, the geometric mean over processes: each process's own ratio, equally weighted
        per_round = [math.exp(statistics.fmean(math.log(r) for r in round_)) for round_ in zip(*ratios.values())]
        mid, low, high = median_ci(per_round)
        print(f"{kind:<9} pooled: work on vs off {mid:.3f} [{low:.3f}, {high:.3f}] over {len(per_round)} rounds; "
              f"<= {target:.0%}: {verdict(low, high, 1 + target)}")
        if len(labels) > 1:
            logs = [math.log(statistics.median(ratios[suffix])) for suffix in labels]
            mean, spread = statistics.fmean(logs), statistics.stdev(logs) / math.sqrt(len(logs))
            half = stats.t.ppf(0.975, len(logs) - 1) * spread
            print(f"{kind:<9} work on vs off between processes (each process's median; t, {len(logs) - 1} "
                  f"dof): {math.exp(mean):.3f} [{math.exp(mean - half):.3f}, {math.exp(mean + half):.3f}]")
        # what the switch leaves on
        pools = pooled(samples, ["off"])["off"]
        per_process = {label: statistics.median(r[1] / base[1] for r, base in zip(runs, pools))
                       for label, runs in samples.items() if label.split("#")[0] in ("off", "emptied")}
        emptied = [v for label, v in per_process.items() if label.startswith("emptied")]
        plain = [v for label, v in per_process.items() if label.startswith("off")]
        if len(emptied) > 1 and len(plain) > 1:
            print(f"{kind:<9} left on when off (emptied against plain processes; Welch): "
                  "{:.3f} [{:.3f}, {:.3f}]".format(*between_processes(emptied, plain)))
        shares = []
        for suffix in labels:
            engine = engines["switch" + suffix]
            seconds = statistics.median(r[1] for r in samples["emptied" + suffix])
            calls = statistics.median(engine.gate_calls[kind])
            parts = left_on["switch" + suffix]
            steps = calls / parts["gates"]
            took = parts["op"] * calls + parts["step"] * steps
            shares.append(took / seconds)
            print(f"{kind:<9} {'emptied' + suffix:<10} left on, timed in loops: {parts['op'] * 1e6:.1f} us an op x "
                  f"{calls:.0f} gate calls + {parts['step'] * 1e6:.1f} us a step x {steps:.0f} steps = "
                  f"{took / seconds:.2%} of the batch's {seconds * 1e3:.1f} ms")
        # by parts: the work's interval (measured) and what the switch leaves on (timed in loops,
        # caches warm: a lower bound of it; the emptied-against-plain line above bounds it by wall time)
        whole = [bound * (1 + max(shares)) for bound in (mid, low, high)]
        print(f"{kind:<9} by parts (work on vs off, pooled, x (1 + left on, timed)): {whole[0]:.3f} "
              f"[{whole[1]:.3f}, {whole[2]:.3f}]; moewatch's cost <= {target:.0%}: {verdict(whole[1], whole[2], 1 + target)}")


def between_processes(monitored: List[float], plain: List[float]) -> tuple:
    """The ratio of the monitored processes' mean time to the plain ones' (each process's median
    ratio to a common base, averaged in logs) with a Welch 95% interval: where processes of one
    engine differ by more than the rounds resolve, this is what a user's next process may see."""
    from scipy import stats

    a, b = [math.log(v) for v in monitored], [math.log(v) for v in plain]
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    diff, half = statistics.fmean(a) - statistics.fmean(b), stats.t.ppf(0.975, dof) * math.sqrt(va + vb)
    return math.exp(diff), math.exp(diff - half), math.exp(diff + half)


def pooled(samples: Dict[str, List[tuple]], setups: List[str]) -> Dict[str, List[tuple]]:
    """Per set-up and round, the mean (tokens, seconds) of its processes ("on#1", "on#2", ...; a
    set-up of one process is its own pool): a process's lasting offset (where its memory lies)
    then weighs 1/N in the set-up's time instead of whole."""
    pools = {}
    for setup in setups:
        members = [runs for label, runs in samples.items() if label == setup or label.startswith(setup + "#")]
        pools[setup] = [(statistics.fmean(r[0] for r in round_), statistics.fmean(r[1] for r in round_))
                        for round_ in zip(*members)]
    return pools


if __name__ == "__main__":
    main()
