"""Parquet dumps: read back equal, sampled decisions equal the model's routing, safe writes,
a bounded dump directory, failures counted, and SQL over a folder of dumps."""
import os

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from pandas.testing import assert_frame_equal

import moewatch
from moewatch.dump import DumpError, DumpFormatError, read_dump, read_metadata, read_windows
from moewatch.postmortem import DumpDirectory
from tests.conftest import padded_batch, tiny_mixtral
from tests.test_no_sync import sync_tracer

GATES = ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def _run(model, mon, windows=2, seed=1):
    ids, mask = padded_batch(seed=seed)
    with torch.no_grad():
        for _ in range(windows):
            model(ids, attention_mask=mask)
            mon.flush()
    return ids, mask


def test_dump_reads_back_the_windows_frame_and_metadata(tmp_path, mixtral):
    mon = moewatch.attach(mixtral, background=False, sample_decisions=0.5, model_name="tiny")
    _run(mixtral, mon, windows=3)
    path = mon.dump(tmp_path / "incident.parquet")
    frame = mon.windows()
    dump = read_dump(path)
    assert_frame_equal(dump.windows, frame)
    assert_frame_equal(read_windows(path), frame)
    assert len(frame) == 6 and frame["expert_counts"].map(len).eq(8).all()
    meta = dump.metadata
    assert meta["schema_version"] == 2 and meta["format"] == "moewatch-dump" and meta["reason"] == "manual"
    assert [g["name"] for g in meta["gates"]] == GATES and meta["model_name"] == "tiny"
    assert meta["options"]["sample_decisions"] == 0.5 and meta["baseline"] is None
    assert [e["window"] for e in meta["timeline"]] == [0, 1, 2]
    assert meta["rows"] == {"windows": 6, "decisions": len(dump.decisions), "coselection": len(dump.coselection)}
    assert len(dump.decisions) > 0
    # a directory as the path: a new dump named inside it
    named = mon.dump(tmp_path)
    assert os.path.dirname(named) == str(tmp_path) and os.path.basename(named).startswith("moewatch-")
    assert_frame_equal(read_windows(named), frame)
    mon.detach()


def test_empty_monitor_dumps_an_empty_frame(tmp_path, mixtral):
    with moewatch.attach(mixtral, background=False) as mon:
        path = mon.dump(tmp_path / "empty.parquet")
        dump = read_dump(path)
        assert_frame_equal(dump.windows, mon.windows())
        assert dump.decisions.empty and list(dump.decisions.columns)[:4] == ["gate", "window", "call", "token"]


def test_sampled_decisions_are_the_routing_the_model_made(tmp_path):
    model = tiny_mixtral(seed=3)
    seen = {name: [] for name in GATES}  # gate -> per call (logits [T, E], indices [T, k])

    def capture(name):
        def hook(module, args, output):
            seen[name].append((output[0].detach().clone(), output[2].detach().clone()))
        return hook

    for name in GATES:
        model.get_submodule(name).register_forward_hook(capture(name))
    ids, mask = padded_batch(seed=4)
    masks = [mask.reshape(-1), mask[:, -1:].reshape(-1)]
    mon = moewatch.attach(model, background=False, sample_decisions=1 / 3)
    with torch.no_grad():
        model(ids, attention_mask=mask)  # 36 tokens
        mon.flush()
        model(ids[:, -1:], attention_mask=mask)  # decode-shaped: 3 tokens, the mask's last column
        mon.flush()
    decisions = read_dump(mon.dump(tmp_path / "d.parquet")).decisions
    mon.detach()
    for name in GATES:
        mine = decisions[decisions["gate"] == name]
        # every third token of the gate's token stream, continuing across calls
        assert list(zip(mine["call"], mine["token"])) == [(0, t) for t in range(0, 36, 3)] + [(1, 0)]
        assert list(mine["window"]) == [0] * 12 + [1]
        for call, token, experts, probs, valid in zip(mine["call"], mine["token"], mine["experts"],
                                                      mine["expert_probs"], mine["valid"]):
            logits, indices = seen[name][call]
            assert experts.tolist() == indices[token].tolist()
            expected = torch.softmax(logits[token].float(), -1)[indices[token]].numpy()
            np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
            assert valid == bool(masks[call][token])
    assert not decisions["valid"].all()  # the padded batch's padding is marked


