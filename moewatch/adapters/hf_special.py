"""Adapters for the transformers MoE families whose router does not return
``(logits, weights, indices)``.

Each builder turns what the family's gate hands back into a :class:`Routing`. Where the
selection is not returned, the extractor replays the family's own selection op on the very
tensor the model selected from (same op, same input, so the same experts); where the model
computed a decision elsewhere (Doge's experts lookup, Gemma4's projection), a companion hook
reads it there. ``docs/special_families.md`` says, per family, what is counted and what the
logit statistics mean.
"""
from __future__ import annotations

import threading
from typing import Any, Optional

import torch
from torch import nn

from ..routing import GateInfo, Routing
from .base import AdapterError, Companion, FamilyDoc, GateSpec, flat_tokens
from .registry import register, register_router_classes


class Stash(threading.local):
    """Per-thread hand-over of one tensor from a companion hook to the gate hook."""

    value: Optional[torch.Tensor] = None

    def put(self, value: Optional[torch.Tensor]) -> None:
        self.value = value

    def take(self) -> Optional[torch.Tensor]:
        """The stashed tensor, cleared so that a later call never reads a stale one."""
        value, self.value = self.value, None
        return value


def _int_attr(obj: Any, *names: str) -> Optional[int]:
    for n in names:
        v = getattr(obj, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _need(value: Optional[int], what: str, name: str, module: nn.Module) -> int:
    if not value:
        raise AdapterError(f"could not read {what} of gate {name!r} ({type(module).__name__}); "
                           "pass num_experts= and top_k= to moewatch.attach with gates=")
    return int(value)


def _decoder_mask_key(name: str) -> str:
    """Gates of an encoder-decoder model's decoder read the decoder's padding mask."""
    return "decoder_attention_mask" if "decoder" in name.split(".") else "attention_mask"


# --- DBRX: the router returns logits only; DbrxFFN selects softmax -> top-k ----------------
@register("dbrx")
def build_dbrx(name: str, module: nn.Module, config: object) -> GateSpec:
    ffn = getattr(config, "ffn_config", config)
    num_experts = _need(_int_attr(ffn, "moe_num_experts"), "the number of experts", name, module)
    top_k = _need(_int_attr(ffn, "moe_top_k"), "top-k", name, module)

    def extract(mod, args, kwargs, output) -> Routing:
        logits = flat_tokens(output, output.shape[-1])  # [T, E]
        # DbrxFFN.route_tokens_to_experts, replayed on the router's own output.
        probs = torch.softmax(logits, dim=1, dtype=logits.dtype)  # [T, E]
        indices = torch.topk(probs, top_k, dim=-1).indices  # [T, k]
        # the statistics take the softmax of the logits themselves, in float32
        return Routing(logits=logits, indices=indices)

    info = GateInfo(name=name, num_experts=num_experts, top_k=top_k, family="dbrx", scoring="softmax")
    return GateSpec(info=info, module=module, extract=extract)


# --- Llama4: returns (scores [T,E] sigmoid of the top-k and 0 elsewhere, logits [T,E]) -------
@register("llama4")
def build_llama4(name: str, module: nn.Module, config: object) -> GateSpec:
    num_experts = _need(_int_attr(module, "num_experts", "out_features"), "the number of experts", name, module)
    top_k = _need(_int_attr(module, "top_k"), "top-k", name, module)

    def extract(mod, args, kwargs, output) -> Routing:
        logits = flat_tokens(output[1], output[1].shape[-1])  # [T, E]
        indices = torch.topk(logits, top_k, dim=1).indices  # [T, k]: Llama4Router's own op
        return Routing(logits=logits, indices=indices)

    info = GateInfo(name=name, num_experts=num_experts, top_k=top_k, family="llama4", scoring="sigmoid",
                    notes="experts run densely on all tokens; selected = top-k of the logits")
    return GateSpec(info=info, module=module, extract=extract)


# --- JetMoE: sorted dispatch info + logits; two routers per layer (attention and MLP) ---------
@register("jetmoe")
def build_jetmoe(name: str, module: nn.Module, config: object) -> Optional[GateSpec]:
    if not hasattr(module, "layer") or not hasattr(module, "top_k"):
        # JetMoeAttention is recorded too (it forwards its router's logits); its own router
        # (self_attention.experts.router) is the gate, so the attention block is skipped.
        return None
    num_experts = _need(_int_attr(module, "num_experts"), "the number of experts", name, module)
    top_k = _need(_int_attr(module, "top_k"), "top-k", name, module)

    def extract(mod, args, kwargs, output) -> Routing:
        logits = output[4]  # [T, E] float32
        # The dispatch is sorted by expert and its sizes are a host list; the selection it was
        # built from is JetMoeTopKGating's own logits.topk, replayed here.
        indices = logits.topk(top_k, dim=1).indices  # [T, k]
        return Routing(logits=logits, indices=indices)

    kind = "attention experts" if ".self_attention." in f".{name}." else "MLP experts"
    info = GateInfo(name=name, num_experts=num_experts, top_k=top_k, family="jetmoe", scoring="softmax",
                    notes=kind)
    return GateSpec(info=info, module=module, extract=extract)


# --- Zaya: (logits [T,E+1], weights [T,1], indices [T,1], router states) ----------------------
@register("zaya")
def build_zaya(name: str, module: nn.Module, config: object) -> GateSpec:
    routed = _need(_int_attr(module, "num_experts"), "the number of experts", name, module)
    top_k = _need(_int_attr(module, "top_k"), "top-k", name, module)
    skip = routed  # the extra router class: the token skips the routed experts

    def extract(mod, args, kwargs, output) -> Routing:
        logits = output[0]  # [T, E+1]
        weights = output[1].reshape(-1, top_k)  # [T, k]
        indices = output[2].reshape(-1, top_k)  # [T, k]
        # ZayaRouter rewrites a skip to (expert 0, weight 0); a weight of exactly 0 is a slot
        # that contributes nothing, so it is counted as the skip column, not as expert 0.
        indices = torch.where(weights == 0, torch.full_like(indices, skip), indices)
        return Routing(logits=logits, indices=indices)

    info = GateInfo(name=name, num_experts=routed + 1, top_k=top_k, family="zaya", scoring="softmax",
                    notes=f"column {skip} is the skip expert (no compute)")
    return GateSpec(info=info, module=module, extract=extract)


# --- Doge: product-key routing inside the mlp block (DogeCDMoE); no router module -------------
@register("doge")
def build_doge(name: str, module: nn.Module, config: object) -> GateSpec:
    num_keys = _need(_int_attr(module, "num_keys"), "the number of product keys", name, module)
    top_k = _need(_int_attr(module, "top_k"), "top-k", name, module)
    down_embed = getattr(module, "down_embed", None)
    if not isinstance(down_embed, nn.Module):
        raise AdapterError(f"gate {name!r} ({type(module).__name__}) has no down_embed expert table")
    stash = Stash()

    def read_indices(mod, args, kwargs) -> None:
        stash.put(args[0] if args else kwargs.get("input"))  # [T, k]: the experts the block looks up

    def extract(mod, args, kwargs, output) -> Routing:
        keys = output[1]  # [2, T, K]: one score per key of each of the two key sets
        tokens = keys.shape[1]
        # score of expert i*K + j = key score x_i + key score y_j: what the block ranks.
        logits = (keys[0][:, :, None] + keys[1][:, None, :]).reshape(tokens, num_keys * num_keys)  # [T, E]
        indices = stash.take()
        if indices is not None:
            indices = indices.reshape(tokens, top_k)  # [T, k]
        return Routing(logits=logits, indices=indices)  # None: top-k of the product-key scores

    info = GateInfo(name=name, num_experts=num_keys * num_keys, top_k=top_k, family="doge", scoring="softmax",
                    notes="product-key scores; logits row t mixes router outputs of other tokens")
    return GateSpec(info=info, module=module, extract=extract,
                    companions=(Companion(down_embed, read_indices, pre=True),))


# --- Gemma4 / DiffusionGemma: (probabilities [T,E], weights [T,k], indices [T,k]) -------------
@register("gemma4", "diffusion_gemma")
def build_gemma4(name: str, module: nn.Module, config: object) -> GateSpec:
    proj = getattr(module, "proj", None)
    num_experts = _need(_int_attr(proj, "out_features"), "the number of experts", name, module)
    top_k = _need(_int_attr(getattr(module, "config", config), "top_k_experts"), "top-k", name, module)
    family = "diffusion_gemma" if "DiffusionGemma" in type(module).__name__ else "gemma4"
    stash = Stash()

    def read_logits(mod, args, kwargs, output) -> None:
        stash.put(output)  # [T, E]: the projection's output, the true router logits

    def extract(mod, args, kwargs, output) -> Routing:
        probs = flat_tokens(output[0], output[0].shape[-1])  # [T, E] float32 softmax
        indices = flat_tokens(output[2], output[2].shape[-1])  # [T, k]
        logits = stash.take()
        if logits is None or logits.numel() != probs.numel():  # projection not seen: log-probs
            logits = torch.log(probs)
        return Routing(logits=flat_tokens(logits, num_experts), indices=indices, probs=probs)

    info = GateInfo(name=name, num_experts=num_experts, top_k=top_k, family=family, scoring="softmax")
    companions = (Companion(proj, read_logits),) if isinstance(proj, nn.Module) else ()
    return GateSpec(info=info, module=module, extract=extract, companions=companions)


# --- Switch Transformers: (dispatch one-hot after capacity, top-1 prob, logits), top-1 ---------
@register("switch_transformers")
def build_switch(name: str, module: nn.Module, config: object) -> GateSpec:
    num_experts = _need(_int_attr(module, "num_experts"), "the number of experts", name, module)

    def extract(mod, args, kwargs, output) -> Routing:
        dispatch, logits = output[0], output[2]  # [B, S, E] each
        width = logits.shape[-1]
        # the router's choice before capacity: its own softmax -> argmax, replayed
        probs = torch.softmax(logits, dim=-1, dtype=getattr(mod, "dtype", logits.dtype))
        probs = probs.to(getattr(mod, "input_dtype", probs.dtype))
        choice = probs.argmax(dim=-1).reshape(-1, 1)  # [T, 1]
        kept = flat_tokens(dispatch, width).gather(1, choice) > 0  # [T, 1]: a dropped token's row is 0
        return Routing(logits=flat_tokens(logits, width), indices=choice, dropped=~kept)

    info = GateInfo(name=name, num_experts=num_experts, top_k=1, family="switch_transformers",
                    scoring="softmax", native_capacity=True)
    return GateSpec(info=info, module=module, extract=extract, mask_key=_decoder_mask_key(name))


# --- NLLB-MoE: (top-1 mask after capacity, combine weights after capacity, logits), top-2 ------
@register("nllb_moe")
def build_nllb(name: str, module: nn.Module, config: object) -> GateSpec:
    num_experts = _need(_int_attr(module, "num_experts"), "the number of experts", name, module)
    policy = getattr(module, "second_expert_policy", "all")

    def extract(mod, args, kwargs, output) -> Routing:
        top1_mask, combine, logits = output  # [T, E] each
        # the router's two choices before capacity (second_expert_policy "all"), replayed
        probs = torch.softmax(logits, dim=-1, dtype=getattr(mod, "dtype", logits.dtype))
        probs = probs.to(getattr(mod, "input_dtype", probs.dtype))
        top1 = probs.argmax(dim=-1, keepdim=True)  # [T, 1]
        first = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top1, True)  # [T, E]
        top2 = logits.masked_fill(first, float("-inf")).argmax(dim=-1, keepdim=True)  # [T, 1]
        kept1 = top1_mask.gather(1, top1) > 0  # [T, 1]
        kept2 = combine.gather(1, top2) > 0  # [T, 1]: a dispatched second expert has weight > 0
        indices = torch.cat([top1, top2], dim=1)  # [T, 2]
        dropped = ~torch.cat([kept1, kept2], dim=1)  # [T, 2]
        return Routing(logits=logits, indices=indices, dropped=dropped)

    notes = "" if policy == "all" else (f"second_expert_policy={policy!r}: second-expert drops include "
                                        "the router's own random skips")
    info = GateInfo(name=name, num_experts=num_experts, top_k=2, family="nllb_moe", scoring="softmax",
                    native_capacity=True, notes=notes)
    return GateSpec(info=info, module=module, extract=extract, mask_key=_decoder_mask_key(name))


