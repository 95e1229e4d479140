"""The API reference documents every option and every window column."""
from dataclasses import fields
from pathlib import Path

from moewatch.options import Options
from moewatch.windows import WINDOW_COLUMNS

API = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()


def test_every_option_is_documented():
    missing = [f.name for f in fields(Options) if f"| `{f.name}` |" not in API]
    assert missing == []


def test_every_window_column_is_documented():
    missing = [c for c in WINDOW_COLUMNS if f"`{c}`" not in API]
    assert missing == []


# -- every snippet of the README and docs/ runs as written -----------------------------------
# Python snippets run in order, one namespace per file, in a fresh directory, with what the prose
# calls "your model": `model` (a real tiny Mixtral), `input_ids`, `eval_batches` (10 batches of
# 4 x 64 tokens), `moewatch` and `torch` imported, and a `baseline.json` of that model in the
# directory (the README attaches with one before it shows how to record it). Each snippet is an
# example on its own: monitors a previous one left attached are detached first. A comment
# `<!-- doc-test: NAME (...) -->` just above a fence names a set-up (SETUPS) for that snippet.
# `moewatch ...` commands run (bash, in that directory); SQL runs on DuckDB; install lines and
# the benchmarks (minutes to hours) are checked, not run; blocks of program output are not code.
import itertools  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from typing import List, NamedTuple, Optional  # noqa: E402

import pytest  # noqa: E402

from tests.conftest import until_first_verdict  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", ROOT / "SECURITY.md"] + sorted((ROOT / "docs").glob("*.md"))
_FENCE = re.compile(r"(?:<!-- doc-test: (?P<setup>[\w-]+)[^>]*-->\n)?^```(?P<lang>\w*)\n(?P<body>.*?)^```", re.M | re.S)


class Snippet(NamedTuple):
    doc: str
    line: int
    lang: str
    code: str
    setup: Optional[str]


def snippets(path: Path) -> List[Snippet]:
    text = path.read_text(encoding="utf-8")
    return [Snippet(path.name, text[:m.start("lang")].count("\n") + 1, m.group("lang"), m.group("body"),
                    m.group("setup")) for m in _FENCE.finditer(text)]


