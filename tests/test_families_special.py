"""Exactness for the MoE families whose router is not a plain (logits, weights, indices) triple.

For every family: attach, run two padded batches, and check that ``counts()`` equals the
model's own routing decisions, read independently by this test's own hooks (the experts'
lookup table, the dispatch the router built, the hash table, or the family's rule applied to
the logits the router returned), with padding excluded; that Switch and NLLB ``dropped()``
equal an independent replay of their capacity rule; that outputs are bit-identical with and
without the monitor; and that ``detach()`` leaves no moewatch hook behind.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Dict, List

import numpy as np
import pytest
import torch
from torch import nn

import moewatch
from moewatch.taps import tapped
from hf_zoo_special import EXPERTS, FAMILIES, padded_batch, tiny_model

FAMILY_LIST = FAMILIES  # imported by tests/test_family_coverage.py


def one_hot_counts(indices: torch.Tensor, valid: torch.Tensor, width: int) -> np.ndarray:
    """Assignments per expert of the valid tokens. indices [T, k], valid [T] bool."""
    rows = indices[valid.bool()].reshape(-1)
    return np.bincount(rows.numpy(), minlength=width).astype(np.int64)


class Expected:
    """Counts and drops per gate, accumulated from this test's own observations."""

    def __init__(self):
        self.counts: Dict[str, np.ndarray] = {}
        self.dropped: Dict[str, int] = defaultdict(int)
        self.calls: Dict[str, int] = defaultdict(int)

    def add(self, gate: str, counts: np.ndarray, dropped: int = 0) -> None:
        self.counts[gate] = self.counts.get(gate, 0) + counts
        self.dropped[gate] += dropped
        self.calls[gate] += 1


def _flat_mask(inputs: dict, key: str = "attention_mask") -> torch.Tensor:
    return inputs[key].reshape(-1).bool()  # [B*S]


def _decoder(name: str) -> bool:
    return "decoder" in name.split(".")


# ---- per-family observers: install hooks that record the model's own decisions --------------
# observer(model, expected, current_inputs) -> list of hook handles; current_inputs is a
# one-element list holding the inputs of the batch being run.

def observe_dbrx(model, exp, cur):
    handles = []
    for name, mod in model.named_modules():
        if type(mod).__name__ == "DbrxFFN":
            def pre(m, args, kwargs, gate=f"{name}.router"):
                exp.add(gate, one_hot_counts(args[1], _flat_mask(cur[0]), EXPERTS))  # experts' top_k_index
            handles.append(mod.experts.register_forward_pre_hook(pre, with_kwargs=True))
    return handles


def observe_llama4(model, exp, cur):
    handles = []
    for name, mod in model.named_modules():
        if type(mod).__name__ == "Llama4Router":
            def post(m, args, kwargs, out, gate=name):
                scores = out[0]  # [T, E]: sigmoid of the chosen logits, exactly 0 elsewhere
                assert bool(((scores > 0).sum(-1) == m.top_k).all())
                chosen = (scores > 0).long()
                exp.add(gate, chosen[_flat_mask(cur[0])].sum(0).numpy().astype(np.int64))
            handles.append(mod.register_forward_hook(post, with_kwargs=True))
    return handles


def observe_jetmoe(model, exp, cur):
    handles = []
    for name, mod in model.named_modules():
        if type(mod).__name__ == "JetMoeTopKGating":
            def post(m, args, kwargs, out, gate=name):
                # rebuild the assignment from the dispatch: sorted slot j belongs to the expert whose
                # block of expert_size holds j, and to token batch_index[j]
                _, batch_index, _, expert_size, _ = out
                expert_of_slot = torch.repeat_interleave(torch.arange(len(expert_size)), torch.tensor(expert_size))
                valid = _flat_mask(cur[0])[batch_index]
                exp.add(gate, np.bincount(expert_of_slot[valid].numpy(), minlength=m.num_experts).astype(np.int64))
            handles.append(mod.register_forward_hook(post, with_kwargs=True))
    return handles


def observe_zaya(model, exp, cur):
    handles = []
    for name, mod in model.named_modules():
        if type(mod).__name__ == "ZayaRouter":
            def post(m, args, kwargs, out, gate=name):
                # the family's rule on the returned logits: top-k of softmax + balancing biases,
                # the last class being the skip expert
                logits = out[0]
                biased = torch.softmax(logits.double(), -1) + m.balancing_biases.double()
                choice = biased.topk(m.top_k, dim=-1).indices
                exp.add(gate, one_hot_counts(choice, _flat_mask(cur[0]), m.num_experts + 1))
            handles.append(mod.register_forward_hook(post, with_kwargs=True))
    return handles


