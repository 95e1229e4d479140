"""Would a C++ CPU kernel make the staged op cheaper? The op's call with its record made in C++
against the same record made by a Python implementation, side by side in one run.

    python benchmarks/op_kernel.py                 # 31 rounds, 2,000 calls a set-up a round
    python benchmarks/op_kernel.py --rounds 61 --calls 5000

On CPU each gate call of a compiled model is one ``moewatch::stage.routing`` op whose
implementation is Python (``hotpath/ops.py``): the dispatcher calls back into Python, which
copies the call's logits [T, E] and the router's ids [T, k] and keeps the copies for the reader.
A CPU kernel in C++ would spare the callback. This measures what that is worth, with stand-ins
that do the same work (two copies and a record in a list) registered as ops of their own:

* ``python op``: an op whose implementation is Python (as moewatch's is);
* ``C++ op``: the same op with a C++ kernel (built here with ``torch.utils.cpp_extension``:
  needs a C++ compiler and ninja; about a minute the first time, cached after);
* ``empty python op``: an op whose Python implementation does nothing (the call alone);
* ``copies, no op``: the two copies and the record in plain Python (the work alone).

Each is timed two ways: called from Python in a loop (``torch.ops...``, as the compiled code's
wrapper calls an opaque op on CPU), and inside a ``torch.compile(fullgraph=True)`` function
(a gate's matmul and top-k, then the op) against the same function without the op. Sizes:
a decode call, 4 tokens, 8 experts, top-2; one torch thread. Rounds interleave the set-ups in
a rotating order; it prints per set-up the median microseconds a call over rounds and, against
the python op, the median of the round-by-round differences with a 95% confidence interval.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from paired import median_ci  # noqa: E402

_KERNEL = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
#include <mutex>
#include <vector>

struct Record { int64_t row; at::Tensor logits; at::Tensor ids; };
static std::mutex records_lock;
static std::vector<Record> records;

// logits [T, E], ids [T, k]: copied (the compiled code reuses its buffers), kept for a reader
void stage_routing(const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& token, int64_t bank,
                   int64_t row) {
  at::Tensor logits_copy = logits.clone();
  at::Tensor ids_copy = ids.clone();
  std::lock_guard<std::mutex> hold(records_lock);
  records.push_back(Record{row, std::move(logits_copy), std::move(ids_copy)});
}

int64_t take_records() {
  std::lock_guard<std::mutex> hold(records_lock);
  int64_t taken = static_cast<int64_t>(records.size());
  records.clear();
  return taken;
}

TORCH_LIBRARY(moewatch_bench_cpp, m) {
  m.def("stage_routing(Tensor logits, Tensor indices, Tensor token, int bank, int row) -> ()");
  m.def("take_records() -> int");
}
TORCH_LIBRARY_IMPL(moewatch_bench_cpp, CPU, m) { m.impl("stage_routing", &stage_routing); }
TORCH_LIBRARY_IMPL(moewatch_bench_cpp, CompositeExplicitAutograd, m) { m.impl("take_records", &take_records); }
"""

_SCHEMA = "(Tensor logits, Tensor indices, Tensor token, int bank, int row) -> ()"


def build_cpp_op():
    """The C++ op, or None with the reason printed (no compiler, no ninja)."""
    from torch.utils.cpp_extension import load_inline

    started = time.perf_counter()
    try:
        load_inline("moewatch_bench_op_kernel", cpp_sources=_KERNEL, is_python_module=False, verbose=False)
    except Exception as error:  # a missing compiler or ninja: say so, measure nothing
        print(f"the C++ op could not be built: {type(error).__name__}: {error}", file=sys.stderr)
        return None
    print(f"C++ op built or loaded in {time.perf_counter() - started:.1f} s")
    return torch.ops.moewatch_bench_cpp.stage_routing


_KEEP: list = []  # the libraries registered here: an op's registrations last as long as its library


