"""Where an eager gate call's host time goes on CUDA. Needs a CUDA device and Triton.

    python benchmarks/gpu_launch_cost.py

In eager mode every gate call runs moewatch's hook on the forward's thread, then launches the
fused kernel; the GPU work is microseconds, so the host time is the cost. Measured per call, on
one gate of the Mixtral-shaped model of ``overhead.py`` (bf16, decode batch 1), medians of
repeated loops (microseconds):

- the whole hook (what a forward pays per gate call);
- the hook with the kernel launch replaced by a no-op (moewatch's own Python);
- the kernel launch alone through Triton's launcher (``kernel[grid](...)``), with the arguments
  the hook passes, recorded from one call;
- the same compiled kernel launched through its compiled handle (``compiled[grid](...)``),
  which skips the argument binding and cache lookup; the two are checked to add the same
  counts (10 launches each);
- for scale: one small torch op (``x.add_(1)``), and an empty Triton kernel of two arguments.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import moewatch  # noqa: E402
from moewatch.hooks import GateHook  # noqa: E402
from moewatch.hotpath import triton_backend as tb  # noqa: E402
from overhead import mixtral_shaped  # noqa: E402


def per_call_us(fn, calls: int = 2000, repeats: int = 5) -> str:
    """Median (and min-max) over ``repeats`` loops of ``calls`` calls, microseconds per call."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    loops = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        loops.append((time.perf_counter() - start) / calls * 1e6)
    return f"{statistics.median(loops):8.1f}  ({min(loops):.1f}-{max(loops):.1f})"


class _Recording:
    """Stands in for the kernel for one call: records its grid and arguments, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> int:
    if not torch.cuda.is_available() or not tb.AVAILABLE:
        print("needs a CUDA device and Triton: nothing measured")
        return 2
    device = torch.device("cuda")
    import triton
    import triton.language as tl

    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, triton {triton.__version__}")
    model = mixtral_shaped(1024, 4, 8, 2, 8192, dtype=torch.bfloat16).to(device)
    mon = moewatch.attach(model, background=False)
    gate = model.model.layers[0].mlp.gate
    hook = next(o for o in gate.forward.observers if isinstance(o, GateHook))
    x = torch.randn(1, 1024, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        out = gate.forward.inner(x)
        print("per gate call, microseconds: median (min-max) of 5 loops of 2000 calls")
        print(f"  hook, whole                    {per_call_us(lambda: hook(gate, (x,), {}, out))}")
        kernel = tb._kernel
        tb._kernel = _NoLaunch()
        try:
            print(f"  hook, launch a no-op           {per_call_us(lambda: hook(gate, (x,), {}, out))}")
            recording = tb._kernel = _Recording(kernel)
            hook(gate, (x,), {}, out)
        finally:
            tb._kernel = kernel
        grid, args, kwargs = recording.calls[0]
        print(f"  Triton launcher, kernel[grid]  {per_call_us(lambda: kernel[grid](*args, **kwargs))}")
        try:
            compiled = kernel.warmup(*args, grid=grid, **kwargs)
            values = list(args) + [kwargs[name] for name in kernel.arg_names[len(args):]]
            direct = compiled[tuple(grid) + (1,) * (3 - len(grid))]  # the handle takes a 3-d grid
            counts = mon._banks.banks[0].counts
            before = counts.clone()
            for _ in range(10):
                kernel[grid](*args, **kwargs)
            torch.cuda.synchronize()
            through_launcher = counts - before
            before = counts.clone()
            for _ in range(10):
                direct(*values)
            torch.cuda.synchronize()
            same = torch.equal(counts - before, through_launcher) and int(through_launcher.sum()) > 0
            print(f"  compiled handle, compiled[grid]{per_call_us(lambda: direct(*values))}"
                  f"   adds the same counts: {same}")
        except Exception as error:  # the handle's API differs between Triton versions
            print(f"  compiled handle: not measured ({type(error).__name__}: {error})")
        y = torch.zeros(16, device=device)
        print(f"  torch op, y.add_(1)            {per_call_us(lambda: y.add_(1))}")

        @triton.jit
        def empty(ptr, n):
            tl.store(ptr + tl.arange(0, 2), tl.zeros([2], tl.float32), mask=tl.arange(0, 2) < n)

        print(f"  empty Triton kernel, 2 args    {per_call_us(lambda: empty[(1,)](y, 0))}")
    mon.detach()
    forward_profile(model, device)
    return 0


def forward_profile(model, device, rounds: int = 10, forwards: int = 100) -> None:
    """A whole eager decode-shaped forward (B = 1), alone and watched, interleaved rounds; then
    where a watched forward's host time goes (cProfile, the top functions by own time)."""
    import cProfile
    import pstats

    ids = torch.randint(0, 8192, (1, 1), device=device)
    times = {"alone": [], "watched": []}
    with torch.no_grad():
        for _ in range(rounds):
            for setup in times:
                mon = moewatch.attach(model, background=False) if setup == "watched" else None
                for _ in range(5):
                    model(ids)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(forwards):
                    model(ids)
                torch.cuda.synchronize()
                times[setup].append((time.perf_counter() - start) / forwards * 1e3)
                if mon is not None:
                    mon.detach()
        ratios = [w / a for w, a in zip(times["watched"], times["alone"])]
        print(f"\neager forward B=1, ms (median of {rounds} interleaved rounds of {forwards}): alone "
              f"{statistics.median(times['alone']):.3f}, watched {statistics.median(times['watched']):.3f}, "
              f"ratio {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
        mon = moewatch.attach(model, background=False)
        for _ in range(5):
            model(ids)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(forwards):
            model(ids)
        torch.cuda.synchronize()
        profile.disable()
        mon.detach()
    print(f"watched forward, cProfile of {forwards} (own time, top 25):")
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    sys.exit(main())
