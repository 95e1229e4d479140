"""The reader thread runs its tensor ops alone, never on a team of OpenMP threads.

ATen gives every thread that runs tensor ops its own OpenMP team, as many threads as the
model's (``torch.get_num_threads()``), and the reader's batched reductions are big enough to
use it. On a CPU the model's own threads already fill, that team takes cores from the model
at every reduction, and its threads spin after each parallel region. So the reader sets its
own thread's OpenMP thread count to one (``omp_set_num_threads`` is per thread: the model's
threads keep theirs, and torch's global setting is not touched). Best effort: where the
OpenMP runtime cannot be found (another platform, another parallel backend), the reader runs
as before.
"""
from __future__ import annotations

import ctypes
import os
from typing import Optional

import torch

_RUNTIMES = ("libgomp", "libiomp5", "libomp")


def _openmp_runtime() -> Optional[ctypes.CDLL]:
    """The OpenMP runtime loaded in this process (torch's own first), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line and ".so" in line}
    except OSError:  # not Linux
        return None
    found = [p for p in paths if os.path.basename(p).startswith(_RUNTIMES)]
    torch_dir = os.path.dirname(torch.__file__)
    found.sort(key=lambda p: not p.startswith(torch_dir))  # the one torch loaded with it first
    for path in found:
        try:
            library = ctypes.CDLL(path)  # already loaded: the same library, not a second copy
            library.omp_set_num_threads.argtypes = [ctypes.c_int]
            return library
        except (OSError, AttributeError):
            continue
    return None


def run_this_thread_serially() -> bool:
    """Make the calling thread's tensor ops use no other thread; True when it took effect."""
    try:
        # ATen sets a thread's OpenMP count on its first use of it: let that happen first
        if torch.get_num_threads() == 1:
            return True
        runtime = _openmp_runtime()
        if runtime is None:
            return False
        runtime.omp_set_num_threads(1)
        return torch.get_num_threads() == 1
    except Exception:  # noqa: BLE001 (a convenience: never a reason for the reader to fail)
        return False
