"""Property-based fuzzing of everything that reads a file moewatch may not have written.

Hypothesis mutates a real baseline and a real dump -- a field replaced by any JSON value, a key
removed, a column replaced by another type or with nulls, bytes flipped, inserted or cut -- and
feeds the result to ``Baseline.load``, ``read_dump``, ``moewatch report`` and ``moewatch baseline
build``. The properties: only the documented errors (``BaselineError``, ``DumpFormatError``; exit
code 2 from the commands, one line on stderr), no call past its time limit, and the process's
peak memory bounded over the whole run. The budget is fixed (examples, not time), so the run
takes well under a minute; ``MOEWATCH_FUZZ_EXAMPLES`` raises it for a longer campaign.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moewatch
from moewatch.baseline import Baseline, BaselineError
from moewatch.cli import main
from moewatch.dump import METADATA_KEY, DumpFormatError, read_dump

from reliability_helpers import ToyMoE, forward

EXAMPLES = int(os.environ.get("MOEWATCH_FUZZ_EXAMPLES", "0")) or None
SECONDS_PER_CALL = 20  # a call that takes longer counts as a hang
PEAK_MIB = 512  # growth of the process's peak resident memory over the whole fuzz run


def _status(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return 0.0


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def fire(signum, frame):
        raise Hang(f"a call ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def memory_watch():
    """Peak resident memory must not grow past PEAK_MIB over the module's fuzz runs."""
    if not os.path.exists("/proc/self/clear_refs"):
        yield
        return
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    start = _status("VmRSS")
    yield
    assert _status("VmHWM") - start < PEAK_MIB, f"peak memory grew {_status('VmHWM') - start:.0f} MiB"


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """A real baseline (as file text) and a real dump (its table and metadata)."""
    folder = tmp_path_factory.mktemp("originals")
    model = ToyMoE()
    with moewatch.attach(model, gates="routers.*", top_k=2, background=False, model_name="toy",
                         window_tokens=10, sample_decisions=0.5) as mon:
        for seed in range(10):
            forward(model, torch.randn(1, 10, 8, generator=torch.Generator().manual_seed(seed)))
            mon.flush()
        mon.baseline().save(folder / "baseline.json")
        dump = mon.dump(str(folder / "dump.parquet"))
    table = pq.read_table(dump)
    return {"baseline": (folder / "baseline.json").read_text(), "table": table,
            "meta": json.loads(table.schema.metadata[METADATA_KEY])}


# -- strategies ----------------------------------------------------------------------------
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.sampled_from([0, -1, 1, 10 ** 30, 2 ** 53, 2 ** 63, 10 ** 400]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", "\udce9", "routers.g0", "window", "collapse"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                      max_leaves=12)


def paths(tree, prefix=()):
    """Every (path) in a JSON tree, parents before children."""
    yield prefix
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from paths(value, prefix + (key,))
    elif isinstance(tree, list):
        for i, value in enumerate(tree[:6]):  # a few items of long lists is enough
            yield from paths(value, prefix + (i,))


def mutate_tree(data: st.DataObject, tree):
    """One to three edits at random places: replace with any value, delete, or duplicate."""
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        where = data.draw(st.sampled_from(list(paths(tree))[1:] or [()]), label="path")
        if not where:
            return data.draw(VALUES, label="root")
        parent = tree
        for step in where[:-1]:
            parent = parent[step]
        key = where[-1]
        action = data.draw(st.sampled_from(["replace", "delete", "duplicate"]), label="action")
        if action == "replace":
            parent[key] = data.draw(VALUES, label="value")
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, list):
            parent.append(parent[key])
        else:
            parent[key + "_"] = parent[key] if isinstance(key, str) else None
    return tree


def mutate_bytes(data: st.DataObject, raw: bytes) -> bytes:
    """Flip, insert (brackets among them), cut: byte-level damage anywhere."""
    raw = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4), label="byte edits")):
        if not raw:
            break
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        kind = data.draw(st.sampled_from(["flip", "insert", "cut", "truncate"]), label="kind")
        if kind == "flip":
            raw[at] ^= data.draw(st.integers(1, 255), label="mask")
        elif kind == "insert":
            raw[at:at] = data.draw(st.sampled_from([b"[" * 5000, b"{", b"]", b"NaN", b"-Infinity", b'"\\ud800"',
                                                    b"9" * 5000, b"\x00", b"\xff\xfe"]), label="bytes")
        elif kind == "cut":
            del raw[at:at + data.draw(st.integers(1, 64), label="length")]
        else:
            del raw[at:]
    return bytes(raw)


def run_cli(argv) -> tuple:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def fuzz(examples: int) -> settings:
    return settings(max_examples=EXAMPLES or examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


# -- baselines -----------------------------------------------------------------------------
@fuzz(150)
@given(data=st.data())
def test_fuzz_baseline_files(originals, memory_watch, data):
    if data.draw(st.booleans(), label="byte level"):
        raw = mutate_bytes(data, originals["baseline"].encode())
    else:
        raw = json.dumps(mutate_tree(data, json.loads(originals["baseline"]))).encode()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "baseline.json")
        with open(path, "wb") as fh:
            fh.write(raw)
        with time_limit(SECONDS_PER_CALL):
            try:
                Baseline.load(path)
                loaded = True
            except BaselineError as error:
                assert path in str(error)
                loaded = False
            code, err = run_cli(["baseline", "show", path])
        assert code == (0 if loaded else 2), err
        assert loaded or (err.count("\n") == 1 and "Traceback" not in err), err


