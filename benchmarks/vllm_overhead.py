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


def child(args) -> None:
    """One engine: start, say READY, then run each workload asked for on stdin; print its result."""
    # before vLLM starts a thread: every thread of the engine (the model's, moewatch's reader) on this core
    os.sched_setaffinity(0, {args.core})
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, skip_tokenizer_init=True, enforce_eager=args.eager, dtype="float32",
              max_model_len=512, max_num_seqs=8, max_num_batched_tokens=2048, seed=0,
              kv_cache_memory_bytes=256 * 2**20, enable_prefix_caching=False)
    if args.variant:  # --split: parts of moewatch's work left out, to tell what each costs
        from moewatch.engines.vllm_plugin import monitors
        from moewatch.hotpath.staged import StagedBank

        StagedBank.stage = lambda self, *a, **k: None  # each gate's op still goes into Python, stages nothing
        if args.variant == "no-hooks":
            for monitor in monitors():
                monitor._masks.banks = None  # the root forward's hooks return at once
    print("READY", flush=True)
    for line in sys.stdin:
        kind = line.strip()
        prompts, max_tokens = _prompts(kind, args.decode_tokens)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False, ignore_eos=True)
        started = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        tokens = sum(len(p) for p in prompts) if kind == "prefill" else sum(len(o.outputs[0].token_ids)
                                                                            for o in outputs)
        print("RESULT " + json.dumps({"kind": kind, "tokens": tokens, "seconds": elapsed}), flush=True)


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
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True, env=env)
        self._expect("READY")

    def _expect(self, prefix: str) -> str:
        for line in self.process.stdout:
            if line.startswith(prefix):
                return line
        raise RuntimeError(f"the engine ended before {prefix}")

    def run(self, kind: str) -> tuple:
        """(tokens, seconds) of one batch of the workload."""
        self.process.stdin.write(kind + "\n")
        self.process.stdin.flush()
        result = json.loads(self._expect("RESULT ")[len("RESULT "):])
        return result["tokens"], result["seconds"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=120)


def measure(engines: Dict[str, "Engine"], kind: str, seconds: float, min_rounds: int) -> Dict[str, List[tuple]]:
    """(tokens, seconds) per engine and round; each round runs every engine once, rotated."""
    names = list(engines)
    for name in names:  # one unmeasured batch each: the first call of a shape
        engines[name].run(kind)
    samples = {name: [] for name in names}
    started = time.perf_counter()
    round_ = 0
    while round_ < min_rounds or time.perf_counter() - started < seconds:
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(engines[name].run(kind))
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
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=("no-stage", "no-hooks"), help=argparse.SUPPRESS)
    args = parser.parse_args()
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
    finally:
        for engine in engines.values():
            engine.close()
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
