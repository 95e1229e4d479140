"""Dumps from elsewhere: crafted but valid Parquet files and decompression bombs (SECURITY.md).

Every crafted file is refused by ``read_dump`` with ``DumpFormatError`` naming the file, and
``moewatch report`` and ``moewatch baseline build`` exit 2 with one line on stderr, never a
traceback. A bomb (millions of compressed rows, or one row holding a huge list) is refused
from the Parquet footer, or batch by batch, in bounded memory (measured in a child process).
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

import moewatch
from moewatch.cli import main
from moewatch.dump import METADATA_KEY, DumpFormatError, DumpLimits, read_dump, read_metadata

from memory_helpers import measure
from reliability_helpers import ToyMoE, forward


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> str:
    """A real dump: 10 windows of two gates, every token's decision sampled."""
    folder = tmp_path_factory.mktemp("good")
    model = ToyMoE()
    with moewatch.attach(model, gates="routers.*", top_k=2, background=False, model_name="toy",
                         window_tokens=10, sample_decisions=1.0) as mon:
        for seed in range(10):
            forward(model, torch.randn(1, 10, 8, generator=torch.Generator().manual_seed(seed)))
            mon.flush()
        return mon.dump(str(folder / "good.parquet"))


def parts(path: str):
    table = pq.read_table(path)
    return table, json.loads(table.schema.metadata[METADATA_KEY])


def write(path, table: pa.Table, meta, raw: bytes = None) -> str:
    text = raw if raw is not None else json.dumps(meta).encode()
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: text}), path)
    return str(path)


def window_rows(table: pa.Table) -> np.ndarray:
    return np.flatnonzero(table.column("record").to_numpy(zero_copy_only=False) == "window")


def with_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, values)


def edit_list_row(table: pa.Table, name: str, row: int, new) -> pa.Table:
    values = table.column(name).to_pylist()
    values[row] = new
    return with_column(table, name, pa.array(values, table.schema.field(name).type))


def edit_scalar_row(table: pa.Table, name: str, row: int, new) -> pa.Table:
    values = table.column(name).to_pylist()
    values[row] = new
    return with_column(table, name, pa.array(values, table.schema.field(name).type))


def invalid_utf8(table: pa.Table, name: str) -> pa.Table:
    """``name`` with one value whose bytes are not UTF-8 (Parquet writers do not check)."""
    values = [v.encode() if v is not None else b"" for v in table.column(name).to_pylist()]
    values[0] = b"caf\xe9"
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int32)
    array = pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()),
                                                              pa.py_buffer(b"".join(values))])
    return with_column(table, name, array)


