"""Padding behind attention masks of other forms than [B, L]: only real tokens are counted.

``generate()`` with a static cache (the cache transformers compiles generation with) hands the
model a [B, 1, Q, KV] mask, or one such mask per kind of attention layer in a dict (hybrid
models); callers may pass masks of their own as [B, Q, KV] or additive float masks. Padded
positions of a left-padded batch route like any token, so counting them would skew a window
towards whatever the pad token routes to.
"""
from __future__ import annotations

import sys
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


def _padding(past: int = 0, queries: int = 6, right: bool = True) -> torch.Tensor:
    """[3, past + Q]: a full row, a left-padded one and (``right``) a right-padded one."""
    padding = torch.ones(3, past + queries, dtype=torch.long)
    padding[1, :2] = 0
    if right:
        padding[2, -2:] = 0
    else:
        padding[2, :1] = 0
    return padding


def _additive(mask: torch.Tensor, masked: float) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill(~mask, masked)


def _packed(lengths, queries: int, past: int = 0, keys: int = 0) -> torch.Tensor:
    """[1, 1, Q, KV] bool of sequences packed in one row, as continuous batching builds it: each
    sequence's ``past`` cached keys, then its new tokens, causal within the sequence; query slots
    past the sequences' tokens are padding and attend to nothing (nor does anything attend to
    the key slots past theirs, up to ``keys``)."""
    keys = max(keys, sum(lengths) + past * len(lengths))
    mask = torch.zeros(1, 1, queries, keys, dtype=torch.bool)
    query = key = 0
    for length in lengths:
        for i in range(length):
            mask[0, 0, query + i, key: key + past + i + 1] = True
        query, key = query + length, key + past + length
    return mask


def _shaped(mask: torch.Tensor, form: str) -> torch.Tensor:
    if form == "additive -inf":
        return _additive(mask, float("-inf"))
    if form == "additive minimum":
        return _additive(mask, torch.finfo(torch.float16).min).to(torch.float16)
    if form == "additive with biases":  # an ALiBi-like bias on the attended keys
        return _additive(mask, float("-inf")) - torch.rand(mask.shape)
    if form == "three dims":
        return mask[:, 0]
    if form == "int":
        return mask.to(torch.int64)
    return mask


DTYPE_FORMS = ["bool", "additive -inf", "additive minimum", "additive with biases", "three dims", "int"]


@pytest.mark.parametrize("form", DTYPE_FORMS)
@pytest.mark.parametrize("layout", ["causal", "sliding window", "bidirectional", "packed"])
def test_a_square_masks_real_queries_are_its_unpadded_tokens_left_or_right(layout, form):
    """Keys = queries (no cache): read exactly, left and right padding alike."""
    padding = _padding()
    if layout == "packed":  # 3 sequences and 3 padded slots in one row
        mask, expected = _packed([2, 3, 1], queries=9, keys=9), torch.arange(9).view(1, 9) < 6
    elif layout == "bidirectional":  # an encoder's: every query attends to every unpadded key
        mask, expected = (padding != 0).view(3, 1, 1, -1).expand(3, 1, 6, 6), padding != 0
    else:
        mask, expected = _causal(padding, window=3 if layout == "sliding window" else 0), padding != 0
    assert not expected.all()
    assert torch.equal(real_queries(_shaped(mask, form)), expected)


@pytest.mark.parametrize("form", DTYPE_FORMS)
@pytest.mark.parametrize("layout", ["static slots", "after cached tokens", "decode on a static cache",
                                    "packed decode", "packed prefill after cached tokens"])
