"""Tiny, real transformers MoE models for the standard router families.

Every family whose router returns ``(logits, weights, indices, ...)`` gets a model built from
its own config class with random weights (nothing from the hub): hidden 64, 2 layers, 8
experts, top-2, vocab 128, every layer an MoE layer. Router weights and biases (including
selection-only correction biases held by the MoE block) are re-drawn at random so routing is
not degenerate, and the model is in eval mode so routing is deterministic.
"""
from __future__ import annotations

import functools
import importlib
from typing import Dict, List, Tuple

import torch
from torch import nn

from moewatch.adapters.hf_families import TRIPLE_FAMILIES

NUM_EXPERTS = 8
TOP_K = 2
HIDDEN = 64
LAYERS = 2
VOCAB = 128

FAMILIES: List[str] = sorted(TRIPLE_FAMILIES)

# Composite (vision-language, omni) families: build the text model, which holds the gates.
MODEL_CLASS = {
    "aria": "AriaTextForCausalLM",
    "deepseek_ocr2": "DeepseekOcr2TextModel",
    "glm4v_moe": "Glm4vMoeTextModel",
    "glm5_next": "Glm5NextTextModel",
    "inkling": "InklingForCausalLM",
    "inkling2": "Inkling2ForCausalLM",
    "minimax_m3_vl": "MiniMaxM3VLForCausalLM",
    "mistral4": "Mistral4ForCausalLM",
    "mistral_large4": "MistralLarge4TextModel",
    "muse_spark": "MuseSparkTextModel",
    "openai_privacy_filter": "OpenAIPrivacyFilterModel",
    "qwen3_omni_moe": "Qwen3OmniMoeThinkerTextModel",
    "qwen3_vl_moe": "Qwen3VLMoeTextModel",
    "step3p7": "Step3p7TextModel",
    "unlimited_ocr": "UnlimitedOcrTextModel",
}

# Set on every config that has the field (read from the config's defaults).
COMMON = dict(
    hidden_size=HIDDEN, intermediate_size=64, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, moe_shared_expert_intermediate_size=32,
    shared_experts_intermediate_size=32, share_expert_dim=32, moe_hidden_size=32,
    num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0,
    # experts and top-k, under every name the families use
    num_experts=NUM_EXPERTS, n_routed_experts=NUM_EXPERTS, num_local_experts=NUM_EXPERTS,
    moe_num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, num_experts_per_token=TOP_K,
    moe_topk=TOP_K, moe_k=TOP_K,
    # every layer sparse
    first_k_dense_replace=0, num_dense_layers=0, decoder_sparse_step=1, mlp_only_layers=[],
    # group-limited routing: 4 groups of 2 experts, 2 groups kept
    n_group=4, topk_group=2, num_expert_group=4,
    # multi-head latent attention and indexer sizes
    q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    qk_head_dim=16, index_topk=4, index_n_heads=2, index_head_dim=16,
    sliding_window=16,
    # linear-attention / state-space layers of hybrid models: small heads, small chunks
    linear_head_dim=16, linear_num_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_num_key_heads=2, linear_num_value_heads=4,
    mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16,
)

# Per-family corrections on top of COMMON: what each config needs to build with every MoE
# layer sparse and at least one attention layer (hybrid caches need one).
OVERRIDES: Dict[str, dict] = {
    "dots1": dict(n_shared_experts=1),
    "dots3_note": dict(num_key_value_heads=4),
    "glm5_next": dict(num_key_value_heads=4, index_kpool=2, qk_rope_head_dim=0, qk_nope_head_dim=16),
    "ernie4_5_moe": dict(moe_layer_start_index=0, moe_layer_end_index=LAYERS - 1, moe_layer_interval=1),
    "glm4v_moe": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                       "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]}),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"]),
    "jamba": dict(expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1),
    "lfm2_moe": dict(num_dense_layers=0, layer_types=["conv", "full_attention"]),
    # zero-compute experts widen the logits: E = 8 routed + 2 zero = 10
    "longcat_flash": dict(num_layers=2, zero_expert_num=2, head_dim=8, ffn_hidden_size=64, expert_ffn_hidden_size=32),
    # traps the adapters must handle: per-layer k, and a k the router ignores
    "hunyuan_v1_moe": dict(moe_topk=[2, 3]),
    "phimoe": dict(num_experts_per_tok=4),  # sparsemixer still routes top-2
    "nemotron_h": dict(num_hidden_layers=3, layers_block_type=["moe", "full_attention", "moe"]),
    "qwen4_exp": dict(layer_types=["linear_attention", "indexed_attention"], indexer_n_heads=2,
                      indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=2),
}


