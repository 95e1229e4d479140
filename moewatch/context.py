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
import sys
from threading import get_ident
from typing import Callable, Collection, Dict, Optional, Tuple

import torch
from torch import nn

from .hooks import is_exporting, recomputing


MASK_KEYS = ("attention_mask", "decoder_attention_mask")
# Where a transformers model takes its token rows when it has no mask: [B, L] ids or [B, L, H] embeddings;
# an encoder-decoder model's decoding steps (generate() hands the encoder's output over) take the decoder's.
INPUT_KEYS = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds")
# The cumulative query lengths of the sequences packed in a batch's one row (flash attention's varlen form).
PACKED_KEY = "cu_seq_lens_q"


class MaskTracker:
    """Root-module hooks: the padding masks of the call and the forward boundary, to the hot path."""

    # Class-level defaults, so that a tracker built without __init__ (_unwatched_tracker, for a
    # copy of the model) has them too.
    banks = None  # set by the monitor: its hot path (moewatch.hotpath.banks.Banks)
    # the engine, where its steps mark the forwards themselves (Engine.drive_steps): on the
    # thread of a step under way (its ``stepping_thread``) these hooks do nothing
    steps = None

    def __reduce__(self):  # a copy of the model (deepcopy, pickling) gets hooks that do nothing
        return (_unwatched_tracker, ())

    def __init__(self, root: nn.Module, real_tokens: Optional[Callable[[tuple, dict], Optional[torch.Tensor]]] = None,
                 requests: Optional[Callable[[], object]] = None):
        # A serving engine's model has no attention_mask: the engine says which of the call's
        # token rows are real (moewatch.engines), as a [1, T] mask read at run time, or None;
        # and which requests the call's tokens belong to (RequestTokens), where it knows.
        self._real_tokens = real_tokens
        self._requests = requests
        # bool [1, 1] on the model's device, once a serving loop's warm-up paused the monitor
        # (moewatch.warmups): every root forward's padding mask is multiplied by it, 0 while paused
        self._armed: Optional[torch.Tensor] = None
        self._pauses = 0  # pauses not resumed yet (warm-ups under way)
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
        if isinstance(mask, dict):
            mask = _one_of(mask)
        if not isinstance(mask, torch.Tensor):
            return None
        if mask.dim() == 2:
            return mask
        return real_queries(mask) if mask.dim() in (3, 4) else None

    def pause(self, device: torch.device) -> None:
        """Count none of the root forwards' tokens from now until as many ``resume`` calls (a
        serving loop's warm-up: ``moewatch.warmups``), in the forwards run now and in the CUDA
        graphs captured now (whose replays read the flag). Called outside any graph capture."""
        self._pauses += 1
        if self._armed is None:
            self._armed = torch.zeros((1, 1), dtype=torch.bool, device=device)
        else:
            self._armed.fill_(False)

    def resume(self) -> None:
        self._pauses = max(self._pauses - 1, 0)
        if self._armed is not None and self._pauses == 0:
            self._armed.fill_(True)

    def _armed_mask(self, mask: Optional[torch.Tensor], args, kwargs) -> Optional[torch.Tensor]:
        """The padding mask times the pause flag; where the call has no mask, the flag over its
        token rows ([B, L], a copy: a view of the flag would change when it is set again)."""
        armed = self._armed
        if mask is not None:
            return mask * armed.to(mask.device)  # [B, L]
        _, rows = self._input_rows(args, kwargs)
        return None if rows is None else armed.to(rows.device).repeat(rows.shape[0], rows.shape[1])  # [B, L]

    def _input_rows(self, args, kwargs) -> Tuple[Optional[str], Optional[torch.Tensor]]:
        """(key, tensor) of the call's token rows: [B, L] ids or [B, L, H] embeddings (the first
        of ``INPUT_KEYS`` given); (None, None) where it has none."""
        for key in INPUT_KEYS:
            rows = kwargs.get(key)
            pos = self._positions.get(key)
            if rows is None and pos is not None and pos < len(args):
                rows = args[pos]
            if isinstance(rows, torch.Tensor) and rows.dim() == (2 if key.endswith("input_ids") else 3):
                return key, rows
        return None, None

    def _rows(self, mask, args, kwargs) -> Optional[Tuple[int, int, bool]]:
        """(B, L, continued): the call's batch rows, their (padded) length, and whether they
        continue the rows of this thread's previous forward (a decode step on a cache). A batch
        row of a transformers model is one request, and tokens of one request route alike: the
        detector weighs a window's evidence by its requests (moewatch.detector.pooling). From
        shapes only, so no tensor is read. None (not known) for a packed batch: one row holding
        many requests, whose bounds only its varlen attention's arguments carry (transformers'
        continuous batching, padding-free training)."""
        if kwargs.get(PACKED_KEY) is not None:
            return None
        key, rows = self._input_rows(args, kwargs)
        if rows is not None:
            batch, length = rows.shape[0], rows.shape[1]  # ints; symbolic when traced: no int()
            # a decode step: a mask longer than the input (it spans the cached tokens), or one
            # new token per row on a cache (generate() passes no all-ones mask), or decoder
            # rows given the encoder's output: they go on with the rows the encoder just ran
            cache = kwargs.get("past_key_values")
            continued = ((mask is not None and mask.shape[0] == batch and mask.shape[1] > length)
                         or (length == 1 and cache is not None)
                         or (key.startswith("decoder_") and kwargs.get("encoder_outputs") is not None)
                         or (cache is not None and _cache_holds_tokens(cache)))
            return batch, length, continued
        return (mask.shape[0], mask.shape[1], False) if mask is not None else None

    def pre_hook(self, module, args, kwargs):
        steps = self.steps
        if steps is not None and steps.stepping_thread == get_ident():  # the engine's step marks this forward
            return None
        banks = self.banks
        if banks is None or (not torch.compiler.is_compiling() and recomputing() != -1):
            return None  # (run again by activation checkpointing in a backward pass: counted once)
        if self._real_tokens is not None:
            mask, decoder_mask = self._real_tokens(args, kwargs), None
        else:
            mask, decoder_mask = self._mask(MASK_KEYS[0], args, kwargs), self._mask(MASK_KEYS[1], args, kwargs)
        if self._armed is not None:
            mask = self._armed_mask(mask, args, kwargs)
        if torch.compiler.is_compiling():  # inlined into a bigger compiled graph: one opaque op
            if is_exporting():
                return None
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
        steps = self.steps
        if steps is not None and steps.stepping_thread == get_ident():
            return None
        banks = self.banks
        if banks is None or (not torch.compiler.is_compiling() and recomputing() != -1):
            return None
        if torch.compiler.is_compiling():
            if is_exporting():
                return None
            torch.ops.moewatch.forward_end(banks.ticks, banks.bank_id)
        else:
            banks.end()
        return None


