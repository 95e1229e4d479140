"""Counting, not raising: every failure inside moewatch is recorded here and exported."""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Dict, Optional

log = logging.getLogger("moewatch")


class ErrorLog:
    """Thread-safe counts of internal failures by component, with the last message of each."""

    def __init__(self, log_every_seconds: float = 60.0):
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        self._by_where: Counter = Counter()  # (component, where) -> count, e.g. hook errors per gate
        self._last: Dict[str, str] = {}
        self._last_logged: Dict[str, float] = {}
        self._log_every = log_every_seconds

    def record(self, component: str, error: BaseException, where: Optional[str] = None) -> None:
        message = f"{type(error).__name__}: {error}" + (f" (in {where})" if where else "")
        now = time.monotonic()
        with self._lock:
            self._counts[component] += 1
            if where is not None:
                self._by_where[(component, where)] += 1
            self._last[component] = message
            due = now - self._last_logged.get(component, -1e18) >= self._log_every
            if due:
                self._last_logged[component] = now
        if due:  # rate-limited so a failing hook cannot flood the log of a serving process
            log.warning("moewatch %s error (%d so far): %s", component, self._counts[component], message)

    def counts(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def counts_where(self, component: str) -> Dict[str, int]:
        """{where: count} of ``component``'s failures that named where they happened."""
        with self._lock:
            return {w: n for (c, w), n in self._by_where.items() if c == component}

    def last(self) -> Dict[str, str]:
        with self._lock:
            return dict(self._last)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())
