"""Tiny MoE checkpoints for the vLLM engine tests: random weights at a usable scale, as safetensors.

vLLM's ``load_format="dummy"`` fills weights with values so small that every router logit is
about 1e-6 and every expert ties; these checkpoints are written with transformers' own random
initialisation (a wider ``initializer_range``), and the DeepSeek-V3 one with a random, non-zero
score-correction bias, so that routing is decisive and the bias changes it.

Run with the vLLM venv's python (its transformers): ``python vllm_models.py all DIR`` (the Mixtral and
the DeepSeek-V3-style model), ``python vllm_models.py families DIR`` (more families, ``FAMILIES``).
"""
from __future__ import annotations

import json
import os
import sys

import torch

VOCAB = 256


def _finish(model, out_dir: str) -> str:
    model.save_pretrained(out_dir, safe_serialization=True)
    config_path = os.path.join(out_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["torch_dtype"] = "float32"
    config["dtype"] = "float32"
    with open(config_path, "w") as f:
        json.dump(config, f, indent=1)
    return out_dir


def mixtral(out_dir: str, seed: int = 0) -> str:
    """8 experts, top-2, softmax: 2 layers, hidden 64 (vLLM's CPU attention needs head_dim >= 32)."""
    return _mixtral(out_dir, seed, hidden=64, intermediate=64, layers=2, heads=2, kv_heads=1, vocab=VOCAB,
                    init=0.08)


def mixtral_shaped(out_dir: str, seed: int = 0) -> str:
    """A Mixtral of real proportions at a CPU-sized scale (benchmarks): 8 experts, top-2, 4 layers,
    hidden 1024, experts 2048 wide, 16 heads of 64 (4 KV heads), a 32,000-token vocabulary;
    about 280M parameters."""
    return _mixtral(out_dir, seed, hidden=1024, intermediate=2048, layers=4, heads=16, kv_heads=4, vocab=32000,
                    init=0.02)


def _mixtral(out_dir: str, seed: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
             vocab: int, init: float) -> str:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                           head_dim=hidden // heads, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=512, initializer_range=init, tie_word_embeddings=False)
    return _finish(MixtralForCausalLM(config).float(), out_dir)


def deepseek_v3(out_dir: str, seed: int = 0) -> str:
    """DeepSeek-V3 style: 8 routed experts in 4 groups (2 kept), top-2, sigmoid scoring,
    score-correction bias, one shared expert; layer 0 dense, layers 1-2 MoE; MLA attention
    (vLLM's CPU MLA kernel needs kv_lora_rank 512 and a rope head of 64)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=1.0, norm_topk_prob=True,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32, max_position_embeddings=512,
        initializer_range=0.08, tie_word_embeddings=False, rope_scaling=None)
    config.scoring_func = "sigmoid"
    config.topk_method = "noaux_tc"
    model = DeepseekV3ForCausalLM(config).float()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):  # zeros by default: make it matter
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return _finish(model, out_dir)


def dense(out_dir: str, seed: int = 0) -> str:
    """A dense model (Llama, no MoE layer): what a fleet serves beside its MoE models."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                         tie_word_embeddings=False)
    return _finish(LlamaForCausalLM(config).float(), out_dir)


MODELS = {"mixtral": mixtral, "deepseek_v3": deepseek_v3}  # "all"
OTHER_MODELS = {"dense": dense}

# More of vLLM's MoE families (tests/test_vllm_families.py), each at the scale of the Mixtral
# above: transformers' config class, the family's MoE fields (8 experts), and the architecture
# vLLM registers where transformers saves another name (vLLM would otherwise fall back to
# running transformers' own modelling code).
_SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=512, initializer_range=0.08, tie_word_embeddings=False)
FAMILIES = {
    # shared expert with its own one-wide gate beside the router's gate
    "qwen2_moe": ("Qwen2MoeConfig", dict(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8,
                                         num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]), None),
    "qwen3_moe": ("Qwen3MoeConfig", dict(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, head_dim=32,
                                         decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True), None),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_experts_per_tok=2), None),
    # the gate is a module named "router", with a bias
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=8, num_experts_per_tok=2, head_dim=32, sliding_window=64), None),
    # top-1 then a sigmoid, by a custom routing function
    "llama4": ("Llama4TextConfig", dict(num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=1,
                                        head_dim=32, intermediate_size_mlp=64), None),
    # sigmoid scoring with a score-correction bias, DeepSeek-V3's router in GLM's model
    "glm4_moe": ("Glm4MoeConfig", dict(moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                                       num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0,
                                       head_dim=32), None),
    # sigmoid then top-k, by a custom routing function
    "cohere2_moe": ("Cohere2MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=32,
                                             expert_selection_fn="sigmoid"), None),
    # hybrid: gated delta-net (linear attention) layers between full attention ones; a shared
    # expert; vLLM's CPU build runs its linear attention in bfloat16 only (the test serves it so)
    "qwen3_next": ("Qwen3NextConfig", dict(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8,
                                           num_experts_per_tok=2, head_dim=64, linear_num_value_heads=2,
                                           linear_num_key_heads=2, linear_key_head_dim=64, linear_value_head_dim=64,
                                           full_attention_interval=2), None),
    # sparsemixer, a custom routing function of its own
    "phimoe": ("PhimoeConfig", dict(num_local_experts=8, num_experts_per_tok=2), "PhiMoEForCausalLM"),
    # sigmoid scoring with an expert bias by vLLM's grouped top-k (one group), a shared expert, the
    # checkpoint's mlp.router.gate loaded as mlp.gate, gated attention in sliding-window and full
    # layers; vLLM reads route_norm, score_func, n_group and topk_group, fields transformers'
    # config does not define (they pass through to config.json as given)
    "afmoe": ("AfmoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=32,
                                  num_dense_layers=0, num_shared_experts=1, score_func="sigmoid", route_norm=True,
                                  route_scale=1.0, n_group=1, topk_group=1, global_attn_every_n_layers=2,
                                  sliding_window=64), None),
    # GLM-4-MoE's router in DeepSeek-V2's MLA attention (vLLM's CPU MLA kernel: kv_lora_rank 512,
    # a rope head of 64); every layer MoE: transformers writes its weights by mlp_layer_types,
    # vLLM builds its layers by first_k_dense_replace (a field transformers' config does not define)
    "glm4_moe_lite": ("Glm4MoeLiteConfig", dict(moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                                                num_experts_per_tok=2, n_group=1, topk_group=1,
                                                mlp_layer_types=["sparse", "sparse"], first_k_dense_replace=0,
                                                q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=32,
                                                qk_rope_head_dim=64, v_head_dim=32, num_key_value_heads=2), None),
}


def family(name: str, out_dir: str, seed: int = 0) -> str:
    """One of FAMILIES as a random checkpoint."""
    import transformers
    from transformers import AutoModelForCausalLM

    config_class, fields, architecture = FAMILIES[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**{**_SMALL, **fields})
    _finish(AutoModelForCausalLM.from_config(config).float(), out_dir)
    if architecture is not None:
        config_path = os.path.join(out_dir, "config.json")
        with open(config_path) as f:
            saved = json.load(f)
        saved["architectures"] = [architecture]
        with open(config_path, "w") as f:
            json.dump(saved, f, indent=1)
    return out_dir


if __name__ == "__main__":
    # python vllm_models.py all|mixtral|deepseek_v3|dense|families DIR [SEED]: one subfolder per model
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    if sys.argv[1] == "families":
        for key in FAMILIES:
            print(family(key, os.path.join(sys.argv[2], key), seed))
    else:
        for key in (MODELS if sys.argv[1] == "all" else [sys.argv[1]]):
            print({**MODELS, **OTHER_MODELS}[key](os.path.join(sys.argv[2], key), seed))
