"""Serving engines: where the model lives decides how moewatch gets in.

A transformers model is attached with :func:`moewatch.attach` and its gates are found by their
router classes. A model run by a serving engine (vLLM; SGLang would be one more module here)
is different in three ways, and an :class:`~moewatch.engines.base.Engine` answers each:

- **gates**: the engine's own MoE layer classes, read for E, k, scoring, grouping and bias,
  and the engine's own routing decision, taken from its capture seam (``Engine.gates``);
- **real tokens**: engines pad batches to captured sizes; the engine says which rows of a
  forward are real (``Engine.real_tokens``, read at run time by the root forward's hook);
- **start-up**: the engine's plugin seam attaches after the model loads and before the engine
  compiles or captures graphs, configured from ``MOEWATCH_<OPTION>`` variables
  (:mod:`moewatch.engines.env`; vLLM: :mod:`moewatch.engines.vllm_plugin`).

:func:`engine_for` picks the engine that runs a model, without importing any engine whose
classes the model does not use.
"""
from __future__ import annotations

from typing import Callable, List, Optional

from torch import nn

from .base import Engine

# claim(model) -> Engine or None; each engine module registers one (cheap: class names only).
_CLAIMS: List[Callable[[nn.Module], Optional[Engine]]] = []


def register_engine(claim: Callable[[nn.Module], Optional[Engine]]) -> None:
    """Add an engine: ``claim(model)`` returns its :class:`Engine` for models it runs, else None."""
    if claim not in _CLAIMS:
        _CLAIMS.append(claim)


def engine_for(model: nn.Module) -> Optional[Engine]:
    """The serving engine whose layers ``model`` is built from, or None (a plain PyTorch model)."""
    for claim in _CLAIMS:
        engine = claim(model)
        if engine is not None:
            return engine
    return None


def _claim_vllm(model: nn.Module) -> Optional[Engine]:
    from .vllm_detect import runs_on_vllm

    if not runs_on_vllm(model):
        return None
    from .vllm import engine_of

    return engine_of(model)


register_engine(_claim_vllm)

__all__ = ["Engine", "engine_for", "register_engine"]
