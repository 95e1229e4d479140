"""Adapter registry: family name -> how to build a GateSpec for one of its router modules."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

from torch import nn

from .base import GateSpec

# builder(name, module, config) -> GateSpec
Builder = Callable[[str, nn.Module, object], GateSpec]

_FAMILIES: Dict[str, Builder] = {}


def register(*families: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder`` for the given transformers model types."""

    def wrap(builder: Builder) -> Builder:
        for family in families:
            _FAMILIES[family] = builder
        return builder

    return wrap


def builder_for(family: str) -> Optional[Builder]:
    return _FAMILIES.get(family)


def supported_families() -> List[str]:
    """Every transformers MoE family with a registered adapter, sorted."""
    from . import hf_families  # noqa: F401  (registers the families on import)

    return sorted(_FAMILIES)
