"""Every standard transformers MoE family: moewatch counts exactly what the router decided.

For each family a tiny real model (tests/hf_zoo.py) runs padded batches. The test records,
with a forward hook of its own, the logits and expert ids each router module returned, and
counts them itself over the unpadded positions; ``mon.counts()`` must equal that count, the
tokens per window must equal the unpadded tokens, the model's outputs must be bit-identical
with and without the monitor, and ``detach()`` must leave no moewatch hook behind.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from torch import nn

import moewatch
from moewatch.taps import tapped
from hf_zoo import FAMILIES, padded_batch, router_modules, tiny_model

BATCH_SEEDS = (0, 1)


class RouterRecorder:
    """Keeps (logits [T, E], indices [T, k]) of every call of every router module."""

    def __init__(self, model: nn.Module):
        self.routers = router_modules(model)
        self.calls: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in self.routers}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.routers.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            logits, indices = output[0].detach(), output[2].detach()
            self.calls[name].append((logits.reshape(-1, logits.shape[-1]).clone(),
                                     indices.reshape(-1, indices.shape[-1]).clone()))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def expected_counts(calls, batches) -> np.ndarray:
    """Assignments per expert over the unpadded tokens, counted with numpy."""
    width = calls[0][0].shape[-1]
    counts = np.zeros(width, dtype=np.int64)
    for (logits, indices), batch in zip(calls, batches):
        valid = batch["attention_mask"].reshape(-1).numpy() != 0  # [B*S]
        assert indices.shape[0] == valid.size, "router saw another number of tokens than the batch holds"
        np.add.at(counts, indices.numpy()[valid].ravel(), 1)
    return counts


def moewatch_hooks(model: nn.Module) -> List[str]:
    """Hooks on any module of ``model`` whose code lives in moewatch."""
    found = []
    for name, module in model.named_modules():
        if tapped(module):
            found.append(f"{name or '<root>'}.forward (tap)")
        for table in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_always_called"):
            for hook in getattr(module, table, {}).values():
                if not callable(hook):
                    continue
                owner = getattr(hook, "__self__", hook)
                where = getattr(hook, "__module__", None) or type(owner).__module__
                if str(where).startswith("moewatch") or type(owner).__module__.startswith("moewatch"):
                    found.append(f"{name or '<root>'}.{table}")
    return found


def forward(model: nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_equal_router_decisions(family):
    model = tiny_model(family)
    batches = [padded_batch(seed) for seed in BATCH_SEEDS]
    recorder = RouterRecorder(model)
    mon = moewatch.attach(model, background=False)
    try:
        for batch in batches:
            forward(model, batch)
            mon.flush()
        counts, frame, gates = mon.counts(), mon.windows(), {g.name: g for g in mon.gates}
    finally:
        mon.detach()
        recorder.remove()

    assert set(counts) == set(recorder.routers), "monitored gates differ from the model's router modules"
    for name, calls in recorder.calls.items():
        assert len(calls) == len(batches), f"{name}: router ran {len(calls)} times"
        width, k = calls[0][0].shape[-1], calls[0][1].shape[-1]
        assert gates[name].family == family
        assert gates[name].num_experts == width, f"{name}: E is not the width of the logits"
        assert gates[name].top_k == k, f"{name}: top_k is not what the router selects"
        expected = expected_counts(calls, batches)
        np.testing.assert_array_equal(counts[name], expected, err_msg=name)
        assert (expected > 0).sum() >= 3, f"{name}: routing is degenerate, the test proves little"

    unpadded = [int(b["attention_mask"].sum()) for b in batches]
    padded = [b["attention_mask"].numel() for b in batches]
    assert unpadded != padded
    for name in counts:
        rows = frame[frame["gate"] == name].sort_values("window")
        assert rows["tokens"].tolist() == unpadded, name


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_untouched_and_detach_clean(family):
    model = tiny_model(family)
    batch = padded_batch(2)
    hooks_before = moewatch_hooks(model)
    reference = forward(model, batch)
    mon = moewatch.attach(model, background=False)
    assert moewatch_hooks(model), "attach installed no hook"
    monitored = forward(model, batch)
    mon.detach()
    after = forward(model, batch)
    assert torch.equal(reference, monitored)
    assert torch.equal(reference, after)
    assert sum(c.sum() for c in mon.counts().values()) > 0
    assert hooks_before == [] and moewatch_hooks(model) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_a_moe_block_attached_on_its_own_is_found_by_its_router_class(family):
    """A family's MoE block without its PreTrainedModel around it (attached on its own, or a
    block of transformers inside a model of the user's own): the router is found by class, as
    the family's models declare it, and counts exactly what it decided. It was refused before
    ("declares no router classes"), in every family. The block is the root here: no padding
    mask reaches it, so every token counts."""
    model = tiny_model(family)
    router_name, router = next(iter(router_modules(model).items()))
    block_name, _, gate_name = router_name.rpartition(".")
    block = model.get_submodule(block_name)
    decided = []
    probe = router.register_forward_hook(lambda module, args, output: decided.append(output[2].detach()))
    try:
        with moewatch.attach(block, background=False) as mon:
            forward(model, padded_batch(0))
            mon.flush()
            counts, gates = mon.counts(), mon.gates
    finally:
        probe.remove()
    assert [gate.name for gate in gates] == [gate_name] and gates[0].family == family
    expected = np.bincount(torch.cat([d.reshape(-1) for d in decided]).numpy(), minlength=gates[0].num_experts)
    np.testing.assert_array_equal(counts[gate_name], expected)


def test_a_model_of_the_users_own_built_from_transformers_blocks_is_watched():
    """Research code stacks transformers' MoE blocks in a model of its own (no PreTrainedModel):
    every block's router is found and counted."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=32, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(64, 32)
            self.blocks = nn.ModuleList(MixtralSparseMoeBlock(config) for _ in range(3))

        def forward(self, ids):
            x = self.embed(ids)
            for block in self.blocks:
                x = x + block(x)
            return x

    torch.manual_seed(0)
    model = Stack().eval()
    with torch.no_grad():  # (the blocks leave their weights to PreTrainedModel to initialise)
        for param in model.parameters():
            param.normal_(std=0.3)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        plain = model(ids)
    with moewatch.attach(model, background=False) as mon, torch.no_grad():
        watched = model(ids)
        mon.flush()
        assert [gate.name for gate in mon.gates] == [f"blocks.{i}.gate" for i in range(3)]
        assert [int(c.sum()) for c in mon.counts().values()] == [2 * 7 * 2] * 3
    assert torch.equal(watched, plain)