def test_a_wider_masks_padded_queries_attend_to_nothing_and_are_not_counted(layout, form):
    """Keys beyond the queries (a cache, free slots, packed sequences): a query attending to no key
    is padding; left padding, decode steps and padded slots of a packed batch are read exactly."""
    if layout == "packed decode":  # one new token for each of 3 sequences with 4 cached, 2 padded slots
        mask, expected = _packed([1, 1, 1], queries=5, past=4), torch.tensor([[True] * 3 + [False] * 2])
    elif layout == "packed prefill after cached tokens":
        mask, expected = _packed([2, 3], queries=8, past=2), torch.arange(8).view(1, 8) < 5
    elif layout == "decode on a static cache":
        padding = torch.ones(3, 8, dtype=torch.long)
        padding[0, :3] = 0  # left padding of the prompt, long cached
        mask, expected = _causal(padding, past=7, keys=12), torch.ones(3, 1, dtype=torch.bool)
    else:
        past = 4 if layout == "after cached tokens" else 0
        padding = _padding(past, right=False)
        mask = _causal(padding, past=past, keys=13 if layout == "static slots" else 0)
        expected = padding[:, past:] != 0
    assert torch.equal(real_queries(_shaped(mask, form)), expected)


def test_a_wider_masks_right_padding_is_counted_as_the_docs_say():
    """The limit docs/hotpath.md names: on a wider key axis a right-padded query still attends to
    the real tokens before it, so it counts (generate() pads on the left)."""
    padding = _padding(past=4)  # the third row's last two queries are padding
    assert torch.equal(real_queries(_causal(padding, past=4)), torch.ones(3, 6, dtype=torch.bool))


def _form(mask) -> str:
    if isinstance(mask, dict):
        return "{" + ", ".join(f"{key}: {_form(value)}" for key, value in mask.items()) + "}"
    return f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__


def _watched(model, run, *handles):
    """(counts, windows) of ``run()`` on the monitored model; removes ``handles`` after."""
    mon = moewatch.attach(model, background=False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tiny configs' token ids outside the tiny vocabulary
            run()
        mon.flush()
        return mon.counts(), mon.windows()
    finally:
        mon.detach()
        for handle in handles:
            handle.remove()


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
    counts, frame = _watched(model, lambda: model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
        cache_implementation="static", pad_token_id=0), recorder, seen)
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


def _continuous_batching():
    """(batching config, generation config) of a compiled continuous batch (compiled: its steps
    are padded to multiples of 16 query slots) with a small cache (sized by default from the
    free memory: 15 GB of this machine's 24), 4 new tokens a request."""
    from transformers import CompileConfig, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    compiled = CompileConfig(backend="eager", fullgraph=False)
    batching = ContinuousBatchingConfig(q_padding_interval_size=16, kv_padding_interval_size=32, num_blocks=4,
                                        page_size=32, max_batch_tokens=64, varlen_compile_config=compiled,
                                        decode_compile_config=compiled)
    return batching, GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)


def test_continuous_batching_counts_the_scheduled_tokens_not_the_padded_slots():
    """transformers' continuous batching (``generate_batch``), compiled as it pads: the queries of
    every step are padded to a multiple of 16 slots, which attend to nothing in its mask."""
    model = tiny_mixtral()
    model.config._attn_implementation = "sdpa"
    scheduled = []  # per forward: the real tokens, as the batch's cumulative lengths say
    seen = model.register_forward_pre_hook(
        lambda module, args, kwargs: scheduled.append(int(kwargs["cu_seq_lens_q"].max())), with_kwargs=True)
    recorder = RouterRecorder(model)
    batching, generation = _continuous_batching()
    torch._dynamo.reset()
    counts, frame = _watched(model, lambda: model.generate_batch(
        [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]], generation_config=generation,
        continuous_batching_config=batching, progress_bar=False, warmup=False), recorder, seen)
    torch._dynamo.reset()
    for name, calls in recorder.calls.items():
        assert [indices.shape[0] for _, indices in calls] == [16] * len(scheduled), "the steps were not padded"
        expected = np.zeros(calls[0][0].shape[-1], dtype=np.int64)
        for (_, indices), real in zip(calls, scheduled):  # the real tokens lead, the padded slots follow
            np.add.at(expected, indices[:real].numpy().ravel(), 1)
        np.testing.assert_array_equal(counts[name], expected, err_msg=name)
        assert frame[frame["gate"] == name]["tokens"].sum() == sum(scheduled) == 10 + 3 * 3
    # a packed row holds several requests, which its shape does not tell: not known, not one a row
    assert frame["requests"].isna().all()


