"""Find the router modules of a transformers model by class.

Every transformers MoE model lists its router classes in
``_can_record_outputs["router_logits"]``; we collect those classes from every
``PreTrainedModel`` inside the model and hook each module of those classes. The word
"gate" is never used to find gates (it also matches ``gate_proj``, ``shared_expert_gate``).
"""
from __future__ import annotations

import sys
from typing import Dict, List, Tuple, Type

from torch import nn

from .registry import extra_router_classes


def _recorder_classes(entry) -> List[type]:
    entries = entry if isinstance(entry, (list, tuple)) else [entry]
    classes = []
    for e in entries:
        cls = getattr(e, "target_class", None)
        if cls is None and isinstance(e, type):
            cls = e
        if cls is not None:
            classes.append(cls)
    return classes


def family_of(cls: type) -> str:
    """transformers.models.<family>.modeling_<family>.<Class> -> <family>."""
    parts = cls.__module__.split(".")
    if len(parts) >= 3 and parts[0] == "transformers" and parts[1] == "models":
        return parts[2]
    return cls.__module__


def _declaring_classes(model: nn.Module) -> List[type]:
    """The classes whose ``_can_record_outputs`` may name the routers of ``model``: those of its
    modules, and the models of each transformers modeling module one of its modules comes from
    (a MoE block of transformers inside a model of the user's own, or attached on its own,
    has no PreTrainedModel around it to declare its router)."""
    classes = {type(module): None for module in model.modules()}
    modeling_modules = {cls.__module__ for cls in classes if cls.__module__.startswith("transformers.models.")}
    for name in sorted(modeling_modules):
        for value in vars(sys.modules.get(name, object)).values():
            if isinstance(value, type) and isinstance(vars(value).get("_can_record_outputs"), dict):
                classes.setdefault(value, None)
    return list(classes)


def router_classes(model: nn.Module) -> Dict[Type[nn.Module], str]:
    """Router classes declared by any PreTrainedModel inside ``model``, or by the transformers
    models whose blocks it holds -> family name."""
    found: Dict[Type[nn.Module], str] = {}
    for declaring in _declaring_classes(model):
        record = getattr(declaring, "_can_record_outputs", None)
        if not isinstance(record, dict) or "router_logits" not in record:
            continue
        for cls in _recorder_classes(record["router_logits"]):
            found[cls] = family_of(cls)
    for cls, family in list(found.items()):  # routers a family uses but does not record
        modeling = sys.modules.get(cls.__module__)
        for extra in extra_router_classes(family):
            extra_cls = getattr(modeling, extra, None)
            if isinstance(extra_cls, type):
                found[extra_cls] = family
    return found


def configs_by_prefix(model: nn.Module) -> List[Tuple[str, object]]:
    """(module-name prefix, config) for every submodule carrying a ``config``, deepest first."""
    pairs = []
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            pairs.append((name, config))
    pairs.sort(key=lambda p: -len(p[0]))
    return pairs


def config_for(name: str, pairs: List[Tuple[str, object]]) -> object:
    """The config of the deepest configured ancestor of module ``name``."""
    for prefix, config in pairs:
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            return config
    return None


def find_router_modules(model: nn.Module) -> List[Tuple[str, nn.Module, str]]:
    """(qualified name, module, family) for every router module, in model order."""
    classes = router_classes(model)
    if not classes:
        return []
    return [
        (name, module, classes[type(module)])
        for name, module in model.named_modules()
        if type(module) in classes
    ]