def would_be_drops(calls, batches, top_k: int, capacity_factor: float) -> int:
    """Per forward: capacity = ceil(valid * k / E * cf); assignments over it are dropped."""
    total = 0
    for (logits, indices), batch in zip(calls, batches):
        num_experts = logits.shape[-1]
        valid = batch["attention_mask"].reshape(-1).numpy() != 0
        load = np.bincount(indices.numpy()[valid].ravel(), minlength=num_experts)
        capacity = math.ceil(int(valid.sum()) * top_k / num_experts * capacity_factor)
        total += int(np.maximum(load - capacity, 0).sum())
    return total


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
@pytest.mark.parametrize("capacity_factor", [1.0, 1.25])
def test_capacity_factor_would_be_drops(family, capacity_factor):
    model = tiny_model(family)
    batches = [padded_batch(seed) for seed in BATCH_SEEDS]
    recorder = RouterRecorder(model)
    mon = moewatch.attach(model, background=False, capacity_factor=capacity_factor)
    try:
        for batch in batches:
            forward(model, batch)
        dropped, gates = mon.dropped(), {g.name: g for g in mon.gates}
    finally:
        mon.detach()
        recorder.remove()
    expected = {n: would_be_drops(c, batches, gates[n].top_k, capacity_factor) for n, c in recorder.calls.items()}
    assert dropped == expected
    assert sum(expected.values()) > 0, "no overflow at this capacity: the test proves little"


