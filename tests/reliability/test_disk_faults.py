"""Dumps onto a full or read-only disk, and a process killed in the middle of a dump.

A failed automatic dump is counted under ``"dump"`` (and exported), never raised into the model;
a manual ``mon.dump()`` raises ``DumpError`` naming the path and the cause; and no file is ever
left under a dump's name that is not a whole dump. The full and read-only disks are real tmpfs
mounts where the test may mount (root with CAP_SYS_ADMIN); the file-size-limit case runs anywhere.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import moewatch
from moewatch.dump import DumpError, DumpFormatError, read_dump
from moewatch.postmortem import STALE_TEMP_SECONDS, DumpDirectory

from conftest import tiny_mixtral
from reliability_helpers import assert_bit_identical, exported, forward

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dump_child.py")


def child(mode: str, directory, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CHILD, mode, str(directory)], capture_output=True, text=True,
                          timeout=timeout)


def mounted_tmpfs(request, path, options: str):
    """A tmpfs at ``path`` with mount ``options``, unmounted after the test; skips where not allowed."""
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'}); "
                    "test_dump_past_the_file_size_limit covers a failing write without privileges")
    request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(path)], capture_output=True))
    return path


def fill(directory) -> None:
    """Write until the file system is full (ENOSPC)."""
    with open(directory / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC


def run_with_failing_dumps(model, directory, why: str) -> None:
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    expected = forward(model, ids)
    before = sorted(os.listdir(directory))
    mon = moewatch.attach(model, background=False, dump_dir=str(directory), model_name="tiny")
    for _ in range(2):
        assert_bit_identical(forward(model, ids), expected)
        mon.flush()
    with pytest.raises(DumpError) as info:
        mon.dump(directory)
    assert str(directory) in str(info.value) and why in str(info.value)
    mon.detach()  # the shutdown dump fails: counted, logged, not raised
    assert mon.error_counts() == {"dump": 1}
    assert why in mon.errors.last()["dump"]
    assert exported(mon, "moewatch_internal_errors_total", component="dump") == 1
    assert sorted(os.listdir(directory)) == before  # no partial file, no temporary file


def test_dump_onto_a_full_disk(request, tmp_path):
    disk = mounted_tmpfs(request, tmp_path / "full", "size=64k")
    fill(disk)
    run_with_failing_dumps(tiny_mixtral(), disk, "No space left on device")


def test_dump_onto_a_read_only_disk(request, tmp_path):
    disk = mounted_tmpfs(request, tmp_path / "ro", "size=1m,ro")
    run_with_failing_dumps(tiny_mixtral(), disk, "Read-only file system")


def test_dump_past_the_file_size_limit(tmp_path):
    """RLIMIT_FSIZE in a child process: every write past 2 KiB fails (EFBIG) half way through."""
    result = child("fsize", tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["identical"] is True
    assert report["errors"] == {"dump": 1} and report["exported"] == 1
    assert "File too large" in report["manual"] and str(tmp_path) in report["manual"]
    assert report["files"] == []


def test_killed_in_the_middle_of_a_dump_leaves_no_file_that_reads_as_whole(tmp_path):
    """SIGKILL while the Parquet file is half written: the final name never appears, the
    half-written temporary file is not a dump to any reader, and a later prune removes it."""
    folder = tmp_path / "dumps"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, CHILD, "stall", str(folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    marker = tmp_path / "stalled"
    try:
        while not marker.exists():  # the child says when half of the file is on disk
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    names = os.listdir(folder)
    assert "killed.parquet" not in names
    (temp,) = names
    assert temp.startswith(".moewatch-") and temp.endswith(".tmp")
    assert 0 < os.path.getsize(folder / temp) == int(marker.read_text())
    with pytest.raises(DumpFormatError):
        read_dump(folder / temp)
    directory = DumpDirectory(str(folder), 10**9)
    assert directory.dumps() == []  # never counted as a dump
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(folder / temp, (old, old))
    directory.prune(keep="")
    assert os.listdir(folder) == []


def test_killed_at_an_arbitrary_moment_of_repeated_dumps(tmp_path):
    """SIGKILL while the child writes dump after dump: every file under a dump's name reads whole."""
    folder = tmp_path / "dumps"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, CHILD, "loop", str(folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        while len([n for n in os.listdir(folder) if n.endswith(".parquet")]) < 3:
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    finals = [n for n in os.listdir(folder) if n.endswith(".parquet")]
    assert len(finals) >= 3
    for name in finals:
        dump = read_dump(folder / name)
        assert len(dump.windows) == 3 * 2 and len(dump.decisions) == 3 * 16 * 2
    for name in set(os.listdir(folder)) - set(finals):  # at most the one in flight
        assert name.startswith(".moewatch-") and name.endswith(".tmp")
        try:
            dump = read_dump(folder / name)
        except DumpFormatError:
            continue  # half a file: refused
        assert len(dump.windows) == 3 * 2  # killed between the last write and the rename: whole