# The frames of a module's call (nn.Module.__call__ and what it calls): their ``self`` is the module.
_CALL_CODES = frozenset(getattr(nn.Module, name).__code__ for name in ("_wrapped_call_impl", "_call_impl")
                        if hasattr(getattr(nn.Module, name, None), "__code__"))


def call_running(modules: Collection[nn.Module]) -> bool:
    """Whether one of ``modules`` is being called on this thread (a frame of its call is on the
    stack). A gate called outside a monitored root forward while its root is running belongs
    to a forward that began before the monitor was attached: its root's pre-hook did not run.
    Walks the stack: for such calls only, never for a gate inside a monitored forward."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in _CALL_CODES and any(frame.f_locals.get("self") is m for m in modules):
            return True
        frame = frame.f_back
    return False


def _cache_holds_tokens(cache) -> bool:
    """Whether a forward's KV cache already holds tokens: its new rows then go on with the
    requests cached (several new tokens a row: assisted generation's candidates, prompt lookup,
    a prompt prefilled in chunks, a conversation's next turn). Eager calls only: transformers'
    caches keep their length as host integers (a shape, a counter), so asking reads no tensor;
    traced, the answer would be a guard on the cache's length (a recompile per length)."""
    if torch.compiler.is_compiling():
        return False
    seq_length = getattr(cache, "get_seq_length", None)
    if seq_length is None:
        return False
    try:
        length = seq_length()
    except Exception:  # a cache of another library's making: not known, as before
        return False
    return isinstance(length, int) and length > 0


def _unwatched_tracker() -> MaskTracker:
    """A tracker with no hot path, whose hooks return at once (see ``hooks.Unwatched``)."""
    return MaskTracker.__new__(MaskTracker)


def _one_of(masks: dict) -> Optional[torch.Tensor]:
    """The mask to read of a mask per attention kind (``generate()`` hands hybrid models one per
    kind of layer; each masks the same padding): a [B, L] padding mask where one is among them
    (linear attention's, a convolution's), else the full attention's, else any."""
    tensors = [m for m in masks.values() if isinstance(m, torch.Tensor)]
    for mask in tensors:
        if mask.dim() == 2:
            return mask
    full = masks.get("full_attention")
    return full if isinstance(full, torch.Tensor) else (tensors[0] if tensors else None)


def real_queries(mask: torch.Tensor) -> torch.Tensor:
    """[B, Q] bool: which query tokens of an attention mask [B, Q, KV] or [B, H, Q, KV] are real.

    ``generate()`` with a static cache, transformers' continuous batching, and callers with
    masks of their own hand the model such a mask instead of the [B, L] padding mask: bool or
    int (nonzero: attend) or additive float (0 or a bias: attend; very negative or -inf:
    masked). Padding is masked along the key axis. A square mask (keys = the queries, no cache)
    says it exactly: a real query may attend to its own position, on the diagonal, and padding
    may not. On a wider key axis (cached tokens, a static cache's free slots, the keys of packed
    sequences) a query's own position is not known from the mask; a query that may attend to
    no key at all is padding (left padding, a padded slot of a packed batch), and any other is
    counted as real: a real token never goes uncounted. Tensor ops only, no branch on a value:
    traceable, and no host sync.
    """
    if mask.dim() == 4:
        mask = mask[:, 0]  # [B, Q, KV]: padding masks every head alike
    # reduced before it is compared: a long context's mask is large, and no copy of it is made
    if mask.shape[1] == mask.shape[2]:
        picked = mask.diagonal(dim1=1, dim2=2)  # [B, Q] a view
    elif mask.dtype == torch.bool:
        return mask.any(dim=2)  # [B, Q]
    else:
        picked = mask.amax(dim=2)  # [B, Q] the most a query may attend
    if picked.is_floating_point():
        return picked > torch.finfo(picked.dtype).min / 2  # additive: -inf or the dtype's minimum masks
    return picked != 0


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


skip_top_level_frames(MaskTracker.pre_hook, MaskTracker.post_hook, MaskTracker._mask, MaskTracker._rows, _one_of,
                      real_queries)
