"""After ``os.fork()``: a child's monitor keeps working instead of hanging on an inherited lock.

``fork`` copies a process with only the forking thread alive. A lock that another thread (the
reader, an exporter, a forward on another thread) held at that instant stays held forever in
the child, and the child's first ``flush()``, ``counts()`` or counted error would hang on it.
An ``os.register_at_fork`` handler gives every live monitor in the child new locks and a new
reader thread. Exporter threads are not restarted: a forked child (a DataLoader worker, a
``multiprocessing`` fork) serves no metrics of its own unless it attaches its own monitor.
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import Iterable

_NEW_LOCK = {type(threading.Lock()): threading.Lock, type(threading.RLock()): threading.RLock}
_MONITORS: "weakref.WeakSet" = weakref.WeakSet()


def track(monitor) -> None:
    """Renew ``monitor``'s locks in the children of a fork (for as long as it lives)."""
    _MONITORS.add(monitor)


def renew_locks(objects: Iterable[object]) -> None:
    """Replace every lock held in an attribute of each object by a new, free one of its kind."""
    for obj in objects:
        state = getattr(obj, "__dict__", None)  # objects with __slots__ hold no lock of ours
        if state is None:
            continue
        for name, value in list(state.items()):
            make = _NEW_LOCK.get(type(value))
            if make is not None:
                setattr(obj, name, make())


def _after_fork_in_child() -> None:
    from . import monitor as monitor_module
    from .hotpath import arena, ops

    monitor_module._ATTACH_LOCK = threading.Lock()
    ops._REGISTRY_LOCK = threading.Lock()
    arena.after_fork_in_child()  # the staged copies' arena is the process's, not a monitor's
    for monitor in list(_MONITORS):
        try:
            monitor._after_fork_in_child()
        except Exception:  # a child must never fail because of its monitor
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