def test_decision_ring_is_bounded_and_keeps_the_latest(tmp_path, mixtral):
    mon = moewatch.attach(mixtral, background=False, sample_decisions=1.0, decision_slots=16)
    ids, mask = padded_batch()
    with torch.no_grad():
        mixtral(ids, attention_mask=mask)
    mon.flush()
    dump = read_dump(mon.dump(tmp_path / "d.parquet"))
    mon.detach()
    d = dump.decisions
    assert len(d) == 16 and set(d["gate"]) == {GATES[1]}  # the second gate overwrote the first
    assert list(d["token"]) == list(range(20, 36)) and list(d["seq"]) == list(range(16, 32))
    assert dump.metadata["decisions"]["written"] == 32


def test_sampling_off_costs_nothing_and_sampling_on_makes_no_host_sync(tmp_path, mixtral):
    off = moewatch.attach(mixtral, background=False)
    assert off._decisions is None
    off.detach()
    mon = moewatch.attach(mixtral, background=False, sample_decisions=0.5)
    ids, mask = padded_batch()
    with sync_tracer() as calls, torch.no_grad():
        mixtral(ids, attention_mask=mask)
        mixtral(ids[:, :1], attention_mask=mask)
    assert calls == []
    assert mon.error_counts() == {}
    mon.flush()
    assert len(read_dump(mon.dump(tmp_path / "d.parquet")).decisions) == 2 * 20  # 39 tokens, every 2nd
    mon.detach()


def test_shutdown_dump_and_bounded_dump_dir(tmp_path, mixtral):
    folder = tmp_path / "dumps"
    mon = moewatch.attach(mixtral, background=False, dump_dir=str(folder), sample_decisions=0.25)
    _run(mixtral, mon)
    mon.detach()
    (shutdown,) = os.listdir(folder)
    assert shutdown.startswith("moewatch-") and shutdown.endswith("-shutdown.parquet")
    assert_frame_equal(read_windows(folder / shutdown), mon.windows())
    size = os.path.getsize(folder / shutdown)

    (folder / "notes.txt").write_text("not a dump: never counted or removed")
    bound = int(size * 3.5)
    directory = DumpDirectory(str(folder), bound)
    written = [directory.write(mon, "test", tag=str(i)) for i in range(6)]
    left = sorted(n for n in os.listdir(folder) if n.endswith(".parquet"))
    total = sum(os.path.getsize(folder / n) for n in left)
    assert total <= bound and len(left) == 3
    assert sorted(os.path.basename(p) for p in written[-3:]) == left  # the oldest went first
    assert (folder / "notes.txt").exists()
    # a dump that alone exceeds the bound is not kept
    with pytest.raises(DumpError, match="exceeds dump_max_bytes"):
        DumpDirectory(str(folder), size // 2).write(mon, "big")
    assert not any("big" in n for n in os.listdir(folder))


def test_dump_names_cannot_leave_the_directory(tmp_path, mixtral):
    directory = DumpDirectory(str(tmp_path / "d"), 10**9)
    os.makedirs(directory.path)
    for reason, tag in [("../../etc/passwd", ""), ("collapse", "../../x"), ("/abs", "a/b\\c\x00")]:
        target = directory.target(reason, tag)
        assert os.path.dirname(target) == directory.path
        assert os.path.basename(target).startswith("moewatch-") and target.endswith(".parquet")


@pytest.mark.parametrize("kind", ["file-in-the-way", "read-only-dir"])
def test_failed_automatic_dump_is_counted_not_raised(tmp_path, mixtral, kind):
    if kind == "file-in-the-way":
        target = tmp_path / "dumps"
        target.write_text("a file where the dump directory should be")
    else:
        if os.geteuid() == 0:
            pytest.skip("permissions do not bind root")
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o555)
    mon = moewatch.attach(mixtral, background=False, dump_dir=str(target))
    _run(mixtral, mon, windows=1)
    mon.detach()  # the shutdown dump fails: counted, logged, not raised
    assert mon.error_counts().get("dump") == 1
    with pytest.raises(DumpError, match="could not write moewatch dump"):
        mon.dump(target / "manual.parquet")