def observe_doge(model, exp, cur):
    handles = []
    for name, mod in model.named_modules():
        if type(mod).__name__ == "DogeCDMoE":
            def pre(m, args, kwargs, gate=name, width=mod.num_keys ** 2):
                exp.add(gate, one_hot_counts(args[0], _flat_mask(cur[0]), width))  # experts looked up
            handles.append(mod.down_embed.register_forward_pre_hook(pre, with_kwargs=True))
    return handles


def observe_gemma(model, exp, cur):
    handles = []
    for name, mod in model.named_modules():
        if type(mod).__name__ in ("Gemma4TextRouter", "DiffusionGemmaTextRouter"):
            def post(m, args, kwargs, out, gate=name):
                exp.add(gate, one_hot_counts(out[2], _flat_mask(cur[0]), EXPERTS))
            handles.append(mod.register_forward_hook(post, with_kwargs=True))
            def proj(m, args, kwargs, out, gate=name):  # true logits, for the logit statistics
                exp.logits = getattr(exp, "logits", {})
                exp.logits.setdefault(gate, []).append((out.detach().double(), _flat_mask(cur[0])))
            handles.append(mod.proj.register_forward_hook(proj, with_kwargs=True))
    return handles


def observe_switch(model, exp, cur):
    handles = []
    for name, mod in model.named_modules():
        if type(mod).__name__ == "SwitchTransformersTop1Router":
            def post(m, args, kwargs, out, gate=name):
                dispatch, _, logits = out  # [B, S, E]
                valid = _flat_mask(cur[0], "decoder_attention_mask" if _decoder(gate) else "attention_mask")
                choice = logits.argmax(-1)  # [B, S]: the top-1 choice before capacity
                # capacity: per sequence, an expert takes its first expert_capacity tokens (padding included)
                onehot = torch.nn.functional.one_hot(choice, m.num_experts)
                position = (torch.cumsum(onehot, dim=1) * onehot).sum(-1)  # [B, S], 1-based
                kept = (position <= m.expert_capacity).reshape(-1)
                assert torch.equal(dispatch.reshape(-1, m.num_experts).sum(-1).bool(), kept)  # matches the router
                flat = choice.reshape(-1, 1)
                exp.add(gate, one_hot_counts(flat, valid, m.num_experts), int((valid & ~kept).sum()))
            handles.append(mod.register_forward_hook(post, with_kwargs=True))
    return handles


def observe_nllb(model, exp, cur):
    handles = []
    for name, mod in model.named_modules():
        if type(mod).__name__ == "NllbMoeTop2Router":
            def post(m, args, kwargs, out, gate=name):
                logits = out[2].double()  # [T, E]
                valid = _flat_mask(cur[0], "decoder_attention_mask" if _decoder(gate) else "attention_mask")
                num_tokens, num_experts = logits.shape
                top1 = logits.argmax(-1)
                top2 = logits.scatter(1, top1[:, None], float("-inf")).argmax(-1)
                # NLLB's rule: padding is not routed; first choices are placed first, in token order,
                # then second choices; an expert takes ceil(fraction * tokens) in eval
                m1 = torch.nn.functional.one_hot(top1, num_experts) * valid[:, None]
                m2 = torch.nn.functional.one_hot(top2, num_experts) * valid[:, None]
                loc1 = torch.cumsum(m1, 0) - 1
                loc2 = torch.cumsum(m2, 0) - 1 + m1.sum(0, keepdim=True)
                capacity = math.ceil(m.moe_eval_capacity_token_fraction * num_tokens)
                kept1 = ((loc1 < capacity) * m1).sum(-1).bool()
                kept2 = ((loc2 < capacity) * m2).sum(-1).bool()
                dropped = int((valid & ~kept1).sum() + (valid & ~kept2).sum())
                exp.add(gate, one_hot_counts(torch.stack([top1, top2], 1), valid, num_experts), dropped)
            handles.append(mod.register_forward_hook(post, with_kwargs=True))
    return handles


def observe_ernie(model, exp, cur):
    handles = []
    for name, mod in model.named_modules():
        if type(mod).__name__ == "Ernie4_5_VLMoeMoeTopKRouter":
            def post(m, args, kwargs, out, gate=name):
                mask = _flat_mask(cur[0])
                types = cur[0].get("moe_mm_token_type_ids")
                if types is not None and bool(types.any()):  # this gate saw its modality's tokens only
                    vision = types.reshape(-1).bool()
                    mask = mask[vision if gate.endswith("vision_moe.gate") else ~vision]
                assert mask.shape[0] == out[2].shape[0]
                exp.add(gate, one_hot_counts(out[2], mask, EXPERTS))
            handles.append(mod.register_forward_hook(post, with_kwargs=True))
    return handles


