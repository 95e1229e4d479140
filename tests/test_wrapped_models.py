"""Models under the wrappers of fine-tuning and training: a PEFT LoRA adapter, activation
checkpointing's wrapper. Gates keep the bare model's names (a baseline recorded before the
adapter went on still matches), and counts are the routing the wrapped model ran, adapter
included. (Data parallelism's wrappers: tests/test_distributed_training.py.)"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import moewatch
from moewatch.taps import tapped
from tests.moe_from_scratch import TinyMoELM
from tests.tiny_models import padded_batch, tiny_mixtral

peft = pytest.importorskip("peft")

BARE_GATES = ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def _lora(model, **config):
    """The model under a LoRA adapter whose weights are drawn (not the identity it starts as)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_dropout=0.0, init_lora_weights=False,
                                                             **config))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(std=1.0)
    return wrapped


def _router_decisions(model) -> dict:
    """{bare gate name: expert ids [T, k] of each call}, recorded by the test's own hooks on the
    router modules (a PEFT ParamWrapper's base_layer routes with the adapter's weight)."""
    recorded = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "MixtralTopKRouter":
            bare = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
            module.register_forward_hook(
                lambda mod, args, out, bare=bare: recorded.setdefault(bare, []).append(out[2].reshape(-1, 2)))
    return recorded


def _expected(calls, mask) -> np.ndarray:
    valid = mask.reshape(-1).bool()
    return np.bincount(torch.cat([ids[valid] for ids in calls]).reshape(-1).numpy(), minlength=8)


def test_a_lora_adapted_model_keeps_the_bare_gate_names_and_its_baseline(tmp_path):
    """Record a baseline on the bare model, put a LoRA adapter on its attention and routers
    (PEFT's all-linear), attach with that baseline: the gates are named as before (PEFT's names
    gain base_model.model. and .base_layer, and attach refused the baseline for its names),
    counts are what the adapted routers decided, outputs are bit-identical, detach leaves no hook."""
    ids, mask = padded_batch(batch=3, length=12)
    bare = tiny_mixtral()
    with moewatch.attach(bare, background=False, window_tokens=24) as mon, torch.no_grad():
        for seed in range(12):
            bare(torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed)))
        mon.flush()
        mon.baseline().save(str(tmp_path / "baseline.json"))

    adapted = _lora(bare, target_modules="all-linear").eval()
    assert any(name.endswith("mlp.gate.base_layer") for name, _ in adapted.named_modules())  # the router is wrapped
    with torch.no_grad():
        plain = adapted(ids, attention_mask=mask).logits
    decisions = _router_decisions(adapted)
    with moewatch.attach(adapted, baseline=str(tmp_path / "baseline.json"), background=False) as mon, \
            torch.no_grad():
        watched = adapted(ids, attention_mask=mask).logits
        mon.flush()
        assert [gate.name for gate in mon.gates] == BARE_GATES
        counts = mon.counts()
        assert sorted(counts) == BARE_GATES
        for gate in BARE_GATES:
            np.testing.assert_array_equal(counts[gate], _expected(decisions[gate], mask))
        assert mon.error_counts() == {}
    assert torch.equal(watched, plain)
    assert not any(tapped(module) for module in adapted.modules())  # detach left no hook
    # the adapter changes the routing: the counts above are the adapted model's, not the bare one's
    with adapted.disable_adapter(), torch.no_grad():
        decisions.clear()
        adapted(ids, attention_mask=mask)
    assert not np.array_equal(_expected(decisions[BARE_GATES[0]], mask), counts[BARE_GATES[0]])


def test_a_gates_pattern_for_the_bare_model_finds_the_adapted_gate():
    """A user's own gate (an nn.Linear router) named by a pattern written for the bare model:
    under a LoRA layer the pattern still matches, the LoRA layer is hooked (its output is the
    router's logits, adapter included; its base_layer's are not) and keeps the bare name."""
    torch.manual_seed(0)
    model = _lora(TinyMoELM(), target_modules=["router"]).eval()
    x = torch.randint(0, 64, (3, 10))
    with moewatch.attach(model, gates="blocks.*.router", top_k=2, background=False) as mon, torch.no_grad():
        model(x)
        mon.flush()
        counts = mon.counts()
        assert sorted(counts) == ["blocks.0.router", "blocks.1.router"]
        for i, block in enumerate(model.base_model.model.blocks):
            expected = np.bincount(block.last_indices.reshape(-1).numpy(), minlength=8)
            np.testing.assert_array_equal(counts[f"blocks.{i}.router"], expected)


def test_gates_under_activation_checkpointing_wrappers_keep_their_names():
    """torch's checkpoint_wrapper (what FSDP training puts around each layer) adds
    ``_checkpoint_wrapped_module`` to every name below it: the gates are named without it, and a
    training step counts each real token once (the recomputation in backward is not counted)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model = tiny_mixtral().train()
    layer_class = type(model.model.layers[0])
    apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, layer_class))
    assert any("_checkpoint_wrapped_module" in name for name, _ in model.named_modules())
    ids = torch.randint(0, 128, (3, 12))  # (the wrapped layers fail on a padding mask, moewatch or not)
    with moewatch.attach(model, background=False) as mon:
        model(ids, labels=ids).loss.backward()
        mon.flush()
        assert sorted(mon.counts()) == BARE_GATES
        tokens = mon.windows().groupby("gate")["tokens"].sum()
        assert set(tokens) == {ids.numel()}