# --- Ernie4.5-VL: text and vision gates each see a gathered subset of the tokens --------------
# The model records the MoE block, whose merged logits mix two expert sets (text experts at
# text positions, vision experts at vision positions); the two routers inside are the gates.
register_router_classes("ernie4_5_vl_moe", "Ernie4_5_VLMoeMoeTopKRouter")


@register("ernie4_5_vl_moe", with_model=True)
def build_ernie_vl(name: str, module: nn.Module, config: object, model: nn.Module) -> Optional[GateSpec]:
    if hasattr(module, "text_moe"):
        return None  # the recorded block; its text_moe.gate and vision_moe.gate are hooked instead
    num_experts = _need(_int_attr(module, "num_experts"), "the number of experts", name, module)
    top_k = _need(_int_attr(module, "top_k"), "top-k", name, module)
    if name.count(".") < 2:  # the block above text_moe / vision_moe is not in the attached module
        raise AdapterError(f"gate {name!r} ({type(module).__name__}) tells text from vision tokens by the "
                           "token types its MoE block (layers.N.mlp) receives: attach to that block or to the model")
    vision = name.split(".")[-2] == "vision_moe"
    block = model.get_submodule(name.rsplit(".", 2)[0])  # layers.N.mlp: receives the token types
    stash = Stash()

    def read_types(mod, args, kwargs) -> None:
        types = kwargs.get("moe_mm_token_type_ids", args[1] if len(args) > 1 else None)
        stash.put(types)  # [B, S] or None; kept for both gates of the block

    def extract(mod, args, kwargs, output) -> Routing:
        logits = output[0]  # [T, E] float32
        indices = output[2]  # [T, k]
        types = stash.value
        if types is None or types.numel() == logits.shape[0]:
            return Routing(logits=logits, indices=indices)  # the gate saw every token, in order
        # The block gathered this modality's tokens with a boolean mask (order kept): their places
        # are the first T entries of a stable sort that puts this modality first (no host sync).
        other = types.reshape(-1) == 0 if vision else types.reshape(-1) != 0  # [B*S]
        positions = torch.argsort(other.to(torch.uint8), stable=True)[: logits.shape[0]]  # [T]
        return Routing(logits=logits, indices=indices, positions=positions, grid=types.numel())

    info = GateInfo(name=name, num_experts=num_experts, top_k=top_k, family="ernie4_5_vl_moe",
                    scoring="softmax", notes="vision experts" if vision else "text experts")
    return GateSpec(info=info, module=module, extract=extract,
                    companions=(Companion(block, read_types, pre=True),))


