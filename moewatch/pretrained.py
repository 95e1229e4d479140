"""A small trained Mixtral-architecture MoE, shipped with moewatch, and traffic to run it on.

The model (``moewatch/assets/router_model/``) is a byte-level ``MixtralForCausalLM`` trained on
the CPU by ``benchmarks/train_router_model.py`` on the Python standard library's own source
files, with the auxiliary load-balancing loss, so its routers are learned and token-dependent
(unlike the near-uniform routers of random weights). The demo, the detection benchmark and the
tests run it on three kinds of traffic, all made from text present on every machine:

* :func:`training_batches` -- the files the model was trained on (record a baseline from these);
* :func:`heldout_batches` -- stdlib files it never saw (healthy live traffic);
* :func:`prose_batches` -- English prose from the reference manual bundled with Python
  (``pydoc_data``), a domain shift away from code.

Which stdlib file is held out is decided by its name alone (:func:`is_heldout`), so the split is
the same on every machine and Python version.
"""
from __future__ import annotations

import json
import os
import sysconfig
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "router_model"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINING_FILE = "training.json"

BYTE_VOCAB = 256
PAD_ID = 256  # one id past the bytes: padding
SEQ_LEN = 128  # context the model was trained with
HELDOUT_BUCKETS = 10  # 1 file in HELDOUT_BUCKETS is held out

# The architecture (also the one the training script builds).
MODEL_CONFIG = dict(
    vocab_size=BYTE_VOCAB + 1,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=SEQ_LEN,
    pad_token_id=PAD_ID,
    bos_token_id=None,
    eos_token_id=None,
    tie_word_embeddings=False,
    router_jitter_noise=0.0,
    output_router_logits=False,
)

Encode = Callable[[str], List[int]]


# -- text and bytes ------------------------------------------------------------------------
def encode(text: str) -> List[int]:
    """Text -> byte ids (UTF-8); the model's tokenizer."""
    return list(text.encode("utf-8", errors="replace"))


def decode(ids: Sequence[int]) -> str:
    """Byte ids -> text (padding and invalid bytes dropped/replaced)."""
    return bytes(i for i in ids if 0 <= i < BYTE_VOCAB).decode("utf-8", errors="replace")


# -- the corpus ----------------------------------------------------------------------------
def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(name: str) -> bool:
    """Whether the stdlib file ``name`` is held out from training (a fixed hash of its name)."""
    return zlib.crc32(name.encode()) % HELDOUT_BUCKETS == 0


@lru_cache(maxsize=None)
def stdlib_files(heldout: bool) -> Tuple[Path, ...]:
    """Top-level ``*.py`` files of the standard library, sorted, training or held-out ones."""
    root = stdlib_dir()
    names = sorted(n for n in os.listdir(root) if n.endswith(".py") and (root / n).is_file())
    return tuple(root / n for n in names if is_heldout(n) == heldout)


@lru_cache(maxsize=None)
def _corpus(kind: str) -> np.ndarray:
    """One uint8 array of the concatenated texts of ``kind`` (training, heldout, prose)."""
    if kind == "prose":
        texts = prose_texts()
    else:
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(kind == "heldout")]
    data = "\n\n".join(texts).encode("utf-8", errors="replace")
    if len(data) < 4 * SEQ_LEN:
        raise RuntimeError(f"moewatch.pretrained: the {kind} corpus is too small ({len(data)} bytes)")
    return np.frombuffer(data, dtype=np.uint8)


def _prose_paragraphs(text: str) -> List[str]:
    """Paragraphs of running text: drop indented blocks (code, grammar) and heading rules."""
    out = []
    for para in text.split("\n\n"):
        lines = [ln for ln in para.splitlines() if ln.strip()]
        if not lines or any(ln[:1].isspace() for ln in lines):
            continue
        if all(set(ln.strip()) <= set("*=-~^") for ln in lines[1:]) and len(lines) <= 2:
            continue  # a heading and its underline
        joined = " ".join(ln.strip() for ln in lines)
        if len(joined) >= 80:
            out.append(joined)
    return out


