"""vLLM tokens/s with and without moewatch, compilation on, measured side by side in one run.

Two engines of the same model run at once, each in a process of its own: one plain, one with
moewatch switched on the way users do it (``MOEWATCH_PORT``, the vLLM plugin). They take turns,
round by round, on the same two workloads, so that drifting machine load hits both alike:

  prefill-heavy  many long prompts, one generated token each (tokens/s counts prompt tokens)
  decode-heavy   a few short prompts, many generated tokens each (tokens/s counts generated ones)

Printed per workload: the median tokens/s of each engine over the rounds, the spread (min-max)
and the overhead of moewatch (1 - median on / median off). Run with the vLLM venv's python::

    .venv-vllm/bin/python benchmarks/vllm_overhead.py                    # a tiny random Mixtral
    .venv-vllm/bin/python benchmarks/vllm_overhead.py --size mixtral-shaped   # hidden 1024, 280M
    .venv-vllm/bin/python benchmarks/vllm_overhead.py --model DIR --rounds 9
    .venv-vllm/bin/python benchmarks/vllm_overhead.py --eager            # enforce_eager=True

Without ``--model`` it writes a random Mixtral (``tests/vllm_models.py``): by default the tests'
tiny one, whose experts are so small that moewatch's per-layer cost weighs far more than on a
real model; ``--size mixtral-shaped`` one of real proportions at a CPU-sized scale. On a CUDA device
vLLM captures CUDA graphs by default; the same script measures that set-up there.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = ("prefill", "decode")


def _prompts(kind: str, decode_tokens: int, vocab: int = 256) -> tuple:
    """(prompts, max_tokens) of a workload; token ids cycle through the vocabulary."""
    if kind == "prefill":
        return [[(7 * i + j) % vocab for j in range(192)] for i in range(8)], 1
    return [[(11 * i + j) % vocab for j in range(8)] for i in range(4)], decode_tokens


def child(args) -> None:
    """One engine: start, say READY, then run each workload asked for on stdin; print its result."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, skip_tokenizer_init=True, enforce_eager=args.eager, dtype="float32",
              max_model_len=512, max_num_seqs=8, max_num_batched_tokens=2048, seed=0,
              kv_cache_memory_bytes=256 * 2**20, enable_prefix_caching=False)
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
    def __init__(self, model: str, moewatch: bool, eager: bool, port: int, decode_tokens: int):
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        env.pop("MOEWATCH_PORT", None)
        if moewatch:
            env["MOEWATCH_PORT"] = str(port)
        argv = [sys.executable, os.path.abspath(__file__), "--child", "--model", model,
                "--decode-tokens", str(decode_tokens)] + (["--eager"] if eager else [])
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True, env=env)
        self._expect("READY")

    def _expect(self, prefix: str) -> str:
        for line in self.process.stdout:
            if line.startswith(prefix):
                return line
        raise RuntimeError(f"the engine ended before {prefix}")

    def run(self, kind: str) -> float:
        self.process.stdin.write(kind + "\n")
        self.process.stdin.flush()
        result = json.loads(self._expect("RESULT ")[len("RESULT "):])
        return result["tokens"] / result["seconds"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a checkpoint directory (default: a random Mixtral of --size)")
    parser.add_argument("--size", choices=("tiny", "mixtral-shaped"), default="tiny",
                        help="without --model: the tests' tiny Mixtral (hidden 64, 2 layers), or a Mixtral of "
                             "real proportions (hidden 1024, experts 2048 wide, 4 layers, 32k vocabulary)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per workload (default 7)")
    parser.add_argument("--eager", action="store_true", help="enforce_eager=True (default: compilation on)")
    parser.add_argument("--decode-tokens", type=int, default=192,
                        help="tokens generated per request by the decode-heavy workload (4 requests; default "
                             "192: a run long enough that the machine's jitter averages out)")
    parser.add_argument("--port", type=int, default=19480, help="MOEWATCH_PORT of the monitored engine")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
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
          f"{args.rounds} rounds per workload, engines taking turns")
    engines = {"off": Engine(args.model, False, args.eager, args.port, args.decode_tokens),
               "on": Engine(args.model, True, args.eager, args.port, args.decode_tokens)}
    rates: Dict[str, Dict[str, List[float]]] = {k: {"off": [], "on": []} for k in WORKLOADS}
    try:
        for kind in WORKLOADS:  # one unmeasured round each: the first call of a shape
            for engine in engines.values():
                engine.run(kind)
        for round_ in range(args.rounds):
            for kind in WORKLOADS:
                order = ("off", "on") if round_ % 2 == 0 else ("on", "off")
                for name in order:
                    rates[kind][name].append(engines[name].run(kind))
    finally:
        for engine in engines.values():
            engine.close()
    print(f"{'workload':<10} {'moewatch':<9} {'median tok/s':>13} {'min':>9} {'max':>9}")
    for kind in WORKLOADS:
        for name in ("off", "on"):
            values = rates[kind][name]
            print(f"{kind:<10} {name:<9} {statistics.median(values):>13.1f} {min(values):>9.1f} {max(values):>9.1f}")
        overhead = 1 - statistics.median(rates[kind]["on"]) / statistics.median(rates[kind]["off"])
        paired = [1 - on / off for on, off in zip(rates[kind]["on"], rates[kind]["off"])]
        print(f"{kind:<10} overhead {100 * overhead:+.1f}% (per-round pairs: median {100 * statistics.median(paired):+.1f}%, "
              f"{100 * min(paired):+.1f}% to {100 * max(paired):+.1f}%)")


if __name__ == "__main__":
    main()