# --- DeepSeek-V4: top-k layers and hash layers (experts = tid2eid[input_ids]) -----------------
# Hash routers are not recorded in router_logits, so discovery is told about them here.
register_router_classes("deepseek_v4", "DeepseekV4HashRouter")


@register("deepseek_v4")
def build_deepseek_v4(name: str, module: nn.Module, config: object) -> GateSpec:
    num_experts = _need(_int_attr(module, "num_experts"), "the number of experts", name, module)
    top_k = _need(_int_attr(module, "top_k"), "top-k", name, module)
    hashed = hasattr(module, "tid2eid")

    def extract(mod, args, kwargs, output) -> Routing:
        logits = output[0]  # [T, E]
        indices = output[2]  # [T, k]: hash layers: the token's fixed experts tid2eid[input_id]
        # The family's score function (sqrtsoftplus by default) gives positive per-expert
        # scores; normalised per token they are the routing distribution.
        scores = mod.score_fn(logits.float())  # [T, E]
        probs = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        return Routing(logits=logits, indices=indices, probs=probs)

    notes = "hash layer: experts fixed by token id; logits weight them but do not select" if hashed else ""
    info = GateInfo(name=name, num_experts=num_experts, top_k=top_k, family="deepseek_v4",
                    scoring="sigmoid", notes=notes)
    return GateSpec(info=info, module=module, extract=extract)


