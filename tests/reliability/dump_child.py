"""A monitored model in a child process, for dump faults that must not touch the test process.

    python dump_child.py fsize DIR      # file size limit of 2 KiB: every dump write fails
    python dump_child.py stall DIR      # the dump write stops half way (the parent kills it)
    python dump_child.py loop DIR       # writes dumps into DIR until killed

``fsize`` prints one JSON line: the child's outputs were bit-identical, error counts, files in DIR.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time

import pyarrow.parquet as pq
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import moewatch  # noqa: E402
from moewatch.dump import DumpError  # noqa: E402

from conftest import tiny_mixtral  # noqa: E402
from reliability_helpers import assert_bit_identical, exported, forward  # noqa: E402


def _traffic(model, mon, windows: int = 3) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    out = None
    for _ in range(windows):
        out = forward(model, ids)
        mon.flush()
    return out


def fsize(directory: str) -> None:
    model = tiny_mixtral()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    expected = forward(model, ids)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
    mon = moewatch.attach(model, background=False, dump_dir=directory, model_name="tiny")
    identical = True
    try:
        assert_bit_identical(_traffic(model, mon), expected)
    except AssertionError:
        identical = False
    manual = ""
    try:
        mon.dump(directory)
    except DumpError as error:
        manual = str(error)
    mon.detach()  # the shutdown dump fails: counted
    print(json.dumps({"identical": identical, "errors": mon.error_counts(), "manual": manual,
                      "exported": exported(mon, "moewatch_internal_errors_total", component="dump"),
                      "files": sorted(os.listdir(directory))}), flush=True)


class _StallingSink:
    """A file that, after its first writes reached the disk, announces it and stops forever."""

    def __init__(self, real, marker: str):
        self.real = real
        self.marker = marker
        self.calls = 0

    def write(self, data) -> int:
        self.calls += 1
        written = self.real.write(data)
        if self.calls == 3:
            self.real.flush()
            os.fsync(self.real.fileno())
            # written whole, then renamed: the parent may kill this process as soon as the name exists
            with open(self.marker + ".tmp", "w") as fh:
                fh.write(str(os.path.getsize(self.real.name)))
            os.replace(self.marker + ".tmp", self.marker)
            while True:
                time.sleep(1)
        return written

    def __getattr__(self, name):
        return getattr(self.real, name)


def stall(directory: str) -> None:
    model = tiny_mixtral()
    mon = moewatch.attach(model, background=False, sample_decisions=1.0)
    _traffic(model, mon)
    real_write = pq.write_table
    marker = os.path.join(os.path.dirname(directory), "stalled")
    pq.write_table = lambda table, sink, **kw: real_write(table, _StallingSink(sink, marker), **kw)
    mon.dump(os.path.join(directory, "killed.parquet"))


def loop(directory: str) -> None:
    model = tiny_mixtral()
    mon = moewatch.attach(model, background=False, sample_decisions=1.0)
    _traffic(model, mon)
    while True:
        mon.dump(directory)


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"fsize": fsize, "stall": stall, "loop": loop}[sys.argv[1]](sys.argv[2])
