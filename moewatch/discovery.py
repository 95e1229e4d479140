"""Turn a model and the ``gates=`` option into the list of gates to hook."""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Dict, List, Optional, Sequence, Union

from torch import nn

from .adapters.base import AdapterError, GateSpec
from .adapters.hf_discovery import config_for, configs_by_prefix, find_router_modules
from .adapters.hf_legacy import older_transformers, older_transformers_message
from .adapters.pattern import pattern_gate
from .adapters.registry import builder_for, supported_families, wants_model
from .wrappers import own_name, own_names

GatesOption = Union[None, str, Sequence[str]]

_CANDIDATE_WORDS = ("gate", "router", "routing", "moe", "expert", "switch")


def candidate_modules(model: nn.Module, limit: int = 25) -> List[str]:
    """Modules that look like they might be gates, for error messages."""
    seen = []
    for name, module in model.named_modules():
        lowered = (name + " " + type(module).__name__).lower()
        if any(w in lowered for w in _CANDIDATE_WORDS):
            seen.append(f"{name} ({type(module).__name__})")
    if not seen:  # fall back to small linear layers: a gate maps hidden -> E, E small
        seen = [f"{n} ({type(m).__name__}, out={m.out_features})" for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and m.out_features <= 512]
    more = f" ... and {len(seen) - limit} more" if len(seen) > limit else ""
    return seen[:limit] + ([more] if more else [])


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def resolve_gates(
    model: nn.Module,
    gates: GatesOption = None,
    top_k: Optional[int] = None,
    scoring: str = "softmax",
    num_experts: Optional[int] = None,
) -> List[GateSpec]:
    """The gates of ``model``: known router classes, or the modules ``gates`` names."""
    supported_families()  # import every adapter module
    configs = configs_by_prefix(model)
    routers = {name: (module, family) for name, module, family in find_router_modules(model)}
    specs: List[GateSpec] = []
    legacy = older_transformers(model)
    if legacy is not None:  # its router classes are not 5's: gates= modules only, read by pattern
        if gates is None:
            raise AdapterError(older_transformers_message(model, legacy))
        routers = {}

    if gates is None:
        for name, (module, family) in routers.items():
            spec = _build_known(name, module, family, configs, model)
            if spec is not None:  # None: a recorded class that is not itself a gate
                specs.append(spec)
        if not specs:
            raise AdapterError(
                f"found no MoE gate in {type(model).__name__}: it declares no router classes that "
                "moewatch knows. Name your gate modules with gates= (a pattern such as "
                "'model.layers.*.mlp.gate') and pass top_k= and scoring=. Modules that look like "
                "candidates:\n  " + "\n  ".join(candidate_modules(model) or ["(none)"])
            )
        _check_top_k(specs, top_k)
        return _named_as_the_bare_model(model, specs)

    patterns = [gates] if isinstance(gates, str) else list(gates)
    for name, module in _matched_modules(model, patterns, routers):
        if name in routers:
            spec = _build_known(name, module, routers[name][1], configs, model)
            if spec is not None:
                specs.append(spec)
        else:
            specs.append(pattern_gate(name, module, top_k, scoring, num_experts))
    _check_top_k(specs, top_k)
    specs = _named_as_the_bare_model(model, specs)
    if not specs:
        raise AdapterError(
            f"gates={gates!r} matched no module of {type(model).__name__}. Patterns are matched "
            "against names from model.named_modules(), and the bare model's names under wrappers "
            "such as DDP or PEFT (fnmatch, e.g. 'model.layers.*.mlp.gate'). "
            "Modules that look like candidates:\n  " + "\n  ".join(candidate_modules(model) or ["(none)"])
        )
    return specs


def _matched_modules(model: nn.Module, patterns: Sequence[str], routers) -> List[tuple]:
    """(name, module) of the modules whose name, or own name under wrappers (``wrappers``), a
    pattern matches: a pattern written for the bare model matches under DDP or a PEFT adapter.
    Where a wrapper and what it wraps share an own name, one is hooked: a known router class,
    else the outermost (a LoRA layer's output is the gate's, adapter included)."""
    chosen: Dict[str, tuple] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        own = own_name(model, name)
        if not (_matches(name, patterns) or _matches(own, patterns)):
            continue
        if own not in chosen or (name in routers and chosen[own][0] not in routers):
            chosen[own] = (name, module)
    return list(chosen.values())


def _named_as_the_bare_model(model: nn.Module, specs: List[GateSpec]) -> List[GateSpec]:
    """The specs with each gate named as the bare model names it (``wrappers.own_name``)."""
    names = own_names(model, [spec.info.name for spec in specs])
    return [spec if names[spec.info.name] == spec.info.name else
            dataclasses.replace(spec, info=dataclasses.replace(spec.info, name=names[spec.info.name]))
            for spec in specs]


def _check_top_k(specs: List[GateSpec], top_k: Optional[int]) -> None:
    """A known router keeps its family's k, but a top_k= above a gate's experts is a mistake."""
    for spec in specs if top_k is not None else ():
        if top_k > spec.info.num_experts:
            raise AdapterError(f"top_k={top_k} is more than the {spec.info.num_experts} experts of gate "
                               f"{spec.info.name!r}: pass a top_k between 1 and {spec.info.num_experts}")


def _build_known(name: str, module: nn.Module, family: str, configs, model: nn.Module) -> Optional[GateSpec]:
    """The family's GateSpec for ``module``, or None where the family's builder skips it
    (e.g. JetMoE records its attention block, whose own router is hooked instead)."""
    builder = builder_for(family)
    if builder is None:
        raise AdapterError(
            f"gate {name!r} is a {type(module).__name__} from the transformers family {family!r}, "
            "which moewatch has no adapter for yet; name the gate's logits module with gates= "
            "and pass top_k= and scoring=, or open an issue"
        )
    try:
        if wants_model(family):
            return builder(name, module, config_for(name, configs), model=model)
        return builder(name, module, config_for(name, configs))
    except AdapterError:
        raise
    except Exception as error:  # an adapter meeting a layout it was not written for: said, not a traceback
        raise AdapterError(
            f"could not read gate {name!r} ({type(module).__name__}, transformers family {family!r}): "
            f"{type(error).__name__}: {error}; name the module that returns its logits with gates= and "
            "pass top_k= and scoring=, or open an issue") from error