def test_a_failed_write_leaves_no_file_behind(tmp_path, mixtral, monkeypatch):
    """A disk that fills up mid-write: the final name never appears, the temporary file is removed."""
    mon = moewatch.attach(mixtral, background=False)
    _run(mixtral, mon, windows=1)
    real_write = pq.write_table

    def write_half_then_fail(table, sink, **kwargs):
        sink.write(b"PAR1" + b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", write_half_then_fail)
    with pytest.raises(DumpError, match="No space left"):
        mon.dump(tmp_path / "full.parquet")
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(pq, "write_table", real_write)
    assert read_windows(mon.dump(tmp_path / "ok.parquet")).shape[0] == 2
    mon.detach()


def _good_dump(tmp_path, model) -> str:
    mon = moewatch.attach(model, background=False, sample_decisions=0.5)
    _run(model, mon, windows=1)
    path = mon.dump(tmp_path / "good.parquet")
    mon.detach()
    return str(path)


def test_truncated_corrupt_foreign_and_newer_files_are_clear_errors(tmp_path, mixtral):
    good = _good_dump(tmp_path, mixtral)
    data = open(good, "rb").read()
    cases = {
        "truncated.parquet": data[: len(data) // 2],
        "random.parquet": os.urandom(2048),
        "empty.parquet": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DumpFormatError, match="not a readable Parquet file"):
            read_dump(tmp_path / name)
    flipped = bytearray(data)
    for i in range(len(data) // 4, len(data) // 2, 7):  # damage inside the data pages
        flipped[i] ^= 0xFF
    (tmp_path / "flipped.parquet").write_bytes(bytes(flipped))
    with pytest.raises(DumpFormatError, match="corrupt|not a readable"):
        read_dump(tmp_path / "flipped.parquet")
    pd.DataFrame({"a": [1, 2]}).to_parquet(tmp_path / "foreign.parquet")
    with pytest.raises(DumpFormatError, match="not a moewatch dump"):
        read_dump(tmp_path / "foreign.parquet")
    table = pq.read_table(good)
    meta = dict(table.schema.metadata)
    meta[b"moewatch"] = meta[b"moewatch"].replace(b'"schema_version": 2', b'"schema_version": 99')
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "newer.parquet")
    with pytest.raises(DumpFormatError, match="newer"):
        read_dump(tmp_path / "newer.parquet")
    # rows removed behind the metadata's back
    pq.write_table(table.slice(0, 1), tmp_path / "short.parquet")
    with pytest.raises(DumpFormatError, match="metadata says"):
        read_dump(tmp_path / "short.parquet")
    assert read_metadata(good)["rows"]["windows"] == 2


def test_sql_over_a_folder_of_dumps(tmp_path, mixtral, monkeypatch):
    """The documented queries (docs/dumps.md) over several dumps at once."""
    folder = tmp_path / "dumps"
    folder.mkdir()
    frames = []
    for i in range(2):
        mon = moewatch.attach(mixtral, background=False, sample_decisions=0.25)
        _run(mixtral, mon, windows=2, seed=i + 1)
        mon.dump(folder / f"run{i}.parquet")
        frames.append(mon.windows())
        mon.detach()
    expected = pd.concat(frames).groupby("gate")["top_share"].max().sort_index()

    dataset = ds.dataset(str(folder), format="parquet")
    windows = dataset.to_table(filter=ds.field("record") == "window",
                               columns=["gate", "window", "top_share", "expert_counts"])
    got = windows.group_by("gate").aggregate([("top_share", "max")]).to_pandas().set_index("gate")
    assert np.allclose(got["top_share_max"].sort_index().to_numpy(), expected.to_numpy())
    assert windows.num_rows == 8

    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    glob = str(folder / "*.parquet")
    rows = con.execute(f"""
        SELECT gate, max(top_share) AS worst
        FROM read_parquet('{glob}') WHERE record = 'window' GROUP BY gate ORDER BY gate""").fetchall()
    assert [r[0] for r in rows] == list(expected.index)
    assert np.allclose([r[1] for r in rows], expected.to_numpy())
    per_expert = con.execute(f"""
        SELECT gate, i - 1 AS expert, sum(expert_counts[i]) AS assignments
        FROM (SELECT gate, expert_counts, generate_subscripts(expert_counts, 1) AS i
              FROM read_parquet('{glob}') WHERE record = 'window')
        GROUP BY ALL ORDER BY gate, expert""").fetchdf()
    totals = pd.concat(frames).groupby("gate")["expert_counts"].apply(lambda c: np.sum(np.stack(c), axis=0))
    for gate, counts in totals.items():
        assert per_expert[per_expert["gate"] == gate]["assignments"].tolist() == counts.tolist()
    decisions = con.execute(f"""
        SELECT gate, experts[1] AS first_choice, count(*) AS n
        FROM read_parquet('{glob}') WHERE record = 'decision' AND valid GROUP BY ALL""").fetchall()
    assert sum(r[2] for r in decisions) > 0
    # every query of docs/dumps.md runs, from the folder holding dumps/
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "dumps.md")).read()
    queries = [q.strip() for block in doc.split("```sql")[1:] for q in block.split("```")[0].split(";") if q.strip()]
    monkeypatch.chdir(tmp_path)
    assert len(queries) >= 4
    for query in queries:
        assert con.execute(query).fetchall(), query


