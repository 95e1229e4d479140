"""Padding behind attention masks of other forms than [B, L]: only real tokens are counted.

``generate()`` with a static cache (the cache transformers compiles generation with) hands the
model a [B, 1, Q, KV] mask, or one such mask per kind of attention layer in a dict (hybrid
models); callers may pass masks of their own as [B, Q, KV] or additive float masks. Padded
positions of a left-padded batch route like any token, so counting them would skew a window
towards whatever the pad token routes to.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import moewatch
from moewatch.context import real_queries
from hf_zoo import FAMILIES, model_class, tiny_model
from test_families_exact import RouterRecorder
from tests.tiny_models import tiny_mixtral

# every family whose tiny model generates (the others are text models under a multimodal one)
GENERATING = [f for f in FAMILIES if hasattr(model_class(f), "generate")]
NEW_TOKENS = 3


def _left_padded(batch: int = 3, length: int = 9):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 128, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _causal(padding: torch.Tensor, past: int = 0, keys: int = 0, window: int = 0) -> torch.Tensor:
    """[B, 1, Q, KV] bool, as transformers builds it: query q sits at key position past + q and
    attends to the unpadded keys at or before it (within ``window`` where given); ``padding``
    [B, past + Q] covers the keys that hold tokens, ``keys`` widens the key axis with free slots."""
    batch, total = padding.shape
    queries = total - past
    keys = max(keys, total)
    position = past + torch.arange(queries).view(queries, 1)  # [Q, 1]
    key = torch.arange(keys).view(1, keys)  # [1, KV]
    allowed = key <= position
    if window:
        allowed &= key > position - window
    present = torch.zeros(batch, keys, dtype=torch.bool)
    present[:, :total] = padding != 0
    return (allowed.unsqueeze(0) & present.unsqueeze(1)).unsqueeze(1)  # [B, 1, Q, KV]


def _padding(past: int = 0, queries: int = 6) -> torch.Tensor:
    """[3, past + Q]: a full row, a left-padded and a right-padded one."""
    padding = torch.ones(3, past + queries, dtype=torch.long)
    padding[1, :2] = 0
    padding[2, -2:] = 0
    return padding


def _additive(mask: torch.Tensor, masked: float) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill(~mask, masked)


@pytest.mark.parametrize("form", ["square", "static slots", "after cached tokens", "sliding window",
                                  "additive -inf", "additive minimum", "additive with biases", "three dims",
                                  "bidirectional", "int"])
def test_the_real_queries_of_an_attention_mask_are_its_unpadded_tokens(form):
    past = 4 if form == "after cached tokens" else 0
    padding = _padding(past)
    mask = _causal(padding, past=past, keys=13 if form == "static slots" else 0,
                   window=3 if form == "sliding window" else 0)
    if form == "additive -inf":
        mask = _additive(mask, float("-inf"))
    elif form == "additive minimum":
        mask = _additive(mask, torch.finfo(torch.float16).min).to(torch.float16)
    elif form == "additive with biases":  # an ALiBi-like bias on the attended keys
        mask = _additive(mask, float("-inf")) - torch.rand(mask.shape)
    elif form == "three dims":
        mask = mask[:, 0]
    elif form == "bidirectional":  # an encoder's: every query attends to every unpadded key
        mask = (padding != 0).view(3, 1, 1, -1).expand(3, 1, padding.shape[1], padding.shape[1])
    elif form == "int":
        mask = mask.to(torch.int64)
    expected = padding[:, past:] != 0  # [B, Q]
    assert not expected.all()
    assert torch.equal(real_queries(mask), expected)


def test_a_decode_step_on_a_static_cache_is_real_in_every_row():
    padding = torch.ones(3, 8, dtype=torch.long)
    padding[0, :3] = 0  # left padding of the prompt, long cached
    mask = _causal(padding, past=7, keys=12)  # [3, 1, 1, 12]
    assert torch.equal(real_queries(mask), torch.ones(3, 1, dtype=torch.bool))


def _form(mask) -> str:
    if isinstance(mask, dict):
        return "{" + ", ".join(f"{key}: {_form(value)}" for key, value in mask.items()) + "}"
    return f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__


def _expected_counts(calls, prompt_mask: torch.Tensor) -> np.ndarray:
    """Assignments per expert over the prompt's unpadded tokens and every decode step's tokens."""
    counts = np.zeros(calls[0][0].shape[-1], dtype=np.int64)
    for step, (_, indices) in enumerate(calls):
        real = (prompt_mask.reshape(-1) != 0).numpy() if step == 0 else np.ones(indices.shape[0], dtype=bool)
        assert indices.shape[0] == real.size
        np.add.at(counts, indices.numpy()[real].ravel(), 1)
    return counts


@pytest.mark.parametrize("family", GENERATING)
def test_generate_with_a_static_cache_counts_only_the_real_tokens(family):
    model = tiny_model(family)
    ids, mask = _left_padded()
    forms = []  # the masks the model was handed, for the message of a failure
    seen = model.register_forward_pre_hook(
        lambda module, args, kwargs: forms.append(_form(kwargs.get("attention_mask"))), with_kwargs=True)
    recorder = RouterRecorder(model)
    mon = moewatch.attach(model, background=False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tiny configs' token ids outside the tiny vocabulary
            model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                           do_sample=False, cache_implementation="static", pad_token_id=0)
        mon.flush()
        counts, frame = mon.counts(), mon.windows()
    finally:
        mon.detach()
        recorder.remove()
        seen.remove()
    real = int(mask.sum()) + mask.shape[0] * (NEW_TOKENS - 1)  # the last new token is not fed back
    for name, calls in recorder.calls.items():
        assert len(calls) == NEW_TOKENS, name
        np.testing.assert_array_equal(counts[name], _expected_counts(calls, mask), err_msg=f"{name}, masks {forms}")
        assert frame[frame["gate"] == name]["tokens"].sum() == real, name


@pytest.mark.parametrize("backend", ["staged", "device"])
def test_an_attention_mask_passed_in_counts_what_its_padding_mask_counts(backend):
    """The same batch with its [B, L] mask and with the [B, 1, L, L] mask built from it, eager and
    traced into a bigger compiled function: the same counts."""
    model = tiny_mixtral()
    ids, mask = _left_padded()
    four_d = _causal(mask)

    def run(attention_mask, compiled: bool) -> dict:
        with moewatch.attach(model, background=False, backend=backend) as mon, torch.no_grad():
            def step(input_ids, attention_mask):
                return model(input_ids=input_ids, attention_mask=attention_mask).logits

            if compiled:
                step = torch.compile(step, fullgraph=True, backend="eager")
            step(ids, attention_mask)
            mon.flush()
            return mon.counts(), int(mon.windows()["tokens"].iloc[0])

    torch._dynamo.reset()
    (plain, tokens), (eager, eager_tokens), (traced, traced_tokens) = (
        run(mask, False), run(four_d, False), run(four_d, True))
    torch._dynamo.reset()
    assert tokens == eager_tokens == traced_tokens == int(mask.sum())
    for name in plain:
        np.testing.assert_array_equal(eager[name], plain[name], err_msg=name)
        np.testing.assert_array_equal(traced[name], plain[name], err_msg=name)
