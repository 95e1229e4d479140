"""Shared pieces of the fault suite: bit-level output checks, reference routing counts taken
from the model's own router outputs, the exported metrics of a monitor, and a small MoE whose
gate modules can have any name (quotes, backslashes, newlines) or return anything."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import numpy as np
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from moewatch.export.prometheus import MonitorCollector
from moewatch.taps import tapped

_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
                   torch.float64: torch.int64}


def assert_bit_identical(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape and bits (NaN payloads included): stricter than torch.equal, and NaN-safe."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, (got.dtype, got.shape, expected.shape)
    as_int = _SAME_WIDTH_INT[got.dtype]
    assert torch.equal(got.contiguous().view(as_int), expected.contiguous().view(as_int)), "outputs differ in bits"


def forward(model: nn.Module, *args, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(*args, **kwargs)
    return out.logits if hasattr(out, "logits") else out


class RouterRecord(dict):
    """{gate: int64 [E] experts chosen}, plus ``.nonfinite`` {gate: NaN/Inf logits seen}."""

    def __init__(self):
        super().__init__()
        self.nonfinite: Dict[str, int] = {}


@contextlib.contextmanager
def router_counts(model: nn.Module, suffix: str = "mlp.gate") -> Iterator[RouterRecord]:
    """Count the experts the model's own routers chose (their returned top-k indices), per gate.

    The reference the monitor's counts are checked against; works for routers that return
    ``(logits, weights, indices)`` (Mixtral). Unpadded batches only.
    """
    counts = RouterRecord()
    handles = []
    for name, module in model.named_modules():
        if not name.endswith(suffix):
            continue
        experts = module.weight.shape[0]
        counts[name] = np.zeros(experts, dtype=np.int64)
        counts.nonfinite[name] = 0

        def hook(mod, args, output, _name=name, _experts=experts):
            indices = output[2].reshape(-1).cpu().numpy()
            counts[_name] += np.bincount(indices, minlength=_experts)
            counts.nonfinite[_name] += int((~torch.isfinite(output[0])).sum())

        handles.append(module.register_forward_hook(hook))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def exported(mon, name: str, **labels) -> Optional[float]:
    """One sample of the monitor's Prometheus exposition (a fresh registry each call)."""
    registry = CollectorRegistry()
    registry.register(MonitorCollector(mon))
    return registry.get_sample_value(name, {"model": mon.model_name, "rank": "0", **labels})


def no_hooks(model: nn.Module) -> bool:
    """True when no module of ``model`` carries a forward hook, a pre-hook or a tap."""
    return all(not m._forward_hooks and not m._forward_pre_hooks and not tapped(m) for m in model.modules())


class ToyMoE(nn.Module):
    """Gates in a ModuleDict (any names), each a Linear [H -> E]; top-k routing mixes E expert
    projections. ``forward(x [B, S, H]) -> [B, S, H]``. A gate listed in ``dict_gates`` returns
    ``{"logits": ...}`` instead of a tensor, which no adapter can read. ``skew=True``: every
    router sends all tokens to experts 0 and 1 (a collapse)."""

    def __init__(self, names=("g0", "g1"), hidden: int = 8, experts: int = 4, top_k: int = 2,
                 seed: int = 0, dict_gates=(), skew: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.top_k = top_k
        self.routers = nn.ModuleDict({n: (_DictGate(hidden, experts) if n in dict_gates
                                          else nn.Linear(hidden, experts, bias=skew)) for n in names})
        if skew:
            with torch.no_grad():
                for router in self.routers.values():
                    router.weight.mul_(0.01)
                    router.bias.copy_(torch.tensor([9.0, 9.0] + [-9.0] * (experts - 2)))
        self.experts = nn.ParameterDict({f"e{i}": nn.Parameter(torch.randn(experts, hidden, hidden) * 0.3)
                                         for i in range(len(names))})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, router in enumerate(self.routers.values()):
            logits = router(x)
            if isinstance(logits, dict):
                logits = logits["logits"]
            weights, chosen = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)  # [B, S, k]
            outs = torch.einsum("bsh,ehg->bseg", x, self.experts[f"e{i}"])  # [B, S, E, H]
            picked = torch.gather(outs, 2, chosen.unsqueeze(-1).expand(*chosen.shape, x.shape[-1]))
            x = x + (weights.unsqueeze(-1) * picked).sum(dim=2)
        return x


class _DictGate(nn.Linear):
    def __init__(self, hidden: int, experts: int):
        super().__init__(hidden, experts, bias=False)

    def forward(self, x):  # a gate whose output no adapter understands
        return {"logits": super().forward(x)}