EXIT_SCRIPT = """
import sys
import torch
import moewatch
from tests.moe_from_scratch import TinyMoELM

torch.manual_seed(0)
model = TinyMoELM()
mon = moewatch.attach(model, gates="*.router", top_k=2, background=False, dump_dir=sys.argv[1],
                      sample_decisions=0.5)
with torch.no_grad():
    model(torch.randint(0, 64, (2, 16)))
# the interpreter exits with the monitor still attached
"""


def test_interpreter_exit_writes_the_shutdown_dump(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = tmp_path / "dumps"
    result = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(folder)], cwd=root, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": root})
    assert result.returncode == 0, result.stderr
    (name,) = os.listdir(folder)
    assert name.endswith("-shutdown.parquet")
    dump = read_dump(folder / name)
    assert list(dump.windows["gate"]) == ["blocks.0.router", "blocks.1.router"]
    assert list(dump.windows["tokens"]) == [32, 32]
    d = dump.decisions
    assert len(d) == 2 * 16 and d["valid"].all()
    assert all(len(e) == 2 and len(set(e.tolist())) == 2 and e.min() >= 0 and e.max() < 8 for e in d["experts"])


def test_sampled_decisions_of_a_gate_that_returns_only_logits(tmp_path):
    """Experts recomputed as the top-k of the router's softmax equal the layer's own choice."""
    from tests.moe_from_scratch import TinyMoELM

    torch.manual_seed(1)
    model = TinyMoELM()
    mon = moewatch.attach(model, gates="*.router", top_k=2, background=False, sample_decisions=0.5)
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 10)))
    mon.flush()
    decisions = read_dump(mon.dump(tmp_path / "d.parquet")).decisions
    mon.detach()
    for i, block in enumerate(model.blocks):
        mine = decisions[decisions["gate"] == f"blocks.{i}.router"]
        chosen = block.last_indices.reshape(-1, 2)  # [T, k]
        assert list(mine["token"]) == list(range(0, 20, 2))
        assert [e.tolist() for e in mine["experts"]] == [chosen[t].tolist() for t in mine["token"]]


def test_coselection_round_trips_and_sums_to_the_live_counts(tmp_path, mixtral):
    # E = 8: a span every 2 windows; 5 windows make spans 0-1, 2-3 and the tail 4
    mon = moewatch.attach(mixtral, background=False, expert_placement="contiguous:2")
    _run(mixtral, mon, windows=5)
    path = mon.dump(tmp_path / "cosel.parquet")
    dump = read_dump(path)
    spans = mon.coselection_spans()
    assert_frame_equal(dump.coselection, spans)
    assert sorted(set(zip(spans["window_first"], spans["window"]))) == [(0, 1), (2, 3), (4, 4)]
    live = mon.coselection()
    for gate in GATES:
        rows = dump.coselection[dump.coselection["gate"] == gate]["coselection"]
        total = np.sum([np.asarray(r).reshape(8, 8) for r in rows], axis=0)
        np.testing.assert_array_equal(total, live[gate])
        assert np.trace(total) == mon.counts()[gate].sum()  # top-2 of distinct experts: diagonal = assignments
    assert dump.metadata["placement"]["ranks"] == 2
    mon.detach()


def test_version_1_dumps_stay_readable(tmp_path, mixtral):
    from moewatch.dump import dump_metadata, dump_table, write_table_atomic
    from moewatch.decisions import empty_decisions

    mon = moewatch.attach(mixtral, background=False)
    _run(mixtral, mon, windows=2)
    meta = dict(dump_metadata(mon, "manual"), schema_version=1)
    meta.pop("placement")
    write_table_atomic(dump_table(mon.windows(), empty_decisions(), meta), str(tmp_path / "v1.parquet"))
    dump = read_dump(tmp_path / "v1.parquet")
    assert dump.schema_version == 1 and dump.coselection.empty
    assert_frame_equal(dump.windows, mon.windows())
    mon.detach()


def test_a_coselection_row_that_is_not_a_matrix_is_refused(tmp_path, mixtral):
    import pyarrow as pa

    mon = moewatch.attach(mixtral, background=False)
    _run(mixtral, mon, windows=2)
    table = pq.read_table(mon.dump(tmp_path / "good.parquet"))
    column = table.column("coselection").to_pylist()
    row = next(i for i, v in enumerate(column) if v is not None)
    column[row] = [1, 2, 3]  # 3 values for an 8-expert gate
    bad = table.set_column(table.schema.get_field_index("coselection"), "coselection",
                           pa.array(column, pa.list_(pa.int64())))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(DumpFormatError, match="co-selection row"):
        read_dump(tmp_path / "bad.parquet")
    mon.detach()
