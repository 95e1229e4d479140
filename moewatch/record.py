"""Record a baseline from a local transformers model directory and text files, without Python.

``moewatch baseline record MODEL_DIR DATA... -o baseline.json`` (see ``moewatch.cli_baseline``)
runs :func:`record_baseline`: load the model and its tokenizer from the directory (no network),
read the texts (plain text files, or JSONL with one document per line), cut them into
sequences, and run them through the model with a monitor attached, one window every
``window_tokens`` tokens. How much traffic that is, and how many windows it makes, is worked
out and printed *before* the model runs; too little for a baseline is an error then, not after.

Tokenizer: the directory's own (``tokenizer.json`` / ``tokenizer_config.json``, read by
``transformers.AutoTokenizer``), another directory (``tokenizer=DIR``), or ``tokenizer="bytes"``
for byte-level models whose token ids are the UTF-8 bytes of the text (such as the demo's model).
A directory without a tokenizer is a clear error that names these choices.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence

from .baseline import MIN_WINDOWS, Baseline, BaselineError

BYTES = "bytes"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
MIN_WINDOW_TOKENS = 256  # smaller windows say little about a gate's load
MAX_WINDOW_TOKENS = 8192  # the attach default: a baseline window as large as a live one
TARGET_WINDOWS = 32  # windows aimed for when the traffic allows (8 at the very least)

Encode = Callable[[str], List[int]]


class RecordError(ValueError):
    """Recording cannot start: a missing tokenizer, unreadable data, too little traffic."""


@dataclass
class Plan:
    """How the traffic is cut: decided before the model runs."""

    documents: int
    tokens: int
    seq_len: int
    batch_size: int
    window_tokens: int

    @property
    def windows(self) -> int:
        return self.tokens // self.window_tokens

    def describe(self) -> str:
        return (f"{self.documents} document(s), {self.tokens:,} tokens -> about {self.windows} windows of "
                f"{self.window_tokens:,} tokens (sequences of up to {self.seq_len}, {self.batch_size} per batch)")


# -- reading the data -------------------------------------------------------------------------
def read_texts(paths: Sequence[str], text_key: str = "text") -> List[str]:
    """The documents of ``paths``: a ``.jsonl`` file holds one per line (a JSON string, or an
    object whose ``text_key`` field is the text); any other file is one document of UTF-8 text."""
    texts: List[str] = []
    for path in paths:
        if not os.path.isfile(path):
            raise RecordError(f"{path}: no such file (DATA are text or JSONL files)")
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8", errors="replace") as fh:
                for number, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        item = json.loads(line)
                    except ValueError as error:
                        raise RecordError(f"{path}:{number}: not a JSON line ({error})") from None
                    text = item.get(text_key) if isinstance(item, dict) else item
                    if not isinstance(text, str):
                        raise RecordError(f"{path}:{number}: no {text_key!r} text field (use --text-key)")
                    texts.append(text)
        else:
            with open(path, encoding="utf-8", errors="replace") as fh:
                texts.append(fh.read())
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise RecordError("the DATA files hold no text")
    return texts


# -- tokenizer --------------------------------------------------------------------------------
def has_tokenizer(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES)


def make_encoder(model_dir: str, tokenizer: Optional[str], vocab_size: int) -> Encode:
    """text -> token ids, from the model directory's tokenizer, another directory, or bytes."""
    if tokenizer == BYTES:
        if vocab_size < 256:
            raise RecordError(f"--tokenizer bytes needs a vocabulary of at least 256 ids; this model has {vocab_size}")
        return lambda text: list(text.encode("utf-8"))
    source = tokenizer or model_dir
    if not has_tokenizer(source):
        raise RecordError(
            f"{source} has no tokenizer ({' / '.join(TOKENIZER_FILES)}): pass --tokenizer DIR (a directory "
            "with the model's tokenizer), or --tokenizer bytes for a byte-level model (token id = UTF-8 byte)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    return lambda text: list(tok(text, add_special_tokens=True)["input_ids"])


# -- planning ---------------------------------------------------------------------------------
def plan(token_counts: Sequence[int], max_positions: Optional[int], seq_len: int, batch_size: int,
         window_tokens: Optional[int]) -> Plan:
    """Cut the traffic into windows: ``window_tokens`` if given, else as many windows as make
    sense (TARGET_WINDOWS, of MIN_WINDOW_TOKENS to MAX_WINDOW_TOKENS tokens). Raises RecordError
    when the traffic cannot make MIN_WINDOWS windows, saying how much is needed."""
    total = int(sum(token_counts))
    if window_tokens is None:
        window_tokens = min(MAX_WINDOW_TOKENS, max(MIN_WINDOW_TOKENS, total // TARGET_WINDOWS))
    needed = MIN_WINDOWS * window_tokens
    if total < needed:
        floor = MIN_WINDOWS * MIN_WINDOW_TOKENS
        raise RecordError(
            f"the data holds {total:,} tokens: a baseline needs at least {MIN_WINDOWS} windows, "
            f"{needed:,} tokens at {window_tokens:,} tokens per window"
            + (f" (at the smallest window, {MIN_WINDOW_TOKENS} tokens: {floor:,})" if needed > floor else "")
            + f"; {MIN_WINDOWS * MAX_WINDOW_TOKENS * 4:,}+ tokens make a baseline with windows as large as the "
            "live default (window_tokens=8192). Add more text")
    seq = max(1, min(seq_len, window_tokens, max_positions or seq_len))
    batch = max(1, min(batch_size, window_tokens // seq))
    return Plan(documents=len(token_counts), tokens=total, seq_len=seq, batch_size=batch, window_tokens=window_tokens)


def sequences(documents: Sequence[List[int]], seq_len: int) -> Iterator[List[int]]:
    """Each document cut into sequences of ``seq_len`` tokens (the last one shorter)."""
    for ids in documents:
        for start in range(0, len(ids), seq_len):
            yield ids[start:start + seq_len]


def batches(documents: Sequence[List[int]], plan_: Plan, pad_id: int) -> Iterator[tuple]:
    """(input_ids [B, S], attention_mask [B, S], real tokens) batches; padding is masked out."""
    import torch

    chunk: List[List[int]] = []
    for seq in sequences(documents, plan_.seq_len):
        chunk.append(seq)
        if len(chunk) == plan_.batch_size:
            yield _pad(chunk, pad_id, torch)
            chunk = []
    if chunk:
        yield _pad(chunk, pad_id, torch)


def _pad(chunk: List[List[int]], pad_id: int, torch) -> tuple:
    width = max(len(s) for s in chunk)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, seq in enumerate(chunk):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids, mask, sum(len(s) for s in chunk)


# -- the model ---------------------------------------------------------------------------------
def load_model(model_dir: str, device: str = "cpu", dtype: str = "auto"):
    """A transformers model from a local directory (never the network), in eval mode."""
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise RecordError(f"{model_dir} is not a transformers model directory (no config.json)")
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    kwargs = {"local_files_only": True}
    if dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except ValueError:  # not a causal LM architecture: the bare model still routes
        model = AutoModel.from_pretrained(model_dir, **kwargs)
    return model.to(device).eval()


def record_baseline(model_dir: str, data: Sequence[str], tokenizer: Optional[str] = None,
                    text_key: str = "text", seq_len: int = 512, batch_size: int = 8,
                    window_tokens: Optional[int] = None, device: str = "cpu", dtype: str = "auto",
                    model_name: Optional[str] = None, progress: bool = True,
                    log: Callable[[str], None] = print, **attach_options) -> Baseline:
    """Run the texts of ``data`` through the model in ``model_dir`` and return their baseline.

    Prints (through ``log``) the plan before the model runs and shows a progress bar (tqdm, on
    stderr) while it does. Raises :class:`RecordError` before running when the data is too little.
    """
    import torch

    import moewatch

    texts = read_texts(data, text_key)
    model = load_model(model_dir, device, dtype)
    config = model.config
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    encode = make_encoder(model_dir, tokenizer, vocab)
    documents = [encode(t) for t in texts]
    documents = [d for d in documents if d]
    too_big = max((max(d) for d in documents), default=0)
    if vocab and too_big >= vocab:
        raise RecordError(f"the tokenizer makes token id {too_big}, beyond this model's vocabulary of {vocab}: "
                          "it is not this model's tokenizer")
    the_plan = plan([len(d) for d in documents], getattr(config, "max_position_embeddings", None),
                    seq_len, batch_size, window_tokens)
    log(f"recording: {the_plan.describe()}")
    pad_id = getattr(config, "pad_token_id", None)
    pad_id = 0 if pad_id is None or (vocab and pad_id >= vocab) else int(pad_id)
    options = dict(background=False, window_tokens=the_plan.window_tokens)
    if model_name:
        options["model_name"] = model_name
    options.update(attach_options)
    bar = _bar(the_plan.tokens, progress)
    mon = moewatch.attach(model, **options)
    try:
        pending = closed = 0
        with torch.inference_mode():
            for ids, mask, real in batches(documents, the_plan, pad_id):
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
                pending += real
                if pending >= the_plan.window_tokens:
                    mon.flush()
                    pending, closed = 0, closed + 1
                bar.update(real)
                bar.set_postfix(windows=closed, refresh=False)
        if pending >= the_plan.window_tokens // 2:  # a last window of at least half the size
            mon.flush()
        failures = {c: n for c, n in mon.error_counts().items() if c in ("hook", "reader", "detector")}
        if failures:
            raise BaselineError(f"monitoring failed while recording ({failures}): {mon.health().note}")
        return Baseline.from_frame(mon.windows(), model_name=mon.model_name)
    finally:
        bar.close()
        mon.detach()


class _NoBar:
    def update(self, n): pass

    def set_postfix(self, **kw): pass

    def close(self): pass


def _bar(total: int, show: bool):
    if not show:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with transformers; without it, no bar
        return _NoBar()
    return tqdm(total=total, unit="tok", unit_scale=True, desc="baseline", dynamic_ncols=True)


def traffic_hint(tokens: int, windows: int, window_tokens: int) -> str:
    """What a monitor that saw ``tokens`` in ``windows`` windows lacks for a baseline (for errors)."""
    needed = MIN_WINDOWS * window_tokens
    text = (f"this monitor closed {windows} window(s) from {tokens:,} tokens; a baseline needs {MIN_WINDOWS} "
            f"windows per gate: at window_tokens={window_tokens:,} that is {needed:,} tokens")
    if tokens < needed:
        text += f" ({needed - tokens:,} more)"
    if tokens >= MIN_WINDOWS:
        text += (f", or record this traffic with window_tokens={max(1, tokens // MIN_WINDOWS):,}, or with "
                 "background=False and mon.flush() after each batch (each batch a window)")
    return text