SPECIAL_FAMILIES = (
    "dbrx", "deepseek_v4", "diffusion_gemma", "doge", "ernie4_5_vl_moe", "gemma4", "jetmoe",
    "llama4", "nllb_moe", "switch_transformers", "zaya",
)


# What docs/families.md says of each special family (details: docs/special_families.md).
_SEE = " See docs/special_families.md."
build_dbrx.doc = FamilyDoc(
    "softmax", "DbrxFFN `moe_num_experts`", "DbrxFFN `moe_top_k`",
    "Router returns logits only; the selection (softmax, top-k) is replayed on the same logits." + _SEE)
build_llama4.doc = FamilyDoc(
    "sigmoid", "router `num_experts` (config `num_local_experts`)", "router `top_k` (config `num_experts_per_tok`)",
    "Router returns (scores, logits); top-k on the logits, as the router does." + _SEE)
build_jetmoe.doc = FamilyDoc(
    "softmax", "router `num_experts` (config `num_local_experts`)", "router `top_k` (config `num_experts_per_tok`)",
    "Two routers per layer (attention experts and MLP experts), both monitored." + _SEE)
build_zaya.doc = FamilyDoc(
    "softmax", "router `num_experts` + 1 (the skip expert is its own column)", "router `top_k` (1)",
    "A skip decision (weight 0) is counted in the extra last column." + _SEE)
