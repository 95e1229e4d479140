"""Tiny, real transformers models for the MoE families whose router is not a plain
``(logits, weights, indices)`` triple (see ``moewatch/adapters/hf_special.py``).

Each is built from its own config class with random weights (nothing from the hub): hidden 64,
2 layers, vocab 128, 8 experts and top-2 where the family allows it (Doge needs a square
number of experts: 16; Zaya and Switch route top-1; NLLB top-2 by construction). Router
weights and biases are re-drawn at random so routing is not degenerate, capacities are set so
that Switch and NLLB drop tokens, and every model is in eval mode so routing is
deterministic. Batches are padded (left and right); encoder-decoder models get a padded
encoder input and a padded decoder input.
"""
from __future__ import annotations

import functools
import importlib
from typing import Dict, List

import torch
from torch import nn

HIDDEN = 64
LAYERS = 2
VOCAB = 128
EXPERTS = 8
TOP_K = 2

_BASE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)

# family -> (config class, model class, config kwargs)
SPECS: Dict[str, tuple] = {
    "dbrx": ("DbrxConfig", "DbrxForCausalLM", dict(
        vocab_size=VOCAB, d_model=HIDDEN, n_heads=4, n_layers=LAYERS, max_seq_len=128, pad_token_id=0,
        attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
        ffn_config=dict(ffn_hidden_size=32, moe_num_experts=EXPERTS, moe_top_k=TOP_K))),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", dict(
        _BASE, head_dim=16, intermediate_size=32, intermediate_size_mlp=64, num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K, interleave_moe_layer_step=1, moe_layers=[0, 1], no_rope_layers=[1, 1],
        layer_types=["chunked_attention", "full_attention"], attention_chunk_size=16)),
    "jetmoe": ("JetMoeConfig", "JetMoeForCausalLM", dict(
        _BASE, kv_channels=16, intermediate_size=32, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)),
    "zaya": ("ZayaConfig", "ZayaForCausalLM", dict(  # Zaya routes top-1 only
        _BASE, head_dim=16, moe_intermediate_size=32, num_experts=EXPERTS, num_experts_per_tok=1,
        router_hidden_size=32, layer_types=["hybrid", "hybrid"])),
    "doge": ("DogeConfig", "DogeForCausalLM", dict(  # product keys: a square number of experts
        _BASE, intermediate_size=64, is_moe=True, num_experts=16, num_experts_per_tok=TOP_K,
        keep_window_size=128)),
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(
        _BASE, head_dim=16, intermediate_size=64, enable_moe_block=True, num_experts=EXPERTS,
        top_k_experts=TOP_K, moe_intermediate_size=32, layer_types=["sliding_attention", "full_attention"],
        sliding_window=16, hidden_size_per_layer_input=0, vocab_size_per_layer_input=VOCAB,
        per_layer_config={})),
    "diffusion_gemma": ("DiffusionGemmaTextConfig", "DiffusionGemmaEncoderTextModel", dict(
        _BASE, head_dim=16, intermediate_size=64, num_experts=EXPERTS, top_k_experts=TOP_K,
        moe_intermediate_size=32, layer_types=["sliding_attention", "full_attention"], sliding_window=16,
        per_layer_config={})),
    "ernie4_5_vl_moe": ("Ernie4_5_VLMoeTextConfig", "Ernie4_5_VLMoeTextModel", dict(
        _BASE, intermediate_size=64, moe_intermediate_size=[32, 32], moe_k=TOP_K, moe_num_experts=EXPERTS,
        moe_num_shared_experts=0, mlp_layer_types=["sparse", "sparse"],
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default", "mrope_section": [3, 3, 2]})),
    "deepseek_v4": ("DeepseekV4Config", "DeepseekV4ForCausalLM", dict(  # layer 0 hash-routed
        _BASE, head_dim=16, moe_intermediate_size=32, n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K,
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention"],
        mlp_layer_types=["hash_moe", "moe"], sliding_window=16, index_n_heads=2, index_head_dim=16,
        index_topk=4, num_nextn_predict_layers=0, qk_rope_head_dim=8)),
    "switch_transformers": ("SwitchTransformersConfig", "SwitchTransformersForConditionalGeneration", dict(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=64, num_layers=LAYERS, num_decoder_layers=LAYERS,
        num_heads=4, num_experts=EXPERTS, expert_capacity=2, encoder_sparse_step=1, decoder_sparse_step=1,
        num_sparse_encoder_layers=LAYERS, num_sparse_decoder_layers=LAYERS, pad_token_id=0,
        decoder_start_token_id=0)),
    "nllb_moe": ("NllbMoeConfig", "NllbMoeForConditionalGeneration", dict(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_ffn_dim=64,
        decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4, num_experts=EXPERTS,
        encoder_sparse_step=1, decoder_sparse_step=1, max_position_embeddings=128, pad_token_id=0,
        moe_eval_capacity_token_fraction=0.15)),  # eval capacity = ceil(0.15 * tokens): drops
}

FAMILIES: List[str] = sorted(SPECS)
ENCODER_DECODER = {"switch_transformers", "nllb_moe"}


def _classes(family: str):
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    configuration = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    config_name, model_name, kwargs = SPECS[family]
    return getattr(configuration, config_name), getattr(modeling, model_name), kwargs


def randomize(model: nn.Module, family: str, seed: int) -> None:
    """Re-draw every router weight and bias (and routing tables) so routing is non-degenerate."""
    from moewatch.adapters.hf_discovery import find_router_modules

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, router, _ in find_router_modules(model):
            for pname, tensor in list(router.named_parameters()) + list(router.named_buffers()):
                if family == "doge" and not pname.startswith("router_gate"):
                    continue  # Doge's recorded module is the whole block: only its key projection
                if pname.endswith("tid2eid"):  # DeepSeek-V4 hash table: two distinct experts per token
                    perm = torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOP_K] for _ in range(tensor.shape[0])])
                    tensor.copy_(perm)
                elif tensor.is_floating_point() and "bias" in pname:
                    scale = 0.05 if family in ("zaya", "ernie4_5_vl_moe") else 0.5  # added to probabilities there
                    tensor.copy_(torch.randn(tensor.shape, generator=gen) * scale)
                elif tensor.is_floating_point() and tensor.dim() == 2:
                    tensor.copy_(torch.randn(tensor.shape, generator=gen) * (2.0 / tensor.shape[-1] ** 0.5))


