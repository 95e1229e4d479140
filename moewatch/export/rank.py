"""Which process of a distributed job this is: the ``rank`` label and the local port offset.

moewatch never runs a collective of its own (monitoring must not be able to deadlock a job): it
only reads what ``torch.distributed`` already knows, or the launcher's environment variables.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ProcessRank:
    rank: int  # global rank: the `rank` label
    local_rank: int  # rank on this host: the offset added to the base Prometheus port


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else None
    except ValueError:
        return None


def process_rank(options=None) -> ProcessRank:
    """The rank from the ``rank=`` option, else ``torch.distributed``, else RANK / LOCAL_RANK, else 0."""
    rank = getattr(options, "rank", None)
    local = _env_int("LOCAL_RANK")
    if rank is None:
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                rank = dist.get_rank()
        except Exception:  # a broken process group must not break monitoring
            rank = None
    if rank is None:
        rank = _env_int("RANK")
    if rank is None:
        rank = local if local is not None else 0
    return ProcessRank(rank=int(rank), local_rank=int(local) if local is not None else 0)