def _in_warmup() -> bool:
    """Whether this call runs under transformers' continuous-batching warm-up."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "run_one_warmup":
            return True
        frame = frame.f_back
    return False


@pytest.mark.parametrize("attention", ["sdpa", "paged|eager"])
@pytest.mark.parametrize("backend", ["staged", "device"])
def test_continuous_batchings_warm_up_is_not_counted(backend, attention):
    """``generate_batch(warmup=True)`` (the default), compiled: transformers first runs dummy
    batches of the largest sizes through the model (to compile it, or capture CUDA graphs).
    They are not traffic: all of one token id, they route alike, and counted they made the first
    window look collapsed. Only the requests' own scheduled tokens count."""
    model = tiny_mixtral()
    model.config._attn_implementation = attention
    scheduled = []  # per forward: (under the warm-up, the real tokens as the cumulative lengths say)
    seen = model.register_forward_pre_hook(
        lambda module, args, kwargs: scheduled.append((_in_warmup(), int(kwargs["cu_seq_lens_q"].max()))),
        with_kwargs=True)
    recorder = RouterRecorder(model)
    batching, generation = _continuous_batching()
    torch._dynamo.reset()
    with moewatch.attach(model, background=False, backend=backend) as mon, torch.no_grad(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.generate_batch([[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]], generation_config=generation,
                             continuous_batching_config=batching, progress_bar=False, warmup=True)
        mon.flush()
        counts, frame = mon.counts(), mon.windows()
    seen.remove()
    recorder.remove()
    torch._dynamo.reset()
    warm = [warming for warming, _ in scheduled]
    assert any(warm) and not all(warm), "no warm-up ran, or nothing else did"
    for name, calls in recorder.calls.items():
        assert len(calls) == len(scheduled), name
        expected = np.zeros(calls[0][0].shape[-1], dtype=np.int64)
        for (_, indices), (warming, real) in zip(calls, scheduled):
            if not warming:  # the real tokens lead, the padded slots follow
                np.add.at(expected, indices[:real].numpy().ravel(), 1)
        np.testing.assert_array_equal(counts[name], expected, err_msg=name)
    real = sum(tokens for warming, tokens in scheduled if not warming)
    assert real == 10 + 3 * 3
    assert frame["tokens"].sum() == real * len(recorder.calls)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("backend", ["staged", "device"])
def test_a_paused_monitor_counts_nothing_and_what_was_compiled_paused_counts_after(backend, compiled):
    """While paused (a serving loop's warm-up), forwards count nothing, with a padding mask or
    without one; code compiled while paused (as a CUDA graph is captured in a warm-up) reads the
    flag when it runs: after ``resume`` it counts, without a recompile."""
    model = tiny_mixtral()
    ids, mask = _left_padded()
    frames = []
    step = model
    if compiled:
        def counting_backend(graph, inputs):
            frames.append(graph)
            return graph.forward
        # the model inside a compiled function, as continuous batching compiles its step: the
        # root hooks are traced into the graph, the flag is one of its inputs
        step = torch.compile(lambda **inputs: model(**inputs).logits, fullgraph=True, backend=counting_backend)
    torch._dynamo.reset()
    with moewatch.attach(model, background=False, backend=backend) as mon, torch.no_grad():
        mon._pause()
        step(input_ids=ids, attention_mask=mask)
        step(input_ids=ids)
        mon.flush()
        assert all(int(c.sum()) == 0 for c in mon.counts().values())
        compiled_paused = len(frames)
        mon._resume()
        step(input_ids=ids, attention_mask=mask)
        step(input_ids=ids)
        mon.flush()
        counts = mon.counts()
    torch._dynamo.reset()
    assert len(frames) == compiled_paused, "resuming recompiled the model"
    with moewatch.attach(model, background=False, backend=backend) as plain, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids)
        plain.flush()
        for name, expected in plain.counts().items():
            assert expected.sum() == (int(mask.sum()) + ids.numel()) * 2  # top-2
            np.testing.assert_array_equal(counts[name], expected, err_msg=name)