def test_every_standard_family_is_registered():
    registered = set(moewatch.supported_families())
    assert set(FAMILIES) <= registered, sorted(set(FAMILIES) - registered)


def test_cohere2_sigmoid_selection_scores_with_sigmoid():
    """Cohere2-MoE's expert_selection_fn decides the scoring of its probabilities."""
    from hf_zoo import model_class, randomize_routers, tiny_config

    config = tiny_config("cohere2_moe")
    config.expert_selection_fn = "sigmoid"
    torch.manual_seed(0)
    model = model_class("cohere2_moe")(config).eval()
    randomize_routers(model, 1)
    batch = padded_batch(0)
    recorder = RouterRecorder(model)
    mon = moewatch.attach(model, background=False)
    try:
        forward(model, batch)
        mon.flush()
        frame, gates = mon.windows(), mon.gates
    finally:
        mon.detach()
        recorder.remove()
    assert {g.scoring for g in gates} == {"sigmoid"}
    valid = batch["attention_mask"].reshape(-1).numpy() != 0
    for name, [(logits, _)] in recorder.calls.items():
        scores = 1.0 / (1.0 + np.exp(-logits.double().numpy()[valid]))  # [T, E]
        expected = (scores / scores.sum(axis=1, keepdims=True)).mean(axis=0)
        got = frame[frame["gate"] == name]["expert_prob_mean"].iloc[0]
        np.testing.assert_allclose(np.asarray(got, dtype=np.float64), expected, rtol=1e-5, atol=1e-7)


def test_families_doc_is_generated_from_the_registry():
    from moewatch.docs_families import DEFAULT_PATH, render

    committed = DEFAULT_PATH.read_text(encoding="utf-8")
    assert render(committed) == committed, "docs/families.md is stale: run python -m moewatch.docs_families"
    for family in FAMILIES:
        assert f"\n| {family} | `" in committed, family


@pytest.mark.parametrize("family", FAMILIES)
def test_the_compiled_reduction_gives_numpys_windows(family, monkeypatch):
    """The reader's compiled kernel (numba_backend) and numpy alone reduce the same padded
    batches of every family to the same windows: counts, co-selection and tokens equal, every
    other statistic within float32 rounding. The kernel is checked to have run where the family
    takes it (the router's own ids, no router-given probabilities)."""
    from moewatch.hotpath import numba_backend

    assert numba_backend.available(), "numba could not compile the reader's kernel"
    ran = []
    compiled_sums = numba_backend.segment_sums
    monkeypatch.setattr(numba_backend, "segment_sums", lambda *a: ran.append(1) or compiled_sums(*a))
    model = tiny_model(family)
    batches = [padded_batch(seed) for seed in BATCH_SEEDS]
    results = {}
    for kernel in ("compiled", "numpy"):
        monkeypatch.setattr(numba_backend, "enabled", kernel == "compiled")
        mon = moewatch.attach(model, background=False)
        try:
            for batch in batches:
                forward(model, batch)
                mon.flush()
            results[kernel] = (mon.counts(), mon.coselection(), mon.windows())
        finally:
            mon.detach()
    (counts, cosel, frame), (want_counts, want_cosel, want_frame) = results["compiled"], results["numpy"]
    assert ran, "the compiled kernel never ran"
    assert set(counts) == set(want_counts)
    for name in counts:
        np.testing.assert_array_equal(counts[name], want_counts[name], err_msg=name)
        np.testing.assert_array_equal(cosel[name], want_cosel[name], err_msg=name)
    assert list(frame.columns) == list(want_frame.columns) and len(frame) == len(want_frame)
    for column in frame.columns:
        if column in ("t_start", "t_end"):  # the windows' times differ: two runs
            continue
        got, want = frame[column].to_numpy(), want_frame[column].to_numpy()
        if got.dtype == object and isinstance(got[0], np.ndarray):  # per expert
            got, want = np.stack(got), np.stack(want)
        if got.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, equal_nan=True, err_msg=column)
        else:  # counts, names, sizes
            assert (got == want).all(), column
