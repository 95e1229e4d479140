"""Every window statistic against a plain numpy reference computed from the same logits."""
import numpy as np
import pytest
import torch

import moewatch
from tests.moe_from_scratch import TinyMoELM


def numpy_reference(logits: np.ndarray, valid: np.ndarray, top_k: int, scoring: str) -> dict:
    """Window statistics of one gate from its raw logits [T, E] and valid flags [T]."""
    x = logits[valid].astype(np.float64)
    finite = np.isfinite(x)
    x = np.where(finite, x, 0.0)
    if scoring == "softmax":
        e = np.exp(x - x.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
    else:
        s = 1 / (1 + np.exp(-x))
        p = s / s.sum(axis=1, keepdims=True)
    top = np.sort(p, axis=1)[:, ::-1]
    idx = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
    counts = np.bincount(idx.reshape(-1), minlength=x.shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    m = x.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]
    vals = x[finite]
    share = counts / counts.sum()
    nz = share[share > 0]
    load_entropy = -(nz * np.log(nz)).sum()
    return {
        "tokens": int(valid.sum()),
        "expert_counts": counts,
        "expert_prob_mean": p.mean(axis=0),
        "entropy_mean": entropy.mean(),
        "logit_mean": vals.mean(),
        "logit_std": vals.std(),
        "logit_absmax": np.abs(vals).max(),
        "top1_prob_mean": top[:, 0].mean(),
        "margin_mean": (top[:, 0] - top[:, 1]).mean(),
        "zloss_mean": (lse ** 2).mean(),
        "nonfinite_logits": int((~finite).sum()),
        "load_entropy": load_entropy,
        "effective_experts": np.exp(load_entropy),
        "top_share": share.max(),
        "dead_experts": int((counts == 0).sum()),
    }


class Recorder:
    """A test hook on the router: optionally corrupts its logits, records what the gate emitted."""

    def __init__(self, poison: bool = False):
        self.logits = []
        self.poison = poison

    def __call__(self, module, args, output):
        out = output
        if self.poison:
            out = output.clone()
            out[0, 0, 1] = float("nan")
            out[1, 2, 3] = float("inf")
            out[2, 1, :] = float("-inf")  # a whole token
        self.logits.append(out.detach().reshape(-1, out.shape[-1]).numpy().copy())
        return out if self.poison else None


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("poison", [False, True])
def test_window_statistics_match_numpy(scoring, poison):
    torch.manual_seed(3)
    model = TinyMoELM(layers=1).eval()
    with torch.no_grad():
        model.blocks[0].router.weight.mul_(6)  # wider logits: a non-trivial distribution
    recorder = Recorder(poison)
    model.blocks[0].router.register_forward_hook(recorder)  # before attach: moewatch sees its output
    mon = moewatch.attach(model, gates="blocks.0.router", top_k=2, scoring=scoring, background=False)
    batches = []
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 64, (3, 9), generator=gen)
        mask = torch.ones(3, 9, dtype=torch.long)
        mask[seed, :4] = 0
        batches.append(mask.reshape(-1).bool().numpy())
        with torch.no_grad():
            model(ids, attention_mask=mask)
    row = mon.flush() and mon.windows().iloc[0]
    mon.detach()
    logits = np.concatenate(recorder.logits)
    valid = np.concatenate(batches)
    ref = numpy_reference(logits, valid, 2, scoring)
    assert row["tokens"] == ref["tokens"]
    assert row["nonfinite_logits"] == ref["nonfinite_logits"]
    if not poison:  # with -inf rows the top-k tie order is arbitrary
        np.testing.assert_array_equal(row["expert_counts"], ref["expert_counts"])
        assert row["dead_experts"] == ref["dead_experts"]
        for key in ("load_entropy", "effective_experts", "top_share"):
            assert row[key] == pytest.approx(ref[key], rel=1e-9), key
    np.testing.assert_allclose(row["expert_prob_mean"], ref["expert_prob_mean"], rtol=1e-5, atol=1e-7)
    for key in ("entropy_mean", "logit_mean", "logit_std", "logit_absmax", "top1_prob_mean",
                "margin_mean", "zloss_mean"):
        assert row[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    assert row["assignments"] == 2 * ref["tokens"]


def test_windows_are_differences_and_max_is_per_window():
    torch.manual_seed(4)
    model = TinyMoELM(layers=1).eval()
    recorder = Recorder()
    model.blocks[0].router.register_forward_hook(recorder)
    mon = moewatch.attach(model, gates="blocks.0.router", top_k=2, background=False)
    big = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        model.blocks[0].router.weight.mul_(10)
        model(big)
        mon.flush()
        model.blocks[0].router.weight.div_(10)
        model(big[:1])
        mon.flush()
    frame = mon.windows()
    mon.detach()
    assert list(frame["tokens"]) == [32, 16]
    first, second = recorder.logits
    assert frame["logit_absmax"].iloc[0] == pytest.approx(np.abs(first).max(), rel=1e-6)
    assert frame["logit_absmax"].iloc[1] == pytest.approx(np.abs(second).max(), rel=1e-6)
    assert frame["expert_counts"].iloc[0].sum() + frame["expert_counts"].iloc[1].sum() == 96


def test_would_be_drops_with_capacity_factor():
    torch.manual_seed(5)
    model = TinyMoELM(layers=1).eval()
    with torch.no_grad():
        model.blocks[0].router.weight.mul_(4)
    cf = 1.25
    mon = moewatch.attach(model, gates="blocks.0.router", top_k=2, capacity_factor=cf, background=False)
    expected = 0
    for seed in range(3):
        ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            model(ids)
        per_expert = np.bincount(model.blocks[0].last_indices.reshape(-1).numpy(), minlength=8)
        capacity = np.ceil(22 * 2 / 8 * cf)
        expected += int(np.clip(per_expert - capacity, 0, None).sum())
    assert mon.dropped() == {"blocks.0.router": expected}
    assert expected > 0  # the test must exercise overflow
    mon.detach()
