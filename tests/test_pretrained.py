"""The shipped router model: it loads, its routers are learned, and its traffic sources exist."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import moewatch
from moewatch import pretrained


@pytest.fixture(scope="module")
def model():
    model, encode = pretrained.load_router_model()
    assert encode("é a") == [0xC3, 0xA9, 0x20, 0x61]
    return model


@pytest.fixture(scope="module")
def routing(model):
    """Held-out bytes [T] and each layer's router probabilities [T, E]."""
    x = next(pretrained.heldout_batches(batch_size=8, seed=5))
    with torch.no_grad():
        out = model(input_ids=x, labels=x, output_router_logits=True)
    probs = [torch.softmax(logits.float(), dim=-1).numpy() for logits in out.router_logits]
    return x.reshape(-1).numpy(), probs, float(out.loss)


def test_model_loads_as_a_monitorable_mixtral(model):
    assert type(model).__name__ == "MixtralForCausalLM"
    assert not model.training
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with moewatch.attach(model, background=False) as mon:
        assert [(g.num_experts, g.top_k, g.family) for g in mon.gates] == [(8, 2, "mixtral")] * 4


def test_model_predicts_code_better_than_chance(routing):
    _, _, loss = routing
    assert loss < 0.5 * math.log(256)  # nats per byte on files it never saw


def test_each_router_is_balanced_and_confident(routing):
    _, probs, _ = routing
    for layer, p in enumerate(probs):
        chosen = np.argsort(-p, axis=1)[:, :2]
        share = np.bincount(chosen.ravel(), minlength=8) / chosen.size
        assert share.min() > 0.02, (layer, share)  # no expert idle on healthy traffic
        assert share.max() < 0.4, (layer, share)
        assert p.max(1).mean() > 2 / 8, layer  # top-1 probability far above uniform 1/8


def test_routing_depends_on_the_token(routing):
    ids, probs, _ = routing
    letters = np.isin(ids, list(b"abcdefghijklmnopqrstuvwxyz"))
    spaces = np.isin(ids, list(b" \n"))
    top1 = [p.argmax(1) for p in probs]
    distances = []
    for choice in top1:
        a = np.bincount(choice[letters], minlength=8) / letters.sum()
        b = np.bincount(choice[spaces], minlength=8) / spaces.sum()
        distances.append(0.5 * np.abs(a - b).sum())
    assert max(distances) > 0.3, distances  # letters and whitespace go to different experts


def test_traffic_sources():
    training, heldout = pretrained.stdlib_files(False), pretrained.stdlib_files(True)
    assert len(heldout) >= 5 and len(training) > 5 * len(heldout)
    assert not {p.name for p in training} & {p.name for p in heldout}
    a = next(pretrained.heldout_batches(batch_size=3, seed=1))
    b = next(pretrained.heldout_batches(batch_size=3, seed=1))
    assert a.shape == (3, pretrained.SEQ_LEN) and a.dtype == torch.int64
    assert torch.equal(a, b) and int(a.max()) < pretrained.BYTE_VOCAB
    assert not torch.equal(a, next(pretrained.training_batches(batch_size=3, seed=1)))
    prose = next(pretrained.prose_batches(batch_size=4, seed=2)).reshape(-1).numpy()
    words = np.isin(prose, list(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,."))
    assert words.mean() > 0.9  # running English text, not code
    with pytest.raises(ValueError, match="kind"):
        next(pretrained.batches("poetry"))