def _kind(s: Snippet) -> str:
    lines = [line for line in s.code.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if s.lang == "python":
        return "python"
    if s.lang == "sql":
        return "sql"
    if s.lang in ("bash", "console", "sh") or (lines and all(line.startswith(("python ", "$ ")) for line in lines)):
        return "commands"
    return "output"  # program output quoted in the docs


def _prelude(workdir: Path) -> dict:
    import torch

    import moewatch
    from tests.conftest import tiny_mixtral

    model = tiny_mixtral(seed=0)
    gen = torch.Generator().manual_seed(0)
    eval_batches = [{"input_ids": torch.randint(0, 128, (4, 64), generator=gen),
                     "attention_mask": torch.ones(4, 64, dtype=torch.long)} for _ in range(10)]
    with moewatch.attach(model, background=False) as rec:
        for batch in eval_batches:
            model(**batch)
            rec.flush()
        rec.baseline().save(workdir / "baseline.json")
    return {"moewatch": moewatch, "torch": torch, "model": model, "eval_batches": eval_batches,
            "input_ids": torch.randint(0, 128, (2, 32), generator=gen)}


def _custom_gates(ns: dict, workdir: Path) -> dict:
    import torch

    from tests.moe_from_scratch import TinyMoELM

    torch.manual_seed(0)
    return dict(ns, model=TinyMoELM().eval(), input_ids=torch.randint(0, 64, (2, 16)))


def _collapse_dump(ns: dict, workdir: Path) -> dict:
    import torch

    import moewatch
    from moewatch import faults

    model = ns["model"]
    with moewatch.attach(model, baseline="baseline.json", background=False, dump_dir="dumps") as mon:
        batches = itertools.cycle(ns["eval_batches"])

        def window():
            with torch.no_grad():
                model(**next(batches))
            return mon.flush()

        until_first_verdict(window)
        with faults.two_expert_collapse(model, experts=(0, 1), layers=[1]):
            for _ in range(2):
                window()
    assert any("-collapse-" in name for name in os.listdir(workdir / "dumps"))
    return ns


def _model_dir(ns: dict, workdir: Path) -> dict:
    """my-moe/ (the tiny Mixtral and a word-level tokenizer, as save_pretrained writes them) and
    data.txt / more.jsonl (moewatch's own docs as text)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = "\n".join((ROOT / "docs" / name).read_text(encoding="utf-8") for name in ("api.md", "dumps.md"))
    ns["model"].save_pretrained(workdir / "my-moe")
    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=128, special_tokens=["[PAD]", "[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(
        workdir / "my-moe")
    half = len(text) // 2
    (workdir / "data.txt").write_text(text[:half], encoding="utf-8")
    (workdir / "more.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in text[half:].split("\n\n")),
                                        encoding="utf-8")
    return ns


SETUPS = {"custom-gates": _custom_gates, "collapse-dump": _collapse_dump, "model-dir": _model_dir}


def _detach_all(ns: dict) -> None:
    import moewatch

    for value in list(ns.values()):
        if isinstance(value, moewatch.Monitor) and value.attached:
            value.detach()


def _env() -> dict:
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return dict(os.environ, PATH=path, PYTHONPATH=str(ROOT))


def _check_install(command: str) -> None:
    """A README set-up line: its extras exist, and its last step is a command that runs."""
    extras = set(re.findall(r"^(\w+) = \[", (ROOT / "pyproject.toml").read_text().split(
        "[project.optional-dependencies]")[1].split("\n[")[0], re.M))
    for group in re.findall(r"\.\[([\w,]+)\]", command):
        assert set(group.split(",")) <= extras, command
    last = command.split("&&")[-1].strip()
    probe = {"moewatch demo": "moewatch demo --help", "python -m pytest -q": "python -m pytest --version"}[last]
    done = subprocess.run(["bash", "-c", probe], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (command, done.stderr[-1000:])


def _check_benchmark(command: str) -> None:
    """`python benchmarks/X.py [--flags]`: the script exists and takes those flags."""
    words = command.split("#")[0].split()
    script = ROOT / words[1]
    assert script.is_file(), command
    flags = [w for w in words[2:] if w.startswith("--")]
    if flags:
        done = subprocess.run([sys.executable, str(script), "--help"], env=_env(), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0 and all(f in done.stdout for f in flags), command
    else:
        compile(script.read_text(), str(script), "exec")


def _run_commands(s: Snippet, workdir: Path) -> None:
    for raw in s.code.splitlines():
        line = raw[2:] if raw.startswith("$ ") else raw
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "pip install" in line:
            _check_install(line)
        elif line.startswith("python benchmarks/"):
            _check_benchmark(line)
        else:
            assert line.startswith("moewatch "), f"{s.doc}:{s.line}: unknown command {line!r}"
            line = line.split("   #")[0]
            done = subprocess.run(["bash", "-c", line], cwd=workdir, env=_env(), capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, f"{s.doc}:{s.line}: {line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


def _run_sql(s: Snippet, workdir: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    for statement in (part.strip() for part in s.code.split(";")):
        if statement and not all(line.startswith("--") for line in statement.splitlines()):
            assert con.execute(statement).fetchall(), f"{s.doc}:{s.line}: no rows for {statement[:80]}"


DOCS_WITH_CODE = [p for p in DOC_FILES if any(_kind(s) != "output" for s in snippets(p))]


@pytest.mark.parametrize("doc", DOCS_WITH_CODE, ids=[p.name for p in DOCS_WITH_CODE])
def test_every_snippet_runs_as_written(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOCAL_RANK", str(20000 + os.getpid() % 20000))  # serve_prometheus(port=9400): a free port
    ns = _prelude(tmp_path)
    ran = 0
    try:
        for s in snippets(doc):
            kind = _kind(s)
            if kind == "python":
                _detach_all(ns)
                local = SETUPS[s.setup](ns, tmp_path) if s.setup else ns
                exec(compile(s.code, f"{s.doc}:{s.line}", "exec"), local)  # noqa: S102 - the docs' own code
                if s.setup:
                    _detach_all(local)
                ran += 1
            elif kind == "commands":
                if s.setup:
                    SETUPS[s.setup](ns, tmp_path)
                _run_commands(s, tmp_path)
                ran += 1
            elif kind == "sql":
                _run_sql(s, tmp_path)
                ran += 1
    finally:
        _detach_all(ns)
    assert ran


def test_the_snippet_test_sees_every_code_block():
    kinds = [_kind(s) for p in DOC_FILES for s in snippets(p)]
    assert kinds.count("python") >= 12 and kinds.count("commands") >= 5 and kinds.count("sql") == 1
    for p in DOC_FILES:  # a set-up comment names a known set-up
        for s in snippets(p):
            assert s.setup is None or s.setup in SETUPS, (p.name, s.line, s.setup)
