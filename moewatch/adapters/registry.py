"""Adapter registry: family name -> how to build a GateSpec for one of its router modules."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set, Tuple

from torch import nn

from .base import GateSpec

# builder(name, module, config) -> GateSpec
Builder = Callable[[str, nn.Module, object], GateSpec]

_FAMILIES: Dict[str, Builder] = {}
# Families whose builder also needs the whole model: builder(name, module, config, model=root).
_WITH_MODEL: Set[str] = set()
# family -> names of router classes its models do not list in ``_can_record_outputs``.
_EXTRA_CLASSES: Dict[str, Tuple[str, ...]] = {}


def register(*families: str, with_model: bool = False) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder`` for the given transformers model types.

    ``with_model=True``: the builder is also passed ``model=`` (the root module), for gates
    that need a hook on a module outside the router (e.g. the MoE block holding token types).
    """

    def wrap(builder: Builder) -> Builder:
        for family in families:
            _FAMILIES[family] = builder
            if with_model:
                _WITH_MODEL.add(family)
            else:
                _WITH_MODEL.discard(family)
        return builder

    return wrap


def register_router_classes(family: str, *class_names: str) -> None:
    """Router classes of ``family`` (names in its modeling module) that its models do not record."""
    _EXTRA_CLASSES[family] = tuple(class_names)


def extra_router_classes(family: str) -> Tuple[str, ...]:
    return _EXTRA_CLASSES.get(family, ())


def builder_for(family: str) -> Optional[Builder]:
    return _FAMILIES.get(family)


def wants_model(family: str) -> bool:
    return family in _WITH_MODEL


def supported_families() -> List[str]:
    """Every transformers MoE family with a registered adapter, sorted."""
    from . import hf_families  # noqa: F401  (registers the families on import)

    return sorted(_FAMILIES)
