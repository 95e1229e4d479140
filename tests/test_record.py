"""`moewatch baseline record MODEL_DIR DATA... -o baseline.json`: a real tiny transformers model
saved with save_pretrained, a real tokenizer built offline, text and JSONL files."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moewatch.baseline import MIN_WINDOWS, Baseline
from moewatch.cli import main as cli_main
from moewatch.record import RecordError, plan
from tests.conftest import tiny_mixtral

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _corpus() -> str:
    """Real text present on every checkout: moewatch's own documentation."""
    parts = []
    for name in ("api.md", "detector.md", "dumps.md"):
        with open(os.path.join(ROOT, "docs", name), encoding="utf-8") as fh:
            parts.append(fh.read())
    return "\n".join(parts)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Mixtral and a word-level tokenizer (tokenizers library) of 128 ids, saved together."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("model")
    tiny_mixtral(seed=0).save_pretrained(folder)
    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator([_corpus()], trainers.WordLevelTrainer(vocab_size=128, special_tokens=["[PAD]", "[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    bare = tmp_path_factory.mktemp("bare")
    tiny_mixtral(seed=0).save_pretrained(bare)  # the same model without a tokenizer
    return str(folder), str(bare)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    text = _corpus()
    half = len(text) // 2
    (folder / "a.txt").write_text(text[:half], encoding="utf-8")
    with open(folder / "b.jsonl", "w", encoding="utf-8") as fh:
        for paragraph in text[half:].split("\n\n"):
            fh.write(json.dumps({"text": paragraph, "id": 1}) + "\n")
    return str(folder / "a.txt"), str(folder / "b.jsonl")


def test_record_writes_a_baseline_and_its_summary(model_dir, data, tmp_path, capsys):
    out = tmp_path / "baseline.json"
    code = cli_main(["baseline", "record", model_dir[0], *data, "-o", str(out), "--window-tokens", "512",
                     "--seq-len", "128", "--batch-size", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    plan_line = next(line for line in captured.out.splitlines() if line.startswith("recording:"))
    assert "windows of 512 tokens" in plan_line  # said before the model ran
    base = Baseline.load(out)
    assert set(base.gates) == {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate"}
    gate = base.gates["model.layers.0.mlp.gate"]
    assert gate.windows >= MIN_WINDOWS
    tokens = int(plan_line.split(" document(s), ")[1].split(" tokens")[0].replace(",", ""))
    sizes = gate.series["tokens"]
    assert sizes.sum() <= tokens  # padding never counted
    # windows close after 512 real tokens; a last, shorter window is kept when at least half full
    assert sizes[:-1].min() >= 512 and sizes[-1] >= 256
    assert base.model_name == model_dir[0]  # as attach names a model loaded from that directory
    assert f"wrote {out}" in captured.out and "model.layers.1.mlp.gate: 8 experts top-2" in captured.out
    assert "baseline:" in captured.err and "tok" in captured.err  # the progress bar


def test_progress_bar_and_summary_from_the_command_line(model_dir, data, tmp_path):
    out = tmp_path / "b.json"
    done = subprocess.run([sys.executable, "-m", "moewatch", "baseline", "record", model_dir[0], data[0],
                           "-o", str(out), "--window-tokens", "256"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "100%" in done.stderr and "windows=" in done.stderr
    assert done.stdout.splitlines()[-1].strip().startswith("model.layers.1.mlp.gate:")


def test_a_model_dir_without_tokenizer_is_a_clear_error_or_bytes(model_dir, data, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert cli_main(["baseline", "record", model_dir[1], data[0], "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer" in err and "--tokenizer bytes" in err and not out.exists()
    # the tiny model's vocabulary (128 ids) cannot hold bytes: said, not run
    assert cli_main(["baseline", "record", model_dir[1], data[0], "-o", str(out), "--tokenizer", "bytes"]) == 2
    assert "at least 256 ids" in capsys.readouterr().err
    # another directory's tokenizer
    assert cli_main(["baseline", "record", model_dir[1], data[0], "-o", str(out), "--tokenizer", model_dir[0],
                     "--window-tokens", "256", "--no-progress"]) == 0
    assert Baseline.load(out).gates["model.layers.0.mlp.gate"].windows >= MIN_WINDOWS


def test_bytes_tokenizer_on_the_shipped_byte_level_model(data, tmp_path, capsys):
    from moewatch.pretrained import ASSET_DIR

    out = tmp_path / "b.json"
    assert cli_main(["baseline", "record", str(ASSET_DIR), data[0], "-o", str(out), "--tokenizer", "bytes",
                     "--window-tokens", "1024", "--no-progress"]) == 0
    base = Baseline.load(out)
    assert len(base.gates) == 4 and min(g.windows for g in base.gates.values()) >= MIN_WINDOWS


def test_too_little_data_is_refused_before_the_model_runs(model_dir, tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("a few words " * 50)
    assert cli_main(["baseline", "record", model_dir[0], str(small), "-o", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "the data holds 150 tokens: a baseline needs at least 8 windows" in err
    assert "2,048 tokens at 256 tokens per window" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    assert cli_main(["baseline", "record", model_dir[0], str(bad), "-o", str(tmp_path / "b.json")]) == 2
    assert "bad.jsonl:2: no 'text' text field (use --text-key)" in capsys.readouterr().err


def test_plan_sizes_windows_from_the_traffic():
    assert plan([10_240], None, 512, 8, None).window_tokens == 320  # 32 windows of a little traffic
    assert plan([10_000_000], None, 512, 8, None).window_tokens == 8192  # the live default at most
    p = plan([5000], 128, 512, 8, 256)
    assert (p.seq_len, p.batch_size) == (128, 2)  # a batch fits in a window; positions respected
    with pytest.raises(RecordError, match="needs at least 8 windows"):
        plan([1000], None, 512, 8, None)
