"""The Triton kernels compile for a Hopper GPU (sm_90), on this CPU, without a GPU.

Triton's interpreter (tests/test_triton_kernel.py, tests/test_triton_forward_end.py) runs the
kernels' Python on CPU tensors: it checks what they compute, but never lowers them, so an
operation the compiler rejects (a type it cannot promote, a construct it cannot lower, a
register budget ptxas cannot meet) would first show on a user's GPU. Here every launch those
tests make is recorded instead of run (arguments, compile-time constants, warps, with CUDA's
tile sizes), and each distinct variant is compiled ahead of time for sm_90 with the ptxas that
ships in Triton's wheel, down to a cubin.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HAVE_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = [pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="the interpreter replaces the JIT functions this compiles")]

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
          torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8"}
_OPTIONS = ("num_warps", "num_stages")


class Recorder:
    """Stands in for a JIT function: ``kernel[grid](*args, **kwargs)`` is recorded, not run."""

    def __init__(self):
        self.launches: List[Tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def _signature(fn, args: tuple, kwargs: dict) -> Tuple[Dict[str, str], dict, dict]:
    """Triton's signature of a launch: pointer types from the tensors' dtypes, integer widths
    from the values (as Triton picks them), the keyword arguments as compile-time constants."""
    names = fn.arg_names
    signature, constants, options = {}, {}, {}
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: {type(value).__name__}")
    for name, value in kwargs.items():
        if name in _OPTIONS:
            options[name] = value
        else:
            signature[name] = "constexpr"
            constants[(names.index(name),)] = value
    return signature, constants, options


def _compile_for_hopper(fn, launches) -> int:
    """Compile each distinct recorded variant for sm_90; how many there were."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    seen = set()
    for args, kwargs in launches:
        signature, constants, options = _signature(fn, args, kwargs)
        key = (tuple(signature.items()), tuple(sorted(constants.items())), tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32), options=options)
        assert compiled.asm.get("cubin"), f"no cubin for {constants}"
    return len(seen)


@pytest.fixture(scope="module")
def ptxas():
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not path.exists() and not os.environ.get("TRITON_PTXAS_PATH"):
        pytest.skip("this Triton build ships no ptxas")
    return path


def test_the_gate_kernel_compiles_for_hopper_in_every_tested_variant(ptxas):
    from moewatch.hotpath import triton_backend as tb
    from tests import test_triton_kernel as cases

    recorder, kernel, tiles = Recorder(), tb._kernel, dict(tb._TILE)
    tb._kernel = recorder
    tb._TILE["cpu"] = tb._TILE["cuda"]  # the variants a GPU compiles: CUDA's tiles
    try:
        for number, (name, build) in enumerate(cases.CASES.items()):
            spec = build()
            g = cases._gen(1)
            sums, counts, absmax = cases._accumulators(g)
            cosel, ranks = cases._placement(g, spec["calls"][0]["logits"].shape[1])
            # as a device bank calls it: co-selection always, ranks where experts are placed
            ranks = ranks if number % 2 else None
            for c in spec["calls"]:
                tb.observe(c["logits"], c["indices"], c["probs"], c["dropped"], c["valid"], c["mask"],
                           c["positions"], c["grid"], sums, counts, absmax, c["row"], c["top_k"], c["scoring"],
                           c["capacity_factor"], cosel=cosel, ranks=ranks)
    finally:
        tb._kernel = kernel
        tb._TILE.clear()
        tb._TILE.update(tiles)
    assert len(recorder.launches) >= len(cases.CASES) - 1  # every case with tokens launched
    variants = _compile_for_hopper(tb._observe_kernel, recorder.launches)
    print(f"{variants} variants compiled for sm_90")
    assert variants >= 10


def test_the_forward_end_kernel_compiles_for_hopper(ptxas):
    from moewatch.hotpath import triton_forward_end
    from tests.test_triton_forward_end import make_bank

    recorder, kernel = Recorder(), triton_forward_end._forward_end_kernel
    triton_forward_end._forward_end_kernel = recorder
    try:
        for gates in (1, 5, 64):
            bank = make_bank(gates, 8, 100)
            for pending in (None, (8, 8, 16, 1, True), (8, 64, 0, 8, False)):
                triton_forward_end.forward_end(bank, pending)
    finally:
        triton_forward_end._forward_end_kernel = kernel
    assert _compile_for_hopper(kernel, recorder.launches) == 9