def observe_deepseek_v4(model, exp, cur):
    handles = []
    for name, mod in model.named_modules():
        if type(mod).__name__ == "DeepseekV4HashRouter":
            def post(m, args, kwargs, out, gate=name):
                chosen = m.tid2eid[cur[0]["input_ids"].reshape(-1)]  # the table, read from the token ids
                exp.add(gate, one_hot_counts(chosen, _flat_mask(cur[0]), EXPERTS))
            handles.append(mod.register_forward_hook(post, with_kwargs=True))
        elif type(mod).__name__ == "DeepseekV4TopKRouter":
            def post(m, args, kwargs, out, gate=name):
                exp.add(gate, one_hot_counts(out[2], _flat_mask(cur[0]), EXPERTS))
            handles.append(mod.register_forward_hook(post, with_kwargs=True))
    return handles


OBSERVERS: Dict[str, Callable] = {
    "dbrx": observe_dbrx, "llama4": observe_llama4, "jetmoe": observe_jetmoe, "zaya": observe_zaya,
    "doge": observe_doge, "gemma4": observe_gemma, "diffusion_gemma": observe_gemma,
    "switch_transformers": observe_switch, "nllb_moe": observe_nllb, "ernie4_5_vl_moe": observe_ernie,
    "deepseek_v4": observe_deepseek_v4,
}


def moewatch_hooks(model: nn.Module) -> List[str]:
    """Every hook on any module of ``model`` that belongs to moewatch."""
    found = []
    for name, mod in model.named_modules():
        if tapped(mod):
            found.append(f"{name}.forward (tap)")
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
            for hook in getattr(mod, attr).values():
                owner = getattr(hook, "__module__", None) or type(hook).__module__
                if str(owner).startswith("moewatch") or type(hook).__module__.startswith("moewatch"):
                    found.append(f"{name}.{attr}")
    return found


def first_output(out) -> torch.Tensor:
    return out[0] if not isinstance(out, torch.Tensor) else out


@pytest.mark.parametrize("family", FAMILY_LIST)
def test_counts_exact(family):
    assert set(OBSERVERS) == set(FAMILY_LIST)
    model = tiny_model(family)
    batches = [padded_batch(family, 0), padded_batch(family, 1)]
    with torch.no_grad():
        reference = [first_output(model(**b)).clone() for b in batches]

    mon = moewatch.attach(model, background=False)
    exp, cur = Expected(), [None]
    handles = OBSERVERS[family](model, exp, cur)
    try:
        with torch.no_grad():
            monitored = []
            for b in batches:
                cur[0] = b
                monitored.append(first_output(model(**b)).clone())
    finally:
        for h in handles:
            h.remove()
    counts, dropped = mon.counts(), mon.dropped()
    errors = mon.error_counts()
    gates = {g.name: g for g in mon.gates}
    mon.detach()

    assert errors == {}, errors
    for ref, got in zip(reference, monitored):
        assert torch.equal(ref, got)  # the model is untouched
    assert set(gates) == set(exp.counts), (sorted(gates), sorted(exp.counts))
    for name, expected in exp.counts.items():
        assert exp.calls[name] >= (1 if ".vision_moe." in name else 2)  # vision tokens: batch 2 only
        assert counts[name].shape == (gates[name].num_experts,)
        np.testing.assert_array_equal(counts[name], expected, err_msg=name)
        assert (expected > 0).sum() >= 2, f"{name}: degenerate routing in the test model"
        if gates[name].native_capacity:
            assert dropped[name] == exp.dropped[name], name
    if family in ("switch_transformers", "nllb_moe"):
        assert sum(exp.dropped.values()) > 0  # the test model does drop tokens
    assert moewatch_hooks(model) == []


def total_tokens(family: str, batches) -> int:
    return int(sum(b["attention_mask"].sum() for b in batches))


def test_padding_is_excluded():
    """Counted assignments = k x real tokens (padding really is left out)."""
    model = tiny_model("dbrx")
    batches = [padded_batch("dbrx", 0), padded_batch("dbrx", 1)]
    with moewatch.attach(model, background=False) as mon:
        with torch.no_grad():
            for b in batches:
                model(**b)
        counts = mon.counts()
    real = total_tokens("dbrx", batches)
    assert real < sum(b["attention_mask"].numel() for b in batches)
    for name, c in counts.items():
        assert int(c.sum()) == 2 * real, name