# -- dumps ---------------------------------------------------------------------------------
TYPES = {
    "int64": (pa.int64(), st.integers(-(2 ** 63), 2 ** 63 - 1)),
    "float64": (pa.float64(), st.floats(allow_nan=True, allow_infinity=True)),
    "string": (pa.string(), st.text(max_size=8)),
    "bool": (pa.bool_(), st.booleans()),
    "list<int64>": (pa.list_(pa.int64()), st.lists(st.integers(-5, 10 ** 6), max_size=6)),
    "list<double>": (pa.list_(pa.float64()), st.lists(st.floats(allow_nan=True), max_size=6)),
}


def mutate_table(data: st.DataObject, table: pa.Table) -> pa.Table:
    """A column replaced by random values of a random type (nulls among them), dropped, or its
    rows shuffled; or rows cut."""
    name = data.draw(st.sampled_from(table.column_names), label="column")
    action = data.draw(st.sampled_from(["retype", "nulls", "drop", "shuffle", "rows"]), label="table action")
    if action == "drop":
        return table.drop([name])
    if action == "rows":
        return table.slice(0, data.draw(st.integers(0, table.num_rows), label="rows kept"))
    if action == "shuffle":
        order = data.draw(st.permutations(range(table.num_rows)), label="order")
        return table.set_column(table.column_names.index(name), name, table.column(name).take(pa.array(order)))
    if action == "nulls":
        column = table.column(name).combine_chunks()
        mask = np.array(data.draw(st.lists(st.booleans(), min_size=table.num_rows, max_size=table.num_rows),
                                  label="null mask"))
        values = [None if m else v for v, m in zip(column.to_pylist(), mask)]
        return table.set_column(table.column_names.index(name), name, pa.array(values, column.type))
    kind, values = TYPES[data.draw(st.sampled_from(sorted(TYPES)), label="type")]
    rows = data.draw(st.lists(st.one_of(st.none(), values), min_size=table.num_rows, max_size=table.num_rows),
                     label="values")
    return table.set_column(table.column_names.index(name), pa.field(name, kind), pa.array(rows, kind))


@fuzz(80)
@given(data=st.data())
def test_fuzz_dump_files(originals, memory_watch, data):
    table, meta = originals["table"], json.loads(json.dumps(originals["meta"]))
    level = data.draw(st.sampled_from(["metadata", "table", "bytes"]), label="level")
    if level == "metadata":
        meta = mutate_tree(data, meta)
    elif level == "table":
        table = mutate_table(data, table)
    text = json.dumps(meta).encode() if isinstance(meta, (dict, list)) else b"null"
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "dump.parquet")
        pq.write_table(table.replace_schema_metadata({METADATA_KEY: text}), path)
        if level == "bytes":
            with open(path, "rb") as fh:
                raw = mutate_bytes(data, fh.read())
            with open(path, "wb") as fh:
                fh.write(raw)
        plots = data.draw(st.sampled_from([False] * 9 + [True]), label="plots")
        with time_limit(SECONDS_PER_CALL):
            try:
                read_dump(path)
                readable = True
            except DumpFormatError as error:
                assert path in str(error)
                readable = False
            report = ["report", path] + (["--out", os.path.join(folder, "plots")] if plots else ["--no-plots"])
            results = [run_cli(report), run_cli(["baseline", "build", path, "-o", os.path.join(folder, "b.json")])]
        for code, err in results:
            assert code in (0, 2), err
            assert code == 0 or (err.count("\n") == 1 and "Traceback" not in err), err
        assert readable == (results[0][0] == 0), results[0]


FOOTER_FLIPS = r'''
import collections, json, random, sys
from moewatch.dump import DumpFormatError, read_dump
source, target, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
raw = open(source, "rb").read()
start = len(raw) - 8 - int.from_bytes(raw[-8:-4], "little")
rng = random.Random(0)
out = collections.Counter()
for _ in range(n):
    damaged = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        damaged[rng.randrange(start, len(raw) - 8)] ^= rng.randint(1, 255)
    with open(target, "wb") as fh:
        fh.write(damaged)
    try:
        read_dump(target)
        out["read"] += 1
    except DumpFormatError:
        out["refused"] += 1
print(json.dumps(out))
'''


def test_footer_damage_never_aborts_the_process(originals, tmp_path):
    """pyarrow's footer objects abort the whole process (an uncaught C++ exception) on some
    damaged footers, e.g. a level histogram of the wrong size; about one in 300 random flips of
    a dump's footer bytes hits one. read_dump reads the footer's counts itself, so 300 such
    flips, in a child process, end in a dump or a DumpFormatError and the child exits cleanly."""
    import subprocess
    import sys

    from memory_helpers import ROOT

    source = tmp_path / "dump.parquet"
    meta = json.dumps(originals["meta"]).encode()
    pq.write_table(originals["table"].replace_schema_metadata({METADATA_KEY: meta}), source)
    done = subprocess.run([sys.executable, "-c", FOOTER_FLIPS, str(source), str(tmp_path / "damaged.parquet"), "300"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stderr[-2000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert sum(outcome.values()) == 300 and outcome["refused"] > 150, outcome
