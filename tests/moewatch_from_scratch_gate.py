"""A from-scratch MoE whose gate returns ``(logits, None)``, as vLLM's gate layers do."""
from __future__ import annotations

import torch
from torch import nn


class PairGate(nn.Linear):
    """A linear router returning ``(logits, None)`` (logits [..., E])."""

    def forward(self, x: torch.Tensor):
        return super().forward(x), None


class PairGateBlock(nn.Module):
    def __init__(self, d_model: int = 32, num_experts: int = 8, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        self.router = PairGate(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(num_experts))
        self.last_indices = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.router(x)  # [B, S, E]
        weights, indices = torch.topk(torch.sigmoid(logits), self.top_k, dim=-1)  # [B, S, k]
        self.last_indices = indices
        out = torch.zeros_like(x)
        for slot in range(self.top_k):
            for e, expert in enumerate(self.experts):
                out = out + (indices[..., slot] == e).unsqueeze(-1) * weights[..., slot:slot + 1] * expert(x)
        return out


class PairGateLM(nn.Module):
    def __init__(self, vocab: int = 64, d_model: int = 32, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(PairGateBlock(d_model) for _ in range(layers))
        self.head = nn.Linear(d_model, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)
