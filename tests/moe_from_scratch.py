"""A from-scratch MoE language model of the kind users write themselves (no transformers)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MoELayer(nn.Module):
    """Softmax top-k router over small FFN experts; records the decisions it made."""

    def __init__(self, d_model: int, num_experts: int = 8, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))
            for _ in range(num_experts))
        self.last_indices = None  # [B, S, k], for tests

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)  # [B, S, E]
        weights, indices = torch.topk(F.softmax(logits, dim=-1), self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        self.last_indices = indices
        out = torch.zeros_like(x)
        for slot in range(self.top_k):
            for e, expert in enumerate(self.experts):
                chosen = (indices[..., slot] == e).unsqueeze(-1)
                out = out + chosen * weights[..., slot:slot + 1] * expert(x)
        return out


class TinyMoELM(nn.Module):
    def __init__(self, vocab: int = 64, d_model: int = 32, layers: int = 2, num_experts: int = 8, top_k: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(MoELayer(d_model, num_experts, top_k) for _ in range(layers))
        self.head = nn.Linear(d_model, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor = None) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)
