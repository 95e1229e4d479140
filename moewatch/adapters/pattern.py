"""Gates named by the user: any module whose output is router logits [..., E]."""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..routing import SCORINGS, GateInfo, Routing
from .base import AdapterError, GateSpec, first_tensor, flat_tokens


def logits_width(module: nn.Module) -> Optional[int]:
    """E for a linear-like gate: out_features, or the rows of a 2-D weight."""
    out = getattr(module, "out_features", None)
    if isinstance(out, int):
        return out
    weight = getattr(module, "weight", None)
    if weight is not None and getattr(weight, "dim", lambda: 0)() == 2:
        return int(weight.shape[0])
    return None


def pattern_gate(name: str, module: nn.Module, top_k: Optional[int], scoring: str,
                 num_experts: Optional[int]) -> GateSpec:
    """A GateSpec for a user's own gate: its output (or first output) is the logits."""
    if top_k is None:
        raise AdapterError(
            f"gate {name!r} ({type(module).__name__}) is not a known router class, so moewatch "
            "cannot tell how many experts each token goes to: pass top_k= to moewatch.attach"
        )
    if scoring not in SCORINGS:
        raise AdapterError(f"scoring={scoring!r} is not one of {SCORINGS}")
    width = num_experts or logits_width(module)
    if width is None:
        raise AdapterError(
            f"cannot read the number of experts of gate {name!r} ({type(module).__name__}): "
            "pass num_experts= to moewatch.attach"
        )
    if not 1 <= top_k <= width:
        raise AdapterError(f"top_k={top_k} must be between 1 and the gate's {width} experts ({name!r})")

    def extract(mod, args, kwargs, output) -> Routing:
        logits = first_tensor(output)
        return Routing(logits=flat_tokens(logits, logits.shape[-1]))  # [T, E]

    extract.output_only = True  # reads the output alone: may run later, on the reader (hooks.py)
    extract.picks = (0, None)  # of a tuple output, it picks the logits alone (hotpath.staged)

    info = GateInfo(name=name, num_experts=width, top_k=top_k, family="custom", scoring=scoring)
    return GateSpec(info=info, module=module, extract=extract)
