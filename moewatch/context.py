"""The root module's hooks: the padding mask of the call in flight, and the forward boundary.

A pre-hook on the root module hands the call's ``attention_mask`` (and the decoder's, for
encoder-decoder models) to the hot path and tells it a forward began; a post-hook tells it the
forward ended (windows are cut only there). Both go through the ``moewatch::forward_begin`` /
``forward_end`` ops, whose implementations keep the mask per thread at run time, where the gate
ops read it: several threads may run forwards on one model at once.

``torch.compile`` runs the hooks of the module it compiles outside the compiled frame; these
hooks are then skipped by Dynamo (run as plain Python, no extra graph). Where the monitored
model is called inside a bigger compiled module, Dynamo traces them into that graph instead:
the code below is traceable (no thread-local, no lock, no branch on a tensor's value).
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn


MASK_KEYS = ("attention_mask", "decoder_attention_mask")
# Where a transformers model takes its token rows when it has no mask: [B, L] ids or [B, L, H] embeddings.
INPUT_KEYS = ("input_ids", "inputs_embeds")


class MaskTracker:
    """Root-module hooks: the padding masks of the call and the forward boundary, to the hot path."""

    def __init__(self, root: nn.Module, real_tokens: Optional[Callable[[tuple, dict], Optional[torch.Tensor]]] = None,
                 requests: Optional[Callable[[], object]] = None):
        self.banks = None  # set by the monitor: its hot path (moewatch.hotpath.banks.Banks)
        # A serving engine's model has no attention_mask: the engine says which of the call's
        # token rows are real (moewatch.engines), as a [1, T] mask read at run time, or None;
        # and which requests the call's tokens belong to (RequestTokens), where it knows.
        self._real_tokens = real_tokens
        self._requests = requests
        forward = getattr(root, "forward", None)
        self._positions: Dict[str, int] = {}
        try:
            params = list(inspect.signature(forward).parameters)
            for key in MASK_KEYS + INPUT_KEYS:
                if key in params:
                    self._positions[key] = params.index(key)
        except (TypeError, ValueError):
            pass

    def _mask(self, key: str, args, kwargs) -> Optional[torch.Tensor]:
        mask = kwargs.get(key)
        pos = self._positions.get(key)
        if mask is None and pos is not None and pos < len(args):
            mask = args[pos]
        return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _rows(self, mask, args, kwargs) -> Optional[Tuple[int, int, bool]]:
        """(B, L, continued): the call's batch rows, their (padded) length, and whether they
        continue the rows of this thread's previous forward (a decode step on a cache). A batch
        row of a transformers model is one request, and tokens of one request route alike: the
        detector weighs a window's evidence by its requests (moewatch.detector.pooling). From
        shapes only, so no tensor is read."""
        for key in INPUT_KEYS:
            rows = kwargs.get(key)
            pos = self._positions.get(key)
            if rows is None and pos is not None and pos < len(args):
                rows = args[pos]
            if isinstance(rows, torch.Tensor) and rows.dim() == (2 if key == "input_ids" else 3):
                batch, length = rows.shape[0], rows.shape[1]  # ints; symbolic when traced: no int()
                # a decode step: a mask longer than the input (it spans the cached tokens), or one
                # new token per row on a cache (generate() passes no all-ones mask)
                continued = ((mask is not None and mask.shape[0] == batch and mask.shape[1] > length)
                             or (length == 1 and kwargs.get("past_key_values") is not None))
                return batch, length, continued
        return (mask.shape[0], mask.shape[1], False) if mask is not None else None

    def pre_hook(self, module, args, kwargs):
        banks = self.banks
        if banks is None:
            return None
        if self._real_tokens is not None:
            mask, decoder_mask = self._real_tokens(args, kwargs), None
        else:
            mask, decoder_mask = self._mask(MASK_KEYS[0], args, kwargs), self._mask(MASK_KEYS[1], args, kwargs)
        if torch.compiler.is_compiling():  # inlined into a bigger compiled graph: one opaque op
            rows = None if self._real_tokens is not None else self._rows(mask, args, kwargs)
            rows = None if rows is None else [rows[0], rows[1], int(rows[2])]
            torch.ops.moewatch.forward_begin(mask, decoder_mask, banks.ticks, banks.bank_id, rows)
        else:
            # an engine's flat batch holds many requests in one row: its shape says nothing of
            # them, the engine's scheduler may
            if self._real_tokens is None:
                rows = self._rows(mask, args, kwargs)
            else:
                rows = self._requests() if self._requests is not None else None
            banks.begin(mask, decoder_mask, rows)
        return None

    def post_hook(self, module, args, kwargs, output):
        banks = self.banks
        if banks is None:
            return None
        if torch.compiler.is_compiling():
            torch.ops.moewatch.forward_end(banks.ticks, banks.bank_id)
        else:
            banks.end()
        return None


def skip_top_level_frames(*functions) -> None:
    """Never compile these functions, nor anything they call, as frames of their own (they still
    trace when inlined).

    Dynamo compiles a module's hooks, and what they call, as frames of their own when it
    compiles the module: tiny graphs per forward, each with its own guards, and under
    ``fullgraph=True`` an error for any of them it cannot trace. Skipped recursively, the root
    hooks and the boundary code they call run as plain Python there.
    """
    frames = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    strategy, action = (getattr(frames, name, None) for name in ("FrameExecStrategy", "FrameAction"))
    set_strategy = getattr(frames, "set_code_exec_strategy", None)
    for fn in functions:
        if None not in (strategy, action, set_strategy):  # the frame and every frame it calls
            set_strategy(fn.__code__, strategy(action.SKIP, action.SKIP))
        elif getattr(frames, "skip_code", None) is not None:  # an older torch: this frame only
            frames.skip_code(fn.__code__)
        # older still: they compile as small graphs of their own, still correct


skip_top_level_frames(MaskTracker.pre_hook, MaskTracker.post_hook, MaskTracker._mask, MaskTracker._rows)
