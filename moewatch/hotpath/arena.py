"""Reusable host buffers for staged copies of big gate calls, mapped apart from malloc's heap.

Holding a prefill-sized gate call's outputs (tens of KB) until the reader reduces them, a few
forwards later, leaves blocks of malloc's heap alive between the forward's large temporaries:
when the reader lets them go, the freed temporaries around them merge into the top of the heap,
glibc's malloc gives it back to the system, and the next forward faults it in again, thousands
of page faults a forward that the model alone does not take (``benchmarks/held_outputs.py``).
Copies in fresh buffers did the same, and so, in one long run, did copies into mapped slots
whose numpy views (their shapes malloc'd) were made per call on the forward's thread: any block
it allocates and the reader frees may do it, however small. So the
forward's thread copies such calls into slots of memory mapped by this arena (anonymous
``mmap``, private to the process), with ``memmove`` from the tensor's data and nothing
allocated per call but Python objects (which live apart from malloc's heap); the reader makes
the numpy views and gives the slots back after the reduction.

One arena serves the whole process (``shared``): the staged banks of every monitor take their
slots from it. So the memory it maps is bounded once for the process, however many monitors it
attaches (an arena per monitor bounded each), and a monitor attached after another (an
evaluation that attaches around each run, a test suite) reuses the slots, and the pages, that
the last one faulted in, where an arena of its own was mapped afresh at every attach (measured
on the Mixtral-shaped model of ``benchmarks/overhead.py``, prefill 4 x 128, the second forward
after an attach: 24 minor page faults for the new slots of its 4 gates; none with the shared
arena). The price: the slots a process has carved stay mapped after its last monitor detaches
(as many as its largest burst of staged prefill calls needed, at most the arena's limit).

A slot's size is a power of two bytes (``MIN_SLOT_BYTES`` at least); freed slots wait on a
stack per size and are reused hottest first. Taking and giving a slot is a ``deque`` pop and
append (atomic: no lock on the forward's path); only carving a new slot from the mapped memory
takes a lock, which steady traffic stops doing once its slots exist.
"""
from __future__ import annotations

import ctypes
import math
import mmap
import threading
from collections import deque
from typing import Dict, Optional, Tuple

import numpy as np
import torch

MIN_SLOT_BYTES = 4096
# Memory mapped at a time (more is mapped as slots are carved, up to the arena's limit).
CHUNK_BYTES = 8 * 2**20
# The dtypes a slot can hold: numpy reads them (bfloat16 it cannot).
NUMPY_DTYPES = {dtype: torch.empty((), dtype=dtype).numpy().dtype for dtype in (
    torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
    torch.bool)}
_memmove = ctypes.memmove

# A copy (what ``copy`` returns, what a staged call holds until the reader reads it):
# (slot, shape, dtype): slot = (uint8 array of the slot's bytes, its address), the tensor's
# torch.Size and torch dtype.


class StagingArena:
    """Slots of anonymous mapped memory for staged copies, reused after the reader reduces them."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.mapped = 0  # bytes mapped so far
        self._free: Dict[int, deque] = {}  # slot bytes -> free slots (uint8 arrays of that size)
        self._chunk: Optional[mmap.mmap] = None
        self._chunk_used = 0
        self._carve = threading.Lock()  # only around carving a new slot (warm-up)
        self._views: Dict[int, tuple] = {}  # slot address -> (shape, dtype, view): its last view
        self.copies_made = 0  # since the arena was made (``+=`` from several threads under the GIL)
        self._carved = 0  # slots carved so far

    def copy(self, tensor: torch.Tensor) -> Optional[tuple]:
        """A copy of a CPU tensor in a slot (see the module docstring), or None where it cannot
        be made: the arena is full, or numpy cannot read the dtype."""
        dtype = tensor.dtype
        if dtype not in NUMPY_DTYPES:
            return None
        nbytes = tensor.nbytes
        size = max(MIN_SLOT_BYTES, 1 << (nbytes - 1).bit_length())
        free = self._free.get(size)
        try:
            slot = free.pop() if free else self._new_slot(size)
        except IndexError:  # another thread took the last free one meanwhile
            slot = self._new_slot(size)
        if slot is None:
            return None
        self.copies_made += 1
        if tensor.is_contiguous():
            _memmove(slot[1], tensor.data_ptr(), nbytes)
        else:  # strided (a view of the padding mask): through numpy, whose views here are transient
            view = slot[0][:nbytes].view(NUMPY_DTYPES[dtype]).reshape(tuple(tensor.shape))
            np.copyto(view, tensor.detach().numpy())
        return (slot, tensor.shape, dtype)

    def view(self, copy) -> np.ndarray:
        """The numpy array of a ``copy`` (the reader's: views made here are not the forward's).
        A slot's last view is kept and returned again for a copy of the same shape and dtype
        (steady traffic: every step's), as making one costs the reader about 2 us."""
        slot, shape, dtype = copy
        last = self._views.get(slot[1])
        if last is not None and last[0] == shape and last[1] is dtype:
            return last[2]
        numpy_dtype = NUMPY_DTYPES[dtype]
        array = slot[0][:math.prod(shape) * numpy_dtype.itemsize].view(numpy_dtype).reshape(tuple(shape))
        self._views[slot[1]] = (shape, dtype, array)
        return array

    def give(self, copy) -> None:
        """Give back the slot of a ``copy`` (its memory is reused: drop every reference to its
        views first); anything else (None, a tensor) is left alone."""
        if type(copy) is not tuple:
            return
        slot = copy[0]
        size = slot[0].nbytes
        free = self._free.get(size)
        if free is None:
            free = self._free.setdefault(size, deque())
        free.append(slot)

    def _new_slot(self, size: int) -> Optional[np.ndarray]:
        with self._carve:
            chunk = self._chunk
            if chunk is None or self._chunk_used + size > len(chunk):
                length = max(CHUNK_BYTES, size)
                if self.mapped + length > self.max_bytes:
                    return None
                # private: a forked child's writes must not land in the parent's slots
                chunk = self._chunk = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                self._chunk_used = 0
                self.mapped += length
            start = self._chunk_used
            self._chunk_used += size
            self._carved += 1
            array = np.frombuffer(chunk, dtype=np.uint8, count=size, offset=start)
            return (array, array.ctypes.data)

    def slots(self) -> Tuple[int, int]:
        """(free slots, bytes mapped): for tests and diagnostics."""
        return sum(len(free) for free in self._free.values()), self.mapped

    def in_use(self) -> int:
        """Slots holding a copy now (carved and not given back): for tests and diagnostics."""
        return self._carved - self.slots()[0]


_SHARED: Optional[StagingArena] = None
_SHARED_LOCK = threading.Lock()


def shared(max_bytes: int) -> StagingArena:
    """The process's arena (see the module docstring), made with ``max_bytes`` at first use."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = StagingArena(max_bytes)
        return _SHARED


def after_fork_in_child() -> None:
    """New locks for the shared arena in a forked child (the parent's may have been held)."""
    from ..forksafety import renew_locks  # every lock the arena holds, as a monitor's are renewed

    global _SHARED_LOCK
    _SHARED_LOCK = threading.Lock()
    if _SHARED is not None:
        renew_locks([_SHARED])
