"""What a file passed in the wrong place is, so that the error can say so.

A Parquet dump and a baseline are both "a file from moewatch"; passing one where the other is
expected is an easy slip (``attach(baseline="incident.parquet")``). Parquet files start with
the magic bytes ``PAR1``: checking them costs one 4-byte read.
"""
from __future__ import annotations

import os

PARQUET_MAGIC = b"PAR1"


def is_parquet(path: "str | os.PathLike") -> bool:
    """True when ``path`` is a readable file that starts like a Parquet file."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == PARQUET_MAGIC
    except OSError:  # missing, a directory, unreadable: the caller's own reader says which
        return False


def refuse_dump_as_baseline(path: "str | os.PathLike") -> None:
    """Raise BaselineError when ``path`` is a Parquet file (a moewatch dump, or another one)."""
    from .baseline import BaselineError

    if not is_parquet(path):
        return
    source = os.fspath(path)
    try:
        from .dump import read_metadata

        read_metadata(source)
    except Exception:  # noqa: BLE001 - any failure: a Parquet file, but not a readable dump
        raise BaselineError(f"{source} is a Parquet file, not a moewatch baseline (a JSON file written by "
                            "Baseline.save() or `moewatch baseline build/record`)") from None
    raise BaselineError(f"{source} is a moewatch dump, not a baseline: build a baseline from it with "
                        f"`moewatch baseline build {source} -o baseline.json` (its healthy windows), "
                        "then pass baseline.json")
