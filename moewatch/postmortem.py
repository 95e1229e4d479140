"""What a monitor keeps for postmortems, and its automatic dumps.

One :class:`Postmortem` per monitor listens to every closed window: it marks where the decision
ring stood (so decisions can be tied to windows), keeps the verdict of each window (the health
timeline a dump carries), and with ``dump_dir=`` writes a dump when gates turn to collapse for
the first time (one dump per window, naming every such gate: the ring is the same for all of
them) and one at clean shutdown (``detach()``, or interpreter exit via ``atexit``).

Automatic dumps run on the thread that closes the window (the reader thread, or the caller of
``flush()``/``detach()``), never inside a forward. A failed automatic dump is counted under
``"dump"`` in ``Monitor.error_counts()`` and logged; it never raises.
"""
from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Iterable, List, Optional, Set

from .dump import DumpError, dump_name, health_record, monitor_table, write_table_atomic
from .health import Health
from .windows import Window

if TYPE_CHECKING:  # pragma: no cover
    from .decisions import DecisionRecorder
    from .monitor import Monitor

DUMP_PREFIX, DUMP_SUFFIX = "moewatch-", ".parquet"
STALE_TEMP_SECONDS = 600.0  # a temporary file this old is left over from a crash


class DumpDirectory:
    """A directory of automatic dumps, kept under ``max_bytes`` in total (oldest removed first).

    Only files named like moewatch dumps are counted or removed; names are generated here, so
    a dump can never land outside the directory.
    """

    def __init__(self, path: str, max_bytes: int):
        self.path = os.path.abspath(os.fspath(path))
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def target(self, reason: str, tag: str = "") -> str:
        name = dump_name(reason, tag)
        path = os.path.join(self.path, name)
        real_dir = os.path.realpath(self.path)
        if os.path.dirname(os.path.realpath(path)) != real_dir or os.path.basename(path) != name:
            raise DumpError(f"dump name {name!r} would leave the dump directory {self.path!r}")
        return path

    def dumps(self) -> List[os.DirEntry]:
        """The complete dumps in the directory, oldest first."""
        with os.scandir(self.path) as entries:
            found = [e for e in entries if e.name.startswith(DUMP_PREFIX) and e.name.endswith(DUMP_SUFFIX)
                     and e.is_file(follow_symlinks=False)]
        return sorted(found, key=lambda e: (e.stat(follow_symlinks=False).st_mtime, e.name))

    def write(self, monitor: "Monitor", reason: str, tag: str = "", trigger: Optional[dict] = None) -> str:
        """Write one dump and prune the directory. Raises on failure (callers count it)."""
        with self._lock:
            os.makedirs(self.path, exist_ok=True)
            path = self.target(reason, tag)
            size = write_table_atomic(monitor_table(monitor, reason, trigger), path)
            if size > self.max_bytes:
                os.unlink(path)
                raise DumpError(f"dump of {size} bytes exceeds dump_max_bytes={self.max_bytes}; not kept")
            self.prune(keep=path)
            return path

    def prune(self, keep: str) -> None:
        """Remove the oldest dumps (never ``keep``) until the total fits; drop stale temp files."""
        now = time.time()
        with os.scandir(self.path) as entries:
            for e in entries:
                if e.name.startswith(".moewatch-") and e.name.endswith(".tmp") and e.is_file(follow_symlinks=False):
                    if now - e.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS:
                        _remove(e.path)
        dumps = self.dumps()
        total = sum(e.stat(follow_symlinks=False).st_size for e in dumps)
        for entry in dumps:
            if total <= self.max_bytes:
                break
            if os.path.abspath(entry.path) == os.path.abspath(keep):
                continue
            size = entry.stat(follow_symlinks=False).st_size
            if _remove(entry.path):
                total -= size


def _remove(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


class Postmortem:
    """Per-monitor window listener: decision marks, health timeline, automatic dumps."""

    def __init__(self, monitor: "Monitor", decisions: Optional["DecisionRecorder"]):
        self._monitor = weakref.ref(monitor)
        self.decisions = decisions
        self.timeline: deque = deque(maxlen=monitor.options.ring_windows)
        self.collapsed: Set[str] = set()  # gates that have been in collapse (one dump each)
        self.directory: Optional[DumpDirectory] = None
        self.written: List[str] = []  # automatic dumps written by this monitor
        self.closed = False
        if monitor.options.dump_dir:
            self.directory = DumpDirectory(monitor.options.dump_dir, monitor.options.dump_max_bytes)
            _AT_EXIT.add(self)
        monitor.add_listener(self.on_window)

    def on_window(self, window: Window, health: Health) -> None:
        if self.decisions is not None:
            self.decisions.mark(window.index)
        self.timeline.append(health_record(window.index, health))
        new = [name for name, gate in health.gates.items()
               if gate.severity == "collapse" and name not in self.collapsed]
        if new:
            self.collapsed.update(new)
            self.auto_dump("collapse", new, {"window": window.index, "gates": new})

    def auto_dump(self, reason: str, gates: Iterable[str] = (), trigger: Optional[dict] = None) -> Optional[str]:
        """Write an automatic dump; failures are counted and logged, never raised."""
        monitor = self._monitor()
        if self.directory is None or monitor is None:
            return None
        gates = list(gates)
        tag = gates[0].replace(".", "_") if gates else ""
        if len(gates) > 1:  # one dump for all the gates of the window; trigger.gates lists them
            tag += f"-and-{len(gates) - 1}-more"
        try:
            path = self.directory.write(monitor, reason, tag, trigger)
        except Exception as error:
            monitor.errors.record("dump", error, where=reason)
            return None
        self.written.append(path)
        return path

    def close(self) -> None:
        """Clean shutdown: the final dump (with ``dump_dir=``). Idempotent."""
        if self.closed:
            return
        self.closed = True
        _AT_EXIT.discard(self)
        self.auto_dump("shutdown")


# Monitors with a dump_dir that are still attached get their shutdown dump at exit.
_AT_EXIT: "weakref.WeakSet[Postmortem]" = weakref.WeakSet()


@atexit.register
def _shutdown_dumps() -> None:
    for post in list(_AT_EXIT):
        monitor = post._monitor()
        try:
            if monitor is not None and monitor.attached:
                monitor.detach()  # closes the last window, then writes the shutdown dump
            else:
                post.close()
        except Exception:  # exit must go on
            pass
