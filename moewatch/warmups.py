"""A serving loop's warm-up is not traffic: transformers' continuous batching.

``generate_batch()`` and ``transformers serve`` (continuous batching) warm the model up before
the first request where they compile it or capture CUDA graphs (``warmup=True``, the default):
dummy batches of the largest sizes, every token the same id, run through the model. Counted,
they would fill the first window with tokens that all route alike: a window that looks
collapsed, before any request came.

At attach, the warm-up (``ModelRunner.warmup``, or the batch processor's where an older
transformers has no model runner) is wrapped once per process. While it runs, the monitors of
the model it warms up count nothing (``MaskTracker.pause``): the root forward's padding mask is
multiplied by a device flag that the wrapper sets to 0, then back to 1. Nothing is switched off
in Python alone, because a CUDA graph captured during the warm-up must count its replays: it
captures the multiplication, which reads the flag at every replay. The wrapper sets the flag
outside any capture, on the current stream: no host sync.
"""
from __future__ import annotations

import functools
import sys
import threading
from typing import Callable, List, Optional, Tuple

from torch import nn

# (module, class) holding the warm-up, newest first: transformers 5.x moved it into a model runner
_WARMUPS: Tuple[Tuple[str, str], ...] = (
    ("transformers.generation.continuous_batching.model_runner", "ModelRunner"),
    ("transformers.generation.continuous_batching.continuous_api", "ContinuousBatchProcessor"),
)
_WRAPPED = "__moewatch_wrapped__"
_INSTALL_LOCK = threading.Lock()


def watch_warmups(monitors_of: Callable[[nn.Module], List[object]]) -> None:
    """Wrap transformers' continuous-batching warm-up (once per process; where its module is
    imported). ``monitors_of(model)``: the attached monitors watching ``model``."""
    with _INSTALL_LOCK:
        for module_name, class_name in _WARMUPS:
            owner = _class(module_name, class_name)
            warmup = getattr(owner, "warmup", None) if owner is not None else None
            if warmup is None:
                continue
            if not getattr(warmup, _WRAPPED, False):
                owner.warmup = _paused_during(warmup, monitors_of)
            return


def _class(module_name: str, class_name: str) -> Optional[type]:
    """The class where its module is imported already: a transformers model's generation code
    imports it with the model; importing it here would cost attach seconds elsewhere (vLLM)."""
    module = sys.modules.get(module_name)
    return getattr(module, class_name, None) if module is not None else None


def _paused_during(warmup: Callable, monitors_of: Callable[[nn.Module], List[object]]) -> Callable:
    @functools.wraps(warmup)
    def paused_warmup(self, model, *args, **kwargs):
        monitors = monitors_of(model) if isinstance(model, nn.Module) else []
        for monitor in monitors:
            monitor._pause()
        try:
            return warmup(self, model, *args, **kwargs)
        finally:
            for monitor in monitors:
                monitor._resume()

    setattr(paused_warmup, _WRAPPED, True)
    return paused_warmup
