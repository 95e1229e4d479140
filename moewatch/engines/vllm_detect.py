"""Is a model run by vLLM? Decided from class origins only, without importing vLLM."""
from __future__ import annotations

from torch import nn

_MOE_LAYER_CLASSES = ("MoERunner", "FusedMoE")


def runs_on_vllm(model: nn.Module) -> bool:
    """True when ``model`` holds a vLLM fused-MoE layer (a class from the ``vllm`` package)."""
    if not type(model).__module__.startswith("vllm."):
        return False
    for module in model.modules():
        cls = type(module)
        if cls.__module__.startswith("vllm.") and any(
                base.__name__ in _MOE_LAYER_CLASSES for base in cls.__mro__):
            return True
    return False