def python_ops(records: list):
    """The Python-implemented op (two copies and a record) and the empty one."""
    lib = torch.library.Library("moewatch_bench_py", "DEF")
    lib.define("stage_routing" + _SCHEMA)
    lib.define("empty" + _SCHEMA)

    def stage_routing(logits, indices, token, bank, row):
        try:  # as moewatch's: never raise into the model
            records.append((row, logits.clone(), indices.clone()))
        except Exception:
            pass

    lib.impl("stage_routing", stage_routing, "CompositeExplicitAutograd")
    lib.impl("empty", lambda *args: None, "CompositeExplicitAutograd")
    _KEEP.append(lib)
    return torch.ops.moewatch_bench_py.stage_routing, torch.ops.moewatch_bench_py.empty


def declare_opaque(op, lib_name: str, op_name: str) -> None:
    """A fake implementation and a side effect, as moewatch's ops have: compiled code keeps the
    op as one opaque node."""
    lib = torch.library.Library(lib_name, "FRAGMENT")
    torch.library.register_fake(f"{lib_name}::{op_name}", lambda *args: None, lib=lib)
    torch.fx.node.has_side_effect(op.default)
    _KEEP.append(lib)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--calls", type=int, default=2000, help="calls a set-up a round")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cpp_op = build_cpp_op()
    if cpp_op is None:
        return 2
    records: list = []
    py_op, empty_op = python_ops(records)
    declare_opaque(cpp_op, "moewatch_bench_cpp", "stage_routing")
    declare_opaque(py_op, "moewatch_bench_py", "stage_routing")
    declare_opaque(empty_op, "moewatch_bench_py", "empty")

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 8, generator=gen)  # [T, E]
    ids = torch.topk(logits, 2, dim=-1).indices  # [T, k]
    token = torch.zeros(1)
    hidden, weight = torch.randn(4, 64, generator=gen), torch.randn(64, 8, generator=gen)  # [T, H], [H, E]

    def clear() -> None:
        records.clear()
        torch.ops.moewatch_bench_cpp.take_records()

    def copies_alone() -> None:
        records.append((0, logits.clone(), ids.clone()))

    def gate(op):
        def forward(x, w):
            router_logits = x @ w  # [T, E]
            top = torch.topk(router_logits, 2, dim=-1).indices  # [T, k]
            if op is not None:
                op(router_logits, top, token, 1, 0)
            return router_logits + 1, top  # the ids used, as a MoE layer uses them, with or without the op
        return torch.compile(forward, fullgraph=True)

    looped = {"python op": lambda: py_op(logits, ids, token, 1, 0),
              "C++ op": lambda: cpp_op(logits, ids, token, 1, 0),
              "empty python op": lambda: empty_op(logits, ids, token, 1, 0),
              "copies, no op": copies_alone}
    compiled = {name: gate(op) for name, op in
                (("python op", py_op), ("C++ op", cpp_op), ("empty python op", empty_op), ("no op", None))}
    for fn in compiled.values():  # compile now, not in a timed round
        fn(hidden, weight)
        fn(hidden, weight)
    clear()

    def time_loop(call) -> float:
        started = time.perf_counter()
        for _ in range(args.calls):
            call()
        elapsed = time.perf_counter() - started
        clear()
        return elapsed / args.calls * 1e6

    times = {("loop", name): [] for name in looped}
    times.update({("compiled", name): [] for name in compiled})
    keys = list(times)
    for round_number in range(args.rounds):
        shift = round_number % len(keys)
        for key in keys[shift:] + keys[:shift]:
            mode, name = key
            call = looped[name] if mode == "loop" else (lambda fn=compiled[name]: fn(hidden, weight))
            times[key].append(time_loop(call))

    print(f"\n{args.rounds} rounds of {args.calls:,} calls a set-up; microseconds a call (compiled: a gate's "
          "forward with the op)")
    print(f"{'how':9s} {'set-up':16s} {'median':>8s} {'min':>8s}   difference from the python op, paired: "
          "median [95% CI]")
    for mode in ("loop", "compiled"):
        base = times[(mode, "python op")]
        for key in [k for k in keys if k[0] == mode]:
            values = times[key]
            line = f"{mode:9s} {key[1]:16s} {sorted(values)[len(values) // 2]:8.2f} {min(values):8.2f}"
            if key[1] != "python op":
                mid, low, high = median_ci([a - b for a, b in zip(values, base)])
                line += f"   {mid:+.2f} [{low:+.2f}, {high:+.2f}]"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
