"""What an adapter hands the monitor: one :class:`GateSpec` per gate module it found."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
from torch import nn

from ..routing import GateInfo, Routing

# extract(module, args, kwargs, output) -> Routing; runs inside the forward hook.
Extractor = Callable[[nn.Module, tuple, dict, Any], Routing]


@dataclass(frozen=True)
class Companion:
    """A helper hook on another module, for gates whose decision is spread over several modules.

    ``hook`` has the signature of a forward hook (``pre=False``: module, args, kwargs, output)
    or a forward pre-hook (``pre=True``: module, args, kwargs); it must only read, and return
    None. It typically stashes a tensor (true logits, token types) that the gate's ``extract``
    reads later in the same forward. The monitor installs and removes it with the gate hook,
    and counts its failures like the gate hook's.
    """

    module: nn.Module
    hook: Callable[..., None]
    pre: bool = False


@dataclass
class GateSpec:
    """A gate found in a model, and how to read its decisions.

    An ``extract`` that reads nothing but the gate's output (not the module, its arguments or
    what companions left) says so with ``extract.output_only = True``: on CPU gates the hook
    then keeps the output and the reader extracts it later, off the forward's thread. One
    that only picks members of a tuple output says which with ``extract.picks = (i, j)``
    (logits ``output[i]``, indices ``output[j]`` or None; each flattened to [T, width]): the
    reader then takes them without calling it.
    """

    info: GateInfo
    module: nn.Module
    extract: Extractor
    # Which root-call keyword holds this gate's padding mask (decoders of encoder-decoder
    # models read ``decoder_attention_mask``).
    mask_key: str = "attention_mask"
    # Extra hooks the gate needs (run before the gate hook in the same forward).
    companions: Tuple[Companion, ...] = ()
    # Where the gate hook goes when the decision is not a module's output (a serving engine's
    # capture callback): ``install(hook)`` wires ``hook(module, args, kwargs, output)`` in and
    # returns a handle whose ``remove()`` takes it out. None: a forward hook on ``module``.
    install: Optional[Callable[[Callable[..., None]], Any]] = None


@dataclass(frozen=True)
class FamilyDoc:
    """How an adapter reads a family, as listed in ``docs/families.md`` (``builder.doc``)."""

    scoring: str
    experts: str  # where E (the number of experts, the width of the logits) comes from
    top_k: str  # where k comes from
    notes: str = ""


class AdapterError(ValueError):
    """A model or gate option that moewatch cannot monitor, with what to do about it."""


def width_error(name: str, width: int, attached: int) -> AdapterError:
    """A gate whose logits are not as wide as it was attached with: what to do about it."""
    return AdapterError(
        f"gate {name!r} returned router logits {width} wide, but it was attached with "
        f"num_experts={attached}: it is not monitored. Attach with num_experts={width}, "
        "or point gates= at the router module itself")


def first_tensor(output: Any) -> torch.Tensor:
    """The first tensor of a module output (a tensor, or a tuple/list starting with one)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"gate returned {type(output).__name__}, expected a tensor or a tuple of tensors")


def flat_tokens(t: torch.Tensor, width: int) -> torch.Tensor:
    """[..., width] -> [T, width] (a view when possible; the tensor itself when already 2-D)."""
    return t if t.dim() == 2 and t.shape[1] == width else t.reshape(-1, width)
