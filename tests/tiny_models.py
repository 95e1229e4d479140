"""Small real transformers MoE models built from configs (random weights), and padded batches."""
from __future__ import annotations

import torch


def tiny_mixtral(seed: int = 0, layers: int = 2, experts: int = 8, top_k: int = 2):
    """A real MixtralForCausalLM with a non-degenerate random router."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                           num_experts_per_tok=top_k, max_position_embeddings=256)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(std=0.5)
    return model


def padded_batch(seed: int = 1, batch: int = 3, length: int = 12, vocab: int = 128):
    """input_ids and an attention_mask with left and right padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    if batch > 2:
        mask[2, -5:] = 0  # right padding
    return ids, mask