def test_zaya_skip_column():
    """The skip expert has its own column; the model's test routing does use it."""
    model = tiny_model("zaya")
    mon = moewatch.attach(model, background=False)
    exp, cur = Expected(), [None]
    handles = observe_zaya(model, exp, cur)
    with torch.no_grad():
        for seed in range(4):
            cur[0] = padded_batch("zaya", seed)
            model(**cur[0])
    for h in handles:
        h.remove()
    counts = mon.counts()
    mon.detach()
    skips = sum(int(c[-1]) for c in counts.values())
    assert skips > 0 and skips == sum(int(c[-1]) for c in exp.counts.values())
    assert all(g.num_experts == 9 for g in mon.gates)


@pytest.mark.parametrize("family", ["gemma4", "diffusion_gemma"])
def test_gemma_logit_statistics_use_true_logits(family):
    """Gemma4 returns probabilities; the logit statistics come from the projection's output."""
    model = tiny_model(family)
    mon = moewatch.attach(model, background=False)
    exp, cur = Expected(), [None]
    handles = observe_gemma(model, exp, cur)
    with torch.no_grad():
        cur[0] = padded_batch(family, 0)
        model(**cur[0])
    for h in handles:
        h.remove()
    mon.flush()
    frame = mon.windows()
    mon.detach()
    for name, seen in exp.logits.items():
        logits = torch.cat([x[v] for x, v in seen])  # [real tokens, E]
        row = frame[frame["gate"] == name].iloc[-1] if "gate" in frame else frame[frame["layer"] == name].iloc[-1]
        assert row["logit_mean"] == pytest.approx(float(logits.mean()), rel=1e-5, abs=1e-6)
        assert row["logit_std"] == pytest.approx(float(logits.std(unbiased=False)), rel=1e-4)
        assert row["logit_absmax"] == pytest.approx(float(logits.abs().max()), rel=1e-6)


def test_ernie_vision_tokens_reach_both_gates():
    """With vision tokens, both modality gates count, each over its own (padded-out) tokens."""
    model = tiny_model("ernie4_5_vl_moe")
    batch = padded_batch("ernie4_5_vl_moe", 1)
    types, mask = batch["moe_mm_token_type_ids"].bool(), batch["attention_mask"].bool()
    with moewatch.attach(model, background=False) as mon:
        with torch.no_grad():
            model(**batch)
        counts = mon.counts()
    for name, c in counts.items():
        expect = (mask & types).sum() if ".vision_moe." in name else (mask & ~types).sum()
        assert int(c.sum()) == 2 * int(expect), name
        assert int(expect) > 0


def test_deepseek_v4_hash_layers_are_monitored():
    model = tiny_model("deepseek_v4")
    with moewatch.attach(model, background=False) as mon:
        notes = {g.name: g.notes for g in mon.gates}
    assert "model.layers.0.mlp.gate" in notes and "hash" in notes["model.layers.0.mlp.gate"]
    assert "model.layers.1.mlp.gate" in notes and "hash" not in notes["model.layers.1.mlp.gate"]


def test_jetmoe_monitors_both_routers_per_layer():
    model = tiny_model("jetmoe")
    with moewatch.attach(model, background=False) as mon:
        names = sorted(g.name for g in mon.gates)
    assert names == sorted(f"model.layers.{i}.{p}" for i in range(2)
                           for p in ("mlp.router", "self_attention.experts.router"))


@pytest.mark.parametrize("family", FAMILY_LIST)
def test_no_host_sync_in_special_extractors(family):
    """The extractors (and their companion hooks) call nothing that syncs with the host."""
    from test_no_sync import sync_tracer

    model = tiny_model(family)
    batch = padded_batch(family, 1)
    with moewatch.attach(model, background=False) as mon:
        with sync_tracer() as calls, torch.no_grad():
            model(**batch)
        assert mon.error_counts() == {}
    assert calls == [], calls


def test_a_router_attached_without_what_it_reads_is_refused_with_a_clear_error(monkeypatch):
    """Ernie 4.5 VL's text and vision routers read the token types their MoE block receives:
    attached to a router's own sub-block, the block is not there to read (an IndexError came out
    of attach before). And any adapter that fails on a layout it was not written for is said as
    an AdapterError naming the gate, not a traceback."""
    from moewatch import discovery
    from moewatch.adapters.base import AdapterError

    model = tiny_model("ernie4_5_vl_moe")
    with pytest.raises(AdapterError, match="token types its MoE block"):
        moewatch.attach(model.get_submodule("layers.0.mlp.text_moe"), background=False)

    def broken_builder(name, module, config, **kwargs):
        raise KeyError("n_routed_experts")

    monkeypatch.setattr(discovery, "builder_for", lambda family: broken_builder)
    with pytest.raises(AdapterError, match=r"could not read gate 'layers.0.mlp'.*KeyError"):
        moewatch.attach(model, background=False)