def deep(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


CRAFTED = {
    # metadata fields of the wrong type
    "timeline a string": lambda t, m: (t, {**m, "timeline": "every window was fine"}),
    "timeline entry severity a number": lambda t, m: (t, {**m, "timeline": [{"window": 0, "severity": 2, "gates": {}}]}),
    "timeline reasons a dict": lambda t, m: (t, {**m, "timeline": [{"window": 1, "severity": "drift", "gates": {
        "routers.g0": {"severity": "drift", "reasons": {"a": 1}}}}]}),
    "gates a number": lambda t, m: (t, {**m, "gates": 5}),
    "gate name a number": lambda t, m: (t, {**m, "gates": [{"name": 7, "num_experts": 4}]}),
    "trigger gates a string": lambda t, m: (t, {**m, "trigger": {"gates": "routers.g0"}}),
    "schema version true": lambda t, m: (t, {**m, "schema_version": True}),
    "rows a list": lambda t, m: (t, {**m, "rows": [1, 2]}),
    "baseline expert_share a string": lambda t, m: (t, {**m, "baseline": {"gates": [
        {"name": "routers.g0", "summary": {"expert_share": "lots"}}]}}),
    "window_columns name record": lambda t, m: (t, {**m, "window_columns": m["window_columns"] + ["record"]}),
    # metadata nested deep, or not plain JSON
    "metadata nested 100000 deep": lambda t, m: (t, m, json.dumps(m)[:-1].encode() + b', "options": '
                                                 + deep(100_000).encode() + b"}"),
    "metadata with a duplicate key": lambda t, m: (t, m, b'{"format": "x", ' + json.dumps(m)[1:].encode()),
    # columns of the wrong type
    "record as int64": lambda t, m: (with_column(t, "record", pa.array(np.arange(t.num_rows))), m),
    "strings in a numeric column": lambda t, m: (with_column(t, "tokens", pc.cast(t.column("tokens"), pa.string())), m),
    "top_k as double": lambda t, m: (with_column(t, "top_k", pc.cast(t.column("top_k"), pa.float64())), m),
    # values the readers cannot use
    "list columns of unequal lengths": lambda t, m: (edit_list_row(t, "expert_counts", int(window_rows(t)[3]), [1, 2]), m),
    "a null inside a list": lambda t, m: (edit_list_row(t, "expert_share", int(window_rows(t)[0]), [0.5, None, 0.5, 0.0]), m),
    "null in a required column": lambda t, m: (edit_scalar_row(t, "tokens", int(window_rows(t)[2]), None), m),
    "null gate": lambda t, m: (edit_scalar_row(t, "gate", int(window_rows(t)[0]), None), m),
    "negative expert count": lambda t, m: (edit_list_row(t, "expert_counts", int(window_rows(t)[1]), [-5, 1, 1, 1]), m),
    "zero experts": lambda t, m: (edit_scalar_row(t, "num_experts", int(window_rows(t)[0]), 0), m),
    "a window that ends in the year 10**292": lambda t, m: (edit_scalar_row(t, "t_end", int(window_rows(t)[0]), 1e300), m),
    "a family name that is not UTF-8": lambda t, m: (invalid_utf8(t, "family"), m),
    "a gate the metadata does not list": lambda t, m: (edit_scalar_row(t, "gate", int(window_rows(t)[0]), "routers.x"), m),
    "a decision naming an expert the gate lacks": lambda t, m: (
        edit_list_row(t, "experts", int(np.flatnonzero(t.column("record").to_numpy(zero_copy_only=False) == "decision")[0]),
                      [999, 0]), m),
}


@pytest.fixture(scope="module")
def crafted(good, tmp_path_factory):
    folder = tmp_path_factory.mktemp("crafted")
    table, meta = parts(good)
    files = {}
    for i, (name, make) in enumerate(CRAFTED.items()):
        out = make(table, dict(meta))
        files[name] = write(folder / f"crafted-{i}.parquet", *out)
    return files


def test_the_good_dump_reads_reports_and_builds(good, tmp_path, capsys):
    dump = read_dump(good)
    assert len(dump.windows) == 20 and len(dump.decisions) == 200
    assert main(["report", good, "--no-plots"]) == 0
    assert main(["baseline", "build", good, "-o", str(tmp_path / "b.json")]) == 0
    assert moewatch.Baseline.load(tmp_path / "b.json").gates["routers.g0"].windows == 10


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_dumps_are_one_clear_error_everywhere(crafted, name, tmp_path, capsys):
    path = crafted[name]
    with pytest.raises(DumpFormatError) as caught:
        read_dump(path)
    assert path in str(caught.value)
    capsys.readouterr()
    for argv in (["report", path, "--out", str(tmp_path / "plots")],
                 ["baseline", "build", path, "-o", str(tmp_path / "b.json")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and path in err and "Traceback" not in err, err
    assert not (tmp_path / "b.json").exists()


def test_metadata_is_checked_when_read_alone(crafted):
    with pytest.raises(DumpFormatError, match="timeline"):
        read_metadata(crafted["timeline a string"])
    with pytest.raises(DumpFormatError, match="nested deeper"):
        read_metadata(crafted["metadata nested 100000 deep"])


def test_limits_can_be_tightened_and_name_themselves(good):
    small = DumpLimits(max_decisions=100)
    with pytest.raises(DumpFormatError, match="decisions"):
        read_dump(good, limits=small)
    with pytest.raises(DumpFormatError, match="footer"):
        read_dump(good, limits=DumpLimits(max_footer_bytes=1000))
    with pytest.raises(DumpFormatError, match="'gate' value"):
        read_dump(good, limits=DumpLimits(max_string_bytes=4))


# -- bombs --------------------------------------------------------------------------------
def write_decision_bomb(good: str, path, rows: int, claimed: int) -> str:
    """The good dump plus ``rows`` identical decision rows (compressed to almost nothing),
    written a million rows at a time; the metadata claims ``claimed`` decisions."""
    table, meta = parts(good)
    decisions = window_rows(table).size
    meta["rows"] = {"windows": int(decisions), "decisions": claimed}
    schema = table.schema.with_metadata({METADATA_KEY: json.dumps(meta).encode()})
    one = table.filter(pc.equal(table.column("record"), "decision")).slice(0, 1)
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        writer.write_table(table.filter(pc.equal(table.column("record"), "window")).replace_schema_metadata(schema.metadata))
        block = one.take(pa.array(np.zeros(min(rows, 1_000_000), dtype=np.int64))).replace_schema_metadata(schema.metadata)
        for start in range(0, rows, block.num_rows):
            writer.write_table(block.slice(0, min(block.num_rows, rows - start)))
    return str(path)


def write_list_bomb(good: str, path, values: int) -> str:
    """The good dump whose first window row holds ``values`` expert counts (all zero)."""
    table, meta = parts(good)
    row = int(window_rows(table)[0])
    column = table.column("expert_counts").combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    lengths = np.diff(offsets)
    lengths[row] = values
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.zeros(int(new_offsets[-1]), dtype=np.int64)
    big = pa.ListArray.from_arrays(pa.array(new_offsets), pa.array(flat), mask=column.is_null())
    table = with_column(table, "expert_counts", big)
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}), path,
                   compression="zstd")
    return str(path)


