"""Run under transformers 4 (tests/test_transformers4.py puts it first on the path): each
family's model is refused without gates= with a message naming the gates= that watch it, and
attached that way it counts exactly what its MoE blocks routed. Prints one JSON line."""
from __future__ import annotations

import json
import re
import sys
import warnings

import numpy as np
import torch

import moewatch
import transformers
from moewatch.adapters.base import AdapterError

FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8, num_experts_per_tok=2)),
}


def one_family(family: str) -> dict:
    config_class, model_class, fields = FAMILIES[family]
    config = getattr(transformers, config_class)(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, **fields)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    ids = torch.randint(0, 128, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, -2:] = 0  # right padding
    result = {"version": transformers.__version__}
    try:
        moewatch.attach(model, background=False)
        result["refused"] = None
    except AdapterError as error:
        result["refused"] = str(error)
    suggestion = re.search(r"attach with (gates=.*?, top_k=\d+)", result["refused"] or "")
    if suggestion is None:
        return result
    options = eval(f"dict({suggestion.group(1)})")  # noqa: S307 (the message's own arguments)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask, output_router_logits=True)
    real = mask.reshape(-1).bool()
    # what the MoE blocks routed: softmax top-k of the router logits they return, real tokens
    expected = [np.bincount(torch.topk(logits.softmax(-1), options["top_k"]).indices[real].reshape(-1).numpy(),
                            minlength=logits.shape[-1]).tolist() for logits in plain.router_logits]
    with moewatch.attach(model, background=False, **options) as mon, torch.no_grad():
        watched = model(ids, attention_mask=mask).logits
        mon.flush()
        result.update(counts=[c.tolist() for c in mon.counts().values()], expected=expected,
                      gates=[g.name for g in mon.gates], errors=mon.error_counts(),
                      same=bool(torch.equal(watched, plain.logits)))
    return result


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print("RESULT " + json.dumps({family: one_family(family) for family in FAMILIES}), flush=True)
