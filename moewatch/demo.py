"""``moewatch demo``: watch a small MoE on the CPU go from healthy routing to a collapse."""
from __future__ import annotations

from typing import Callable, Iterator, Tuple

import torch
from torch import nn

import moewatch


def tiny_model(seed: int = 0) -> Tuple[nn.Module, Callable[[int], Iterator[dict]]]:
    """A small random-weight Mixtral and a source of padded batches."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                           num_experts_per_tok=2)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(std=0.3)

    def batches(n: int) -> Iterator[dict]:
        gen = torch.Generator().manual_seed(seed + 1)
        for _ in range(n):
            ids = torch.randint(0, 256, (8, 64), generator=gen)
            mask = torch.ones_like(ids)
            mask[: 2, :16] = 0  # some left padding, as a batching server produces
            yield {"input_ids": ids, "attention_mask": mask}

    return model, batches


def collapse_bias(model: nn.Module, layer: int, experts=(0, 1), strength: float = 8.0):
    """Skew one gate so most tokens pick ``experts``: add to their logits. Returns an undo."""
    gate = model.model.layers[layer].mlp.gate

    def hook(module, args, output):
        logits, _, _ = output
        skewed = logits.clone()
        skewed[:, list(experts)] += strength * logits.std()
        probs = torch.softmax(skewed.float(), dim=-1)
        weights, indices = torch.topk(probs, module.top_k, dim=-1)
        return skewed, weights / weights.sum(dim=-1, keepdim=True), indices

    handle = gate.register_forward_hook(hook, prepend=True)  # before moewatch's hook
    return handle.remove


def _print_windows(mon: moewatch.Monitor, last: int) -> None:
    frame = mon.windows()
    frame = frame[frame["window"] >= frame["window"].max() - last + 1]
    columns = ["window", "gate", "tokens", "effective_experts", "top_share", "entropy_mean", "logit_std",
               "top1_prob_mean", "dead_experts"]
    print(frame[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def run(windows: int = 3) -> int:
    model, batches = tiny_model()
    print(f"model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    with moewatch.attach(model, background=False, model_name="demo") as mon:
        print(f"watching {len(mon.gates)} gates: {', '.join(g.name for g in mon.gates)}\n")
        print("== healthy traffic")
        for batch in batches(windows):
            with torch.no_grad():
                model(**batch)
            health = mon.flush()
        _print_windows(mon, windows)
        print(f"\n{health}\n")
        print("== injected fault: layer 2's gate sends most tokens to experts 0 and 1")
        undo = collapse_bias(model, layer=2)
        for batch in batches(windows):
            with torch.no_grad():
                model(**batch)
            health = mon.flush()
        undo()
        _print_windows(mon, 1)
        print(f"\n{health}")
        if mon.error_counts():
            print(f"internal errors: {mon.error_counts()}")
    return 0