build_doge.doc = FamilyDoc(
    "softmax", "`num_keys`² product-key experts", "block `top_k` (config `num_experts_per_tok`)",
    "No router module: the MoE block is the gate; expert ids read where the experts are looked up." + _SEE)
build_gemma4.doc = FamilyDoc(
    "softmax", "router projection `out_features` (config `num_experts`)", "config `top_k_experts`",
    "The router returns probabilities; true logits are read from its projection." + _SEE)
build_switch.doc = FamilyDoc(
    "softmax", "router `num_experts`", "1 (fixed)",
    "Capacity-limited: counts are choices before capacity, dropped = refused by capacity (exact)." + _SEE)
build_nllb.doc = FamilyDoc(
    "softmax", "router `num_experts`", "2 (fixed)",
    "Capacity-limited: dropped assignments are exact; second_expert_policy='all' only." + _SEE)
build_ernie_vl.doc = FamilyDoc(
    "softmax", "router `num_experts` (config `moe_num_experts`)", "router `top_k` (config `moe_k`)",
    "Text and vision routers are separate gates over gathered token subsets; padding mapped back." + _SEE)
build_deepseek_v4.doc = FamilyDoc(
    "sigmoid", "router `num_experts` (config `n_routed_experts`)", "router `top_k` (config `num_experts_per_tok`)",
    "Hash layers (tid2eid[input_ids]) are monitored too and counted as the experts that ran." + _SEE)