def prose_texts() -> List[str]:
    """English prose present on every machine: the reference manual's topics in ``pydoc_data``
    (running text only), or the licence texts under ``/usr/share/common-licenses``."""
    paragraphs: List[str] = []
    try:
        from pydoc_data.topics import topics  # the stdlib's help() pages

        for key in sorted(topics):
            paragraphs.extend(_prose_paragraphs(topics[key]))
    except ImportError:
        pass
    if sum(map(len, paragraphs)) < 50_000:
        licenses = Path("/usr/share/common-licenses")
        if licenses.is_dir():
            for p in sorted(licenses.iterdir()):
                if p.is_file():
                    paragraphs.extend(_prose_paragraphs(p.read_text(errors="replace")))
    return paragraphs


# -- batches ------------------------------------------------------------------------------
def random_batch(kind: str, batch_size: int, generator: np.random.Generator,
                 seq_len: int = SEQ_LEN) -> torch.Tensor:
    """[batch_size, seq_len] int64 byte ids: windows at random offsets of corpus ``kind``."""
    data = _corpus(kind)
    starts = generator.integers(0, len(data) - seq_len, size=batch_size)
    rows = np.stack([data[s:s + seq_len] for s in starts]).astype(np.int64)
    return torch.from_numpy(rows)


def batches(kind: str, batch_size: int = 8, seed: int = 0, count: Optional[int] = None,
            seq_len: int = SEQ_LEN) -> Iterator[torch.Tensor]:
    """Reproducible batches of traffic ``kind`` ("training", "heldout" or "prose").

    Each batch is [batch_size, seq_len] int64 ids taken at random offsets; ``count`` batches
    (forever when None).
    """
    if kind not in ("training", "heldout", "prose"):
        raise ValueError(f"kind={kind!r} must be 'training', 'heldout' or 'prose'")
    generator = np.random.default_rng(seed)
    produced = 0
    while count is None or produced < count:
        yield random_batch(kind, batch_size, generator, seq_len)
        produced += 1


def training_batches(batch_size: int = 8, seed: int = 0, count: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Traffic from the training distribution (the files the model was trained on)."""
    return batches("training", batch_size, seed, count)


def heldout_batches(batch_size: int = 8, seed: int = 0, count: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Healthy live traffic: stdlib files the model never saw."""
    return batches("heldout", batch_size, seed, count)


def prose_batches(batch_size: int = 8, seed: int = 0, count: Optional[int] = None) -> Iterator[torch.Tensor]:
    """A domain shift: English prose instead of code."""
    return batches("prose", batch_size, seed, count)


# -- the model ----------------------------------------------------------------------------
def router_model_config(directory: Path = ASSET_DIR):
    """The ``MixtralConfig`` of the shipped model (the shipped config.json when present)."""
    from transformers import MixtralConfig

    path = Path(directory) / CONFIG_FILE
    if path.is_file():
        return MixtralConfig.from_dict(json.loads(path.read_text()))
    return MixtralConfig(**MODEL_CONFIG)


def training_info() -> dict:
    """What the training script recorded (steps, losses, routing checks)."""
    path = ASSET_DIR / TRAINING_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_router_model(device: str = "cpu", dtype: torch.dtype = torch.float32,
                      directory: Path = ASSET_DIR) -> Tuple[torch.nn.Module, Encode]:
    """The trained router model (eval mode) and its tokenizer ``encode(text) -> ids``.

    Weights are read with safetensors (no pickle). Raises FileNotFoundError naming the
    script that makes them when the asset is missing.
    """
    from safetensors.torch import load_file
    from transformers import MixtralForCausalLM

    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; run benchmarks/train_router_model.py to make it")
    config = router_model_config(directory)
    config._attn_implementation = "sdpa"
    torch_seed = torch.random.get_rng_state()  # building the model draws random init weights
    try:
        model = MixtralForCausalLM(config)
    finally:
        torch.random.set_rng_state(torch_seed)
    state = load_file(str(weights), device="cpu")
    try:
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    except RuntimeError as error:
        raise RuntimeError(f"{weights} does not match the model in {Path(directory) / CONFIG_FILE}: {error}") from None
    model.to(device=device, dtype=dtype)
    model.eval()
    return model, encode


def save_router_model(model: torch.nn.Module, directory: Path = ASSET_DIR, info: Optional[dict] = None) -> None:
    """Write weights (float16 safetensors), config.json and training.json to ``directory``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    config = model.config.to_dict()
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if info is not None:
        (directory / TRAINING_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