def test_decompression_bombs_are_refused_in_bounded_memory(good, tmp_path):
    """10 million decision rows in about a megabyte took 9.1-9.7 GiB to read before; a million
    rows behind a metadata that claims ten, or one window row of 30 million counts, must not
    either. Refusals from the footer cost next to nothing; batch-by-batch ones one batch."""
    ten_million = write_decision_bomb(good, tmp_path / "bomb.parquet", 10_000_000, 10_000_000)
    lying = write_decision_bomb(good, tmp_path / "lying.parquet", 1_200_000, 200)
    one_row = write_list_bomb(good, tmp_path / "row.parquet", 30_000_000)
    assert all(p.stat().st_size < 4 * 2 ** 20 for p in tmp_path.iterdir())
    small = "moewatch.dump.DumpLimits(max_decisions=300_000)"
    results = measure([f"moewatch.dump.read_dump({ten_million!r})",
                       f"moewatch.dump.read_dump({lying!r})",
                       f"moewatch.dump.read_dump({lying!r}, limits={small})",
                       f"moewatch.dump.read_dump({one_row!r})",
                       f"moewatch.dump.read_dump({good!r})"])
    bomb, lie, lie_small, row, fine = results
    assert bomb["error"][0] == "DumpFormatError" and "rows" in bomb["error"][1], bomb
    assert bomb["peak_mib"] < 64 and bomb["seconds"] < 10, bomb
    # the metadata lies: the rows are counted batch by batch and refused past the limit
    assert lie["error"][0] == "DumpFormatError" and "1,048,576 decision rows" in lie["error"][1], lie
    assert lie["peak_mib"] < 256, lie
    assert lie_small["error"][0] == "DumpFormatError" and "300,000" in lie_small["error"][1], lie_small
    assert lie_small["peak_mib"] < 256, lie_small
    assert row["error"][0] == "DumpFormatError" and "expert_counts" in row["error"][1], row
    assert row["peak_mib"] < 64, row
    assert fine["error"] is None and fine["peak_mib"] < 64, fine