@functools.lru_cache(maxsize=None)
def tiny_model(family: str, seed: int = 0) -> nn.Module:
    """A tiny eval-mode model of ``family`` with randomised routers (cached per process)."""
    config_cls, model_cls, kwargs = _classes(family)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    randomize(model, family, seed + 1)
    return model


def padded_batch(family: str, seed: int, batch: int = 3, length: int = 10) -> Dict[str, torch.Tensor]:
    """Model inputs with a full row, a left-padded row and a right-padded row.

    Encoder-decoder families also get a padded decoder input. Ernie4.5-VL's second batch marks
    some tokens as vision tokens, so its text and vision gates each see a gathered subset.
    """
    gen = torch.Generator().manual_seed(1000 * seed + len(family))
    input_ids = torch.randint(1, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, : 3 + seed % 2] = 0  # left padding
    mask[2, length - 4 - seed % 3:] = 0  # right padding
    inputs = {"input_ids": input_ids.masked_fill(mask == 0, 0), "attention_mask": mask}
    if family in ENCODER_DECODER:
        dec_len = length - 3
        dec_ids = torch.randint(1, VOCAB, (batch, dec_len), generator=gen)
        dec_mask = torch.ones(batch, dec_len, dtype=torch.long)
        dec_mask[0, dec_len - 2:] = 0
        dec_mask[2, dec_len - 3 - seed % 2:] = 0
        inputs["decoder_input_ids"] = dec_ids.masked_fill(dec_mask == 0, 0)
        inputs["decoder_attention_mask"] = dec_mask
    if family == "ernie4_5_vl_moe" and seed % 2 == 1:
        types = (torch.rand(batch, length, generator=gen) < 0.4).long()
        types[0, 0] = 1  # at least one vision token
        inputs["moe_mm_token_type_ids"] = types
    return inputs