def model_class(family: str) -> type:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_CLASS.get(family) or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family]
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    return getattr(module, name)


def tiny_config(family: str):
    """The family's own config class, shrunk, with every layer an MoE layer."""
    config_cls = model_class(family).config_class
    defaults = config_cls().to_dict()
    kwargs = {k: v for k, v in COMMON.items() if k in defaults}
    if "kv_lora_rank" in defaults:  # multi-head latent attention: one kv head per head,
        kwargs.pop("head_dim", None)  # and the config derives head_dim from the rope/nope split
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    if "mlp_layer_types" in defaults:
        kwargs["mlp_layer_types"] = ["sparse"] * LAYERS
    if isinstance(defaults.get("layer_types"), list):
        kinds = list(dict.fromkeys(defaults["layer_types"]))  # keep one of each attention kind
        kwargs["layer_types"] = (kinds * LAYERS)[:LAYERS]
    kwargs.update(OVERRIDES.get(family, {}))
    return config_cls(**kwargs)


def randomize_routers(model: nn.Module, seed: int) -> List[Tuple[str, nn.Module]]:
    """Draw router weights, router biases and the MoE block's expert biases at random."""
    gen = torch.Generator().manual_seed(seed)
    routers = list(router_modules(model).items())
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, router in routers:
            for pname, tensor in list(router.named_parameters()) + list(router.named_buffers()):
                if tensor.is_floating_point():
                    # biases small next to sigmoid scores in (0, 1), weights give logits of std ~2
                    scale = 0.1 if "bias" in pname else 2.0 / tensor.shape[-1] ** 0.5
                    tensor.copy_(torch.randn(tensor.shape, generator=gen) * scale)
            block = modules.get(name.rpartition(".")[0])
            if block is None:
                continue
            # biases the block keeps and passes to its router (expert_bias, e_score_correction_bias)
            for pname, tensor in list(block.named_parameters(recurse=False)) + list(block.named_buffers(recurse=False)):
                if tensor.is_floating_point() and "bias" in pname:
                    tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
    return routers


def router_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """name -> router module, read straight from the models' ``_can_record_outputs``."""
    classes = set()
    for module in model.modules():
        record = getattr(type(module), "_can_record_outputs", None) or {}
        entries = record.get("router_logits", [])
        for entry in entries if isinstance(entries, (list, tuple)) else [entries]:
            classes.add(getattr(entry, "target_class", entry))
    return {name: m for name, m in model.named_modules() if type(m) in classes}


@functools.lru_cache(maxsize=None)
def tiny_model(family: str, seed: int = 0) -> nn.Module:
    """A tiny eval-mode model of ``family`` with randomised routers (cached per process)."""
    torch.manual_seed(seed)
    model = model_class(family)(tiny_config(family)).eval()
    randomize_routers(model, seed + 1)
    return model


def padded_batch(seed: int, batch: int = 3, length: int = 10) -> Dict[str, torch.Tensor]:
    """input_ids and an attention_mask with a full row, a left-padded and a right-padded row."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, : 3 + seed % 2] = 0  # left padding
    mask[2, length - 4 - seed % 3:] = 0  # right padding
    input_ids = input_ids.masked_fill(mask == 0, 0)
    return {"input_ids": input_ids, "attention_mask": mask}
