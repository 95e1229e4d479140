"""The model's own names of its modules, under the wrappers that training and fine-tuning add.

Data parallelism, PEFT adapters, ``torch.compile`` and activation checkpointing wrap a model
(or one of its modules) in a module of their own, which holds the wrapped one under an
attribute: every name below it gains a segment (``module.``, ``base_model.model.``,
``.base_layer``, ...). A gate named that way would not match the baseline recorded on the bare
model, nor the dashboards and alert rules written for it, and would change name the day a
LoRA adapter is put on. So gates are named as the bare model names them: the segments that
step from a wrapper into what it wraps are left out. Wrappers are known by class name, so no
wrapper's library is imported.
"""
from __future__ import annotations

from typing import Dict, FrozenSet, Tuple

from torch import nn

# (a class in the wrapper's MRO, the attribute that holds the wrapped module)
_WRAPPER_LINKS: Tuple[Tuple[str, str], ...] = (
    ("DistributedDataParallel", "module"),  # torch DDP (and accelerate's, which is it)
    ("DataParallel", "module"),
    ("FullyShardedDataParallel", "_fsdp_wrapped_module"),  # FSDP1 (FSDP2 wraps nothing)
    ("CheckpointWrapper", "_checkpoint_wrapped_module"),  # torch's checkpoint_wrapper
    ("OffloadWrapper", "_checkpoint_wrapped_module"),
    ("OptimizedModule", "_orig_mod"),  # torch.compile(module)
    ("PeftModel", "base_model"),  # PeftModel -> its tuner
    ("BaseTuner", "model"),  # LoraModel and the other tuners -> the model
    ("BaseTunerLayer", "base_layer"),  # a LoRA layer (or ParamWrapper) -> the wrapped module
)


def _class_names(module: nn.Module) -> FrozenSet[str]:
    return frozenset(cls.__name__ for cls in type(module).__mro__)


def _is_wrapper_link(parent: nn.Module, attribute: str) -> bool:
    names = _class_names(parent)
    return any(cls in names and attribute == held for cls, held in _WRAPPER_LINKS)


def own_name(model: nn.Module, name: str) -> str:
    """``name`` (as ``model.named_modules()`` gives it) without the segments that step into a
    wrapped module: ``base_model.model.model.layers.0.mlp.gate.base_layer`` of a PEFT model is
    ``model.layers.0.mlp.gate``. A name that does not resolve is returned as it is."""
    if not name:
        return name
    kept = []
    module = model
    for segment in name.split("."):
        child = module._modules.get(segment)
        if child is None:
            return name
        if not _is_wrapper_link(module, segment):
            kept.append(segment)
        module = child
    return ".".join(kept) or name


def own_names(model: nn.Module, names) -> Dict[str, str]:
    """{name: own name} for ``names``; where two of them would get one own name (a wrapper and
    what it wraps, both named), every name is kept as it is, so no two gates share a name."""
    mapping = {name: own_name(model, name) for name in names}
    if len(set(mapping.values())) != len(mapping):
        return {name: name for name in names}
    return mapping
