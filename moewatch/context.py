"""Padding masks of the model call in flight, per thread.

A pre-hook on the root module stores the call's ``attention_mask`` (and the decoder's, for
encoder-decoder models); gate hooks turn it into per-token weights. Thread-local, because
several threads may run forwards on one model at once.
"""
from __future__ import annotations

import inspect
import threading
from typing import Dict, Optional

import torch
from torch import nn

MASK_KEYS = ("attention_mask", "decoder_attention_mask")


class CallContext(threading.local):
    def __init__(self) -> None:
        self.masks: Dict[str, torch.Tensor] = {}
        self.cache: Dict[tuple, Optional[torch.Tensor]] = {}
        self.depth = 0


class MaskTracker:
    """Root-module hooks that expose the padding mask of the current call to the gate hooks."""

    def __init__(self, root: nn.Module):
        self.local = CallContext()
        forward = getattr(root, "forward", None)
        self._positions: Dict[str, int] = {}
        try:
            params = list(inspect.signature(forward).parameters)
            for key in MASK_KEYS:
                if key in params:
                    self._positions[key] = params.index(key)
        except (TypeError, ValueError):
            pass

    def pre_hook(self, module, args, kwargs):
        ctx = self.local
        ctx.depth += 1
        if ctx.depth == 1:
            masks = {}
            for key in MASK_KEYS:
                mask = kwargs.get(key)
                pos = self._positions.get(key)
                if mask is None and pos is not None and pos < len(args):
                    mask = args[pos]
                if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                    masks[key] = mask
            ctx.masks = masks
            ctx.cache = {}
        return None

    def post_hook(self, module, args, kwargs, output):
        ctx = self.local
        ctx.depth = max(0, ctx.depth - 1)
        if ctx.depth == 0:
            ctx.masks = {}
            ctx.cache = {}
        return None

    def valid(self, key: str, num_tokens: int) -> Optional[torch.Tensor]:
        """[T] float weights (1 = real token, 0 = padding) for a gate that saw ``num_tokens``.

        The mask is [B, L] over past + current positions; the gate saw B*S tokens, the last S
        of each row. Returns None (every token counts) when no mask applies to this shape.
        """
        ctx = self.local
        mask = ctx.masks.get(key)
        if mask is None:
            return None
        cache_key = (key, num_tokens)
        if cache_key in ctx.cache:
            return ctx.cache[cache_key]
        batch, length = mask.shape
        weights = None
        if batch and num_tokens % batch == 0 and num_tokens // batch <= length:
            seq = num_tokens // batch
            weights = (mask[:, length - seq:] != 0).reshape(-1).to(torch.float32)  # [T]
        ctx.cache[cache_key] = weights
        return weights
