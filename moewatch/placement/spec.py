"""The ``expert_placement=`` option: the rank each expert of each gate is placed on.

Accepted values (``docs/api.md``):

- ``"contiguous:R"``: R ranks, expert e of a gate with E experts on rank ``e * R // E`` (E/R
  consecutive experts per rank when R divides E), as expert-parallel frameworks place them;
- a list of ints: each expert's rank, the same for every gate (its length must be the gates' E);
- a path to a placement file, ``{"ranks": R, "gates": {"<gate name>": [rank of expert 0, ...]}}``,
  as ``moewatch placement -o FILE`` writes it; every monitored gate must be in it.

Anything else is a :class:`PlacementError` (a ``ValueError``) that says what is wrong.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

PlacementOption = Union[None, str, "os.PathLike[str]", Sequence[int]]

# A placement file is small (E ints per gate): refuse anything larger than this before parsing.
MAX_FILE_BYTES = 64 * 2**20


class PlacementError(ValueError):
    """An ``expert_placement=`` value or placement file that cannot be used (the message says why)."""


@dataclass(frozen=True)
class Placement:
    """Each expert's rank per gate: ``ranks[gate name]`` int64 [E] in [0, num_ranks)."""

    num_ranks: int
    ranks: Dict[str, np.ndarray]
    source: str = ""  # what the user passed, for messages and dumps

    def to_json(self) -> dict:
        """The placement-file document: ``{"ranks": R, "gates": {name: [rank, ...]}}``."""
        return {"ranks": int(self.num_ranks), "gates": {g: [int(r) for r in v] for g, v in self.ranks.items()}}


def contiguous(num_experts: int, num_ranks: int) -> np.ndarray:
    """int64 [E]: expert e on rank e * R // E (E/R consecutive experts per rank when R divides E)."""
    return (np.arange(num_experts, dtype=np.int64) * num_ranks) // num_experts


def _int_list(values, where: str) -> np.ndarray:
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise PlacementError(f"{where} must be a list of ranks (non-negative integers), got {type(values).__name__}")
    if not values:
        raise PlacementError(f"{where} is empty; it needs one rank per expert")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0]
    if bad:
        raise PlacementError(f"{where} holds {bad[0]!r}; ranks are non-negative integers")
    return np.asarray(values, dtype=np.int64)


def _check_gate(name: str, ranks: np.ndarray, num_experts: int, num_ranks: int, where: str) -> np.ndarray:
    if ranks.shape[0] != num_experts:
        raise PlacementError(f"{where} gives {ranks.shape[0]} ranks, but gate {name!r} has {num_experts} experts "
                             "(one rank per expert)")
    if num_ranks > num_experts:
        raise PlacementError(f"{where}: {num_ranks} ranks for gate {name!r} with {num_experts} experts; "
                             "at most one rank per expert")
    if ranks.max() >= num_ranks:
        raise PlacementError(f"{where} places an expert of gate {name!r} on rank {int(ranks.max())}, "
                             f"but there are {num_ranks} ranks (0..{num_ranks - 1})")
    return ranks


def load_placement_file(path) -> dict:
    """The JSON document of a placement file, checked for shape (not yet against any gates)."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise PlacementError(f"placement file {path!r} is {size:,} bytes; a placement file is at most "
                                 f"{MAX_FILE_BYTES:,}")
        with open(path, "rb") as fh:
            doc = json.loads(fh.read())
    except PlacementError:
        raise
    except FileNotFoundError:
        raise PlacementError(f"placement file {path!r} does not exist (expert_placement= takes 'contiguous:R', "
                             "a list of ranks, or a file written by `moewatch placement -o`)") from None
    except (OSError, ValueError, RecursionError) as error:
        raise PlacementError(f"placement file {path!r} is not readable JSON: {error}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("gates"), dict):
        raise PlacementError(f"placement file {path!r} must hold {{\"ranks\": R, \"gates\": {{\"<gate>\": [rank of "
                             "expert 0, ...]}}}}")
    num_ranks = doc.get("ranks")
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
        raise PlacementError(f"placement file {path!r}: \"ranks\" must be a positive integer, got {num_ranks!r}")
    return doc


def _parse_contiguous(text: str) -> int:
    _, _, count = text.partition(":")
    try:
        num_ranks = int(count)
    except ValueError:
        num_ranks = 0
    if num_ranks < 1 or str(num_ranks) != count.strip():
        raise PlacementError(f"expert_placement={text!r}: write 'contiguous:R' with R a positive number of ranks, "
                             "e.g. 'contiguous:4'")
    return num_ranks


def check_option(value) -> None:
    """The checks that need no gates (``Options.validate``); :func:`resolve_placement` does the rest."""
    if value is None:
        return
    if isinstance(value, str) and value.startswith("contiguous"):
        _parse_contiguous(value)
    elif isinstance(value, (str, os.PathLike)):
        return  # a file: read at attach
    elif isinstance(value, (list, tuple)):
        _int_list(list(value), "expert_placement")
    else:
        raise PlacementError(f"expert_placement={value!r} must be 'contiguous:R', a list of ranks (one per expert), "
                             "or the path of a placement file")


def resolve_placement(value: PlacementOption, gates: Sequence) -> Optional[Placement]:
    """The placement of ``gates`` (objects with ``name`` and ``num_experts``) from the option's value."""
    if value is None:
        return None
    check_option(value)
    ranks: Dict[str, np.ndarray] = {}
    if isinstance(value, str) and value.startswith("contiguous"):
        num_ranks = _parse_contiguous(value)
        for gate in gates:
            if num_ranks > gate.num_experts:
                raise PlacementError(f"expert_placement={value!r}: gate {gate.name!r} has {gate.num_experts} experts, "
                                     f"fewer than {num_ranks} ranks")
            ranks[gate.name] = contiguous(gate.num_experts, num_ranks)
        return Placement(num_ranks, ranks, value)
    if isinstance(value, (list, tuple)):
        vector = _int_list(list(value), "expert_placement")
        num_ranks = int(vector.max()) + 1
        for gate in gates:
            ranks[gate.name] = _check_gate(gate.name, vector.copy(), gate.num_experts, num_ranks, "expert_placement")
        return Placement(num_ranks, ranks, "list")
    path = os.fspath(value)
    doc = load_placement_file(path)
    num_ranks = int(doc["ranks"])
    missing: List[str] = [g.name for g in gates if g.name not in doc["gates"]]
    if missing:
        raise PlacementError(f"placement file {path!r} has no placement for gate(s) {missing[:3]}"
                             f"{' and more' if len(missing) > 3 else ''}; it places {sorted(doc['gates'])[:3]}")
    for gate in gates:
        where = f"placement file {path!r}, gate {gate.name!r}"
        ranks[gate.name] = _check_gate(gate.name, _int_list(doc["gates"][gate.name], where), gate.num_experts,
                                       num_ranks, where)
    return Placement(num_ranks, ranks, path)
