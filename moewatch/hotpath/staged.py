"""The CPU backend: the forward's thread stages each gate call, the reader reduces them in batches.

On a CPU every tensor op costs microseconds of dispatch, so computing the statistics of a gate
call where it happens (dozens of small ops) would cost the forward hundreds of microseconds.
Here the forward's thread only *records* the call: a reference to its tensors (eager mode,
where the version counter proves later that they were not modified in place), a copy in the
process's arena (eager calls of prefill size: ``arena`` says why they are not held), or a copy
(compiled code and inference tensors, whose buffers may be reused). The reader thread later
takes every recorded call of a window and computes the reference's statistics over all of them
together (``numpy_backend``: one pass for all the gates of a kind), so the per-op overhead is
paid once per window, not once per call.

Windows never split a forward: calls are kept per thread until the root module's forward ends
(``end``), then committed as one forward. The reader cuts a window at the first forward
boundary where the window holds ``window_tokens`` tokens, so the same traffic gives the same
windows on every run. Nothing here takes a lock on the forward's path: per-thread lists and
``deque.append`` (atomic) only.
"""
from __future__ import annotations

import threading
import time
from threading import get_ident
from collections import deque
from types import MappingProxyType
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..adapters.base import flat_tokens, width_error
from .layout import ASSIGNED, COUNT_ROWS, DROPPED, NUM_SCALARS, RANK_TOKENS, TOKENS
from . import numba_backend, numpy_backend
from . import arena as arena_module
from .gathered import Locate, own_decisions
from .numpy_backend import as_array, as_tensor, concat, concat_experts
from .reference import GateSums, mask_tail, mask_weights
from .requests import HostRequestRuns, RequestTokens

# Staged bytes across all threads above which the forward's thread reduces a call itself
# (bounded memory when the reader falls behind, and big prefill calls need no staging).
MAX_STAGED_BYTES = 256 * 2**20
# The reader's polls leave whole forwards unreduced until a window cut, a flush or a read of
# the accumulators needs them, or this many calls wait (a batched reduction costs about the same
# for 4 calls as for 400: reducing every poll cost a decode-bound engine ~4% of a core), or their
# bytes pass half the staging bound (the forward's thread must not be left to reduce them).
HOLD_CALLS = 1024
# The reader looks at the committed forwards (counts their tokens, cuts the windows they fill)
# at most every LOOK_SECONDS, or sooner when LOOK_FORWARDS forwards or a quarter of the staging
# bound wait (the forward that reaches either wakes it: ``on_due``). A wake-up of the reader runs
# on caches the model's forward has just evicted: ~0.1 ms of CPU for a poll that finds nothing,
# 0.3-0.5 ms for a look, whatever it finds (2-core machine, Mixtral-shaped); at a slow shape
# (prefill, a second a forward) looking every 2 s cost a quarter of the reader's time. A window
# is still cut at the forward where it fills (its time is that forward's); it is published up to
# LOOK_SECONDS later (windows that age out, at window_seconds, are taken when they do).
LOOK_SECONDS = 5.0
LOOK_FORWARDS = 256
# Eager calls of at least this many tokens (prefill sizes) are copied into the staging arena and
# their outputs let go, rather than held until the reader reduces them (see ``arena``: held
# outputs cost a prefill forward thousands of page faults under glibc's malloc). A copy costs
# the forward's thread a few microseconds, which decode-sized calls are spared.
ARENA_MIN_TOKENS = 256


# The masks of a root forward without padding masks, and of no forward: one read-only mapping,
# not a dict made at every forward.
NO_MASKS: Mapping[str, torch.Tensor] = MappingProxyType({})


class GateParams:
    """What the reduction needs to know of one gate (host constants)."""

    __slots__ = ("num_experts", "top_k", "scoring", "capacity_factor", "name", "mask_key")

    def __init__(self, name: str, num_experts: int, top_k: int, scoring: int, capacity_factor: float,
                 mask_key: str = "attention_mask"):
        self.mask_key = mask_key
        self.name = name
        self.num_experts = num_experts
        self.top_k = top_k
        self.scoring = scoring
        self.capacity_factor = capacity_factor


class Call:
    """One staged gate call: its tensors (or arena copies), and their version counters when held
    by reference."""

    __slots__ = ("row", "logits", "indices", "probs", "dropped", "valid", "mask", "positions", "grid",
                 "versions", "reduced", "nbytes", "in_arena", "copies")

    def __init__(self, row: int, grid: int, tensors, versions: Optional[tuple], nbytes: int, reduced=None,
                 in_arena: bool = False):
        self.row = row
        # logits, indices (and the mask, where copied) are numpy copies in the bank's arena, given
        # back once reduced
        self.in_arena = in_arena
        self.copies = None  # with in_arena: the arena's copies the reader's views read (given back as they are)
        self.grid = grid
        (self.logits, self.indices, self.probs, self.dropped, self.valid, self.mask,
         self.positions) = tensors
        self.versions = versions
        self.nbytes = nbytes
        self.reduced = reduced

    def tensors(self):
        return (self.logits, self.indices, self.probs, self.dropped, self.valid, self.mask, self.positions)


_NO_TENSORS = (None,) * 7


def _output_versions(output) -> Optional[tuple]:
    """Version counters of a gate output's tensors (a tensor, or a tuple of them), or None when
    it cannot be kept as it is (an inference tensor, a member that is not a tensor, another kind
    of output): the caller then extracts it at once."""
    try:
        if type(output) is tuple:  # (stage_output takes a 3-tuple's inline, on the forward's thread)
            return tuple([t._version for t in output])
        return (output._version,) if isinstance(output, torch.Tensor) else None
    except (RuntimeError, AttributeError):  # an inference tensor (no version counter), or a non-tensor
        return None


def _versions(tensors) -> Optional[tuple]:
    """Version counters of the tensors, or None when one of them has none (inference tensors)."""
    try:
        return tuple([t._version for t in tensors if t is not None])
    except RuntimeError:  # an inference tensor: no version counter
        return None


class ThreadState(threading.local):
    def __init__(self) -> None:
        self.depth = 0
        self.pending: List[Call] = []
        self.masks: Mapping[str, torch.Tensor] = NO_MASKS  # the padding masks of the root forward, by key
        # the root forward's token rows: (B, L, continued), or the RequestTokens an engine named
        self.rows: Optional[Tuple[int, int, bool]] = None
        # no root forward of this thread began before the monitor was attached (see
        # started_before_attach): set at the first root hook, or the first gate call outside a
        # forward found not to be inside one
        self.settled = False


def started_before_attach(state, root_running: Optional[Callable[[], bool]]) -> bool:
    """For a gate call outside a monitored root forward (``state``: its thread's, with
    ``settled``): whether it belongs to a root forward that began before the monitor was attached
    (``root_running()``: a monitored root module is running on this thread). Such a call is not
    counted: counting it would count that forward at some of its gates and not at the others.
    Both banks ask it."""
    if state.settled:  # asked once a thread, and while such a forward goes on
        return False
    if root_running is None or not root_running():
        state.settled = True  # not inside a root call now: any later one began after attach
        return False
    return True


class StagedBank:
    """Host accumulators of the gates on the CPU, fed by staged calls (see the module docstring)."""

    def __init__(self, gates: Sequence[GateParams], errors, sampler_of: Callable[[int], object] = None,
                 token: Optional[torch.Tensor] = None):
        self.gates = list(gates)
        num_gates = len(self.gates)
        max_experts = max(g.num_experts for g in self.gates)
        self.device = torch.device("cpu")
        self.sums = torch.zeros(num_gates, NUM_SCALARS + max_experts, dtype=torch.float64)
        self.counts = torch.zeros(num_gates, COUNT_ROWS, max_experts, dtype=torch.int64)
        self.cosel = torch.zeros(num_gates, max_experts, max_experts, dtype=torch.int64)  # [G, E, E] upper
        self.ranks: List[Optional[torch.Tensor]] = [None] * num_gates  # per gate: int64 [E] or None
        self.absmax = torch.zeros(num_gates, dtype=torch.float64)  # since the last cut
        # numpy views of the accumulators: the reader adds into them (a numpy add costs ~1 us)
        self._sums_view, self._counts_view = self.sums.numpy(), self.counts.numpy()
        self._cosel_view, self._absmax_view = self.cosel.numpy(), self.absmax.numpy()
        # the stage op's order (see ops): the forward ops' ticks, where Banks gives them
        self.token = torch.zeros(1, dtype=torch.int64) if token is None else token  # [1] int64
        self.errors = errors
        self.sampler_of = sampler_of or (lambda row: None)
        self._thread = ThreadState()
        self._committed: deque = deque()  # (commit time, [Call], rows, thread) per whole forward
        self._staged_bytes = 0  # approximate: += and -= from several threads under the GIL
        self._drain = threading.Lock()  # one reducer at a time (reader, flush, counts)
        self._extract: List[Optional[Callable]] = [None] * num_gates  # per gate: output -> Routing
        # per gate: (logits, indices) positions in a tuple output where its extract only picks
        # members (``extract.picks``): the reader takes them without calling extract
        self._picks: List[Optional[tuple]] = [None] * num_gates
        self._widths = [g.num_experts for g in self.gates]
        self._mask_keys = [g.mask_key for g in self.gates]
        self._held: List[Call] = []  # calls of whole forwards taken but not reduced (take(hold=True))
        self._arena = arena_module.shared(MAX_STAGED_BYTES // 2)  # copies of prefill-sized calls: the process's
        self.arena_min_tokens = ARENA_MIN_TOKENS  # calls of fewer tokens are not copied into it
        self._window_tokens = 0.0  # tokens of the window being filled (max over gates)
        # the reader's compiled kernel is compiled (or loaded from numba's cache) here, at attach,
        # not by the reader beside a forward: that holds the interpreter lock for about 2 s
        numba_backend.available()
        self._window_gate_tokens = [0.0] * num_gates  # per gate: a list, no tensor op per call
        # the requests' tokens and tokens squared, summed since attach (Window.rows): floats, as
        # numpy's in-place adds cost the reader a microsecond a forward
        self._rows = [0.0, 0.0]
        # per forward thread: (B, tokens per row so far in this window) of the rows its decode
        # steps continue; a request's tokens count from 0 again in the next window
        self._row_runs: Dict[int, Tuple[int, float]] = {}
        self._request_runs = HostRequestRuns()  # the same, by request, where an engine names them
        self._next_look = time.time()  # from when a poll looks at the committed forwards (0.0: a device's)
        # called (on the forward's thread) when a poll is due before _next_look: the reader's wake-up
        self.on_due: Optional[Callable[[], None]] = None
        # () -> whether a monitored root module is running on this thread (set by the monitor):
        # a gate called outside a monitored forward while one is belongs to a forward that began
        # before the monitor was attached, and is not counted (its earlier gates were not)
        self.root_running: Optional[Callable[[], bool]] = None
        # where an engine gathers data-parallel ranks' tokens before routing, it places this
        # rank's rows among them (``gathered``); None: decisions and logits have the same rows
        self.locate_rows: Optional[Locate] = None
        # At most how many tokens a gate saw in the forwards committed since the last take (the
        # sum of their B x L rows), or None: unknown (an engine's forward, a gate outside one).
        # A look that cannot fill the window only delays its cut's publication, never moves the
        # cut: polls skip it (the window still ages out, and LOOK_FORWARDS still bounds the wait).
        self._waiting_bound: Optional[float] = None
        self._window_limit = 0.0  # the window_tokens of the last take

    def set_ranks(self, row: int, ranks: Optional[torch.Tensor]) -> None:
        """Place gate ``row``'s experts: int64 [E] rank of each expert (in [0, E)), or None."""
        self.ranks[row] = None if ranks is None else torch.as_tensor(ranks, dtype=torch.int64).clone()

    # -- the forward's thread ------------------------------------------------------------------
    def begin(self, masks: Optional[Dict[str, torch.Tensor]] = None,
              rows: Optional[Tuple[int, int, bool]] = None) -> None:
        """A root forward begins on this thread; ``masks``: its padding masks by key ([B, L] each);
        ``rows``: its token rows (B, L, continued), its engine's ``RequestTokens``, or None."""
        state = self._thread
        state.settled = True
        depth = state.depth = state.depth + 1
        if depth == 1:  # a nested forward keeps the outer one's masks
            state.masks = masks or NO_MASKS
            state.rows = rows

    def end(self, ticks=None) -> None:
        state = self._thread
        state.settled = True  # a root forward under way at attach has ended here
        if state.depth > 1:
            state.depth -= 1
        else:
            state.depth, state.masks = 0, NO_MASKS
            pending = state.pending
            if pending:
                committed = self._committed
                rows = state.rows
                committed.append((time.time(), pending, rows, get_ident()))
                state.pending = []
                bound = self._waiting_bound
                if bound is not None:  # a gate sees at most the forward's B x L tokens
                    self._waiting_bound = bound + rows[0] * rows[1] if type(rows) in (tuple, list) else None
                if (len(committed) == LOOK_FORWARDS or self._staged_bytes >= MAX_STAGED_BYTES // 4) \
                        and self.on_due is not None:
                    self.on_due()
            state.rows = None

    def set_extract(self, row: int, extract: Callable, width: int) -> None:
        """Gate ``row``'s outputs may be staged as they are (``stage_output``): ``extract`` reads them."""
        self._extract[row] = extract
        self._widths[row] = width
        self._picks[row] = getattr(extract, "picks", None)

    def stage_output(self, row: int, output) -> None:
        """Record one gate call by its output alone (eager, without grad): the reader extracts it.

        The output's tensors are held by reference and their version counters taken, as
        ``stage`` does; an output that cannot be held so (inference tensors, another kind of
        object) is extracted now and staged with copies.
        """
        # Every line here runs on every gate call of an eager CPU model: inline, locals only.
        try:
            if type(output) is tuple and len(output) == 3:  # (logits, weights, indices): most routers
                first, second, third = output
                versions = (first._version, second._version, third._version)
            else:
                versions = _output_versions(output)
                first = output[0] if type(output) is tuple else output  # the logits, as extract reads them
        except (RuntimeError, AttributeError):  # an inference tensor (no version counter), or a non-tensor
            versions = None
        if not versions:  # it cannot be kept as it is
            self._stage_extracted(row, output)
            return
        if first.shape[-1] != self._widths[row]:
            raise width_error(self.gates[row].name, first.shape[-1], self._widths[row])
        nbytes = first.nbytes
        if nbytes + self._staged_bytes > MAX_STAGED_BYTES:
            self._stage_extracted(row, output)  # reduced now (see stage)
            return
        state = self._thread
        if not state.depth and started_before_attach(state, self.root_running):
            return
        self._staged_bytes += nbytes
        mask = state.masks.get(self._mask_keys[row]) if state.depth else None  # [B, L] or None
        record = None
        if first.shape[0] >= self.arena_min_tokens and type(output) is tuple and self._picks[row] is not None:
            record = self._copied(row, output, mask, nbytes)  # a prefill-sized call: copied, not held
        if record is None:  # an output record (see _call)
            record = (row, output, versions, mask, nbytes)
        if state.depth:
            state.pending.append(record)
        else:  # a gate called outside a monitored root forward is a forward of its own, without a mask
            self._committed.append((time.time(), [record], None, None))
            self._waiting_bound = None  # its tokens are not bounded by a forward's rows

    def _copied(self, row: int, output: tuple, mask, nbytes: int) -> Optional[tuple]:
        """A staged call's fields with the (logits, indices) its extract picks out of ``output``
        copied into the arena (see ``arena``), or None where they cannot be (they stay held)."""
        picks = self._picks[row]
        try:
            logits = output[picks[0]]  # [T, E]
            indices = None if picks[1] is None else output[picks[1]]  # [T, k]
        except (TypeError, IndexError):
            return None
        if logits.dim() != 2 or (indices is not None and indices.dim() != 2):
            return None
        copies = self._arena_copies((logits, indices))
        if copies is None:
            return None
        return (row, 0, (copies[0], copies[1], None, None, None, mask, None), None, nbytes, None, True)

    def _arena_copies(self, tensors: tuple) -> Optional[tuple]:
        """Copies of the tensors (None members stay None) in the arena, or None where one cannot
        be made (the arena is full, a dtype numpy cannot read): nothing is kept then. The reader
        makes them numpy arrays (``_record_call``)."""
        arena, copies = self._arena, []
        for tensor in tensors:
            copy = None
            if tensor is not None:
                copy = arena.copy(tensor)
                if copy is None:
                    for made in copies:
                        arena.give(made)
                    return None
            copies.append(copy)
        return tuple(copies)

    def _extracted(self, row: int, output):
        """The Routing of a kept output of gate ``row``, its width checked (raises as the hook would)."""
        routing = self._extract[row](None, (), {}, output)
        if routing.logits.shape[-1] != self._widths[row]:
            raise width_error(self.gates[row].name, routing.logits.shape[-1], self._widths[row])
        return routing

    def _stage_extracted(self, row: int, output) -> None:
        routing = self._extracted(row, output)
        self.stage(row, routing.logits, routing.indices, routing.probs, routing.dropped, routing.valid,
                   routing.positions, routing.grid or 0, False)

    def _call(self, fields, count: bool = True) -> Optional[Call]:
        """The Call of a staged record: a Call's own fields, or an output record (row, output,
        versions, mask, nbytes) extracted here, on the reader's thread. None: it cannot be
        counted (with ``count``, the error is recorded and its bytes released)."""
        if len(fields) == 3:  # a plain record (stage_copy)
            row, logits, indices = fields
            return Call(row, 0, (logits, indices, None, None, None, None, None), None, logits.nbytes)
        if len(fields) != 5:
            return self._record_call(fields)
        row, output, versions, mask, nbytes = fields
        picks = self._picks[row]
        if picks is not None and type(output) is tuple:
            # The commonest record, inline (a reader's take runs this for every call it takes): an
            # unmodified tuple whose extract only picks (logits, indices) members, 2-D or flattened.
            try:
                if _output_versions(output) == versions:
                    logits = output[picks[0]]
                    width = logits.shape[-1]
                    if logits.dim() != 2:
                        logits = flat_tokens(logits, width)  # [T, E]
                    indices = None if picks[1] is None else output[picks[1]]
                    if indices is not None and indices.dim() != 2:
                        indices = flat_tokens(indices, indices.shape[-1])  # [T, k]
                    if width == self._widths[row]:
                        return Call(row, 0, (logits, indices, None, None, None, mask, None), None, nbytes)
            except Exception:  # malformed: the general path below says what is wrong
                pass
        error = _modified() if _output_versions(output) != versions else None
        if error is None:
            try:
                routing = self._extracted(row, output)
            except Exception as failure:
                error = failure
        if error is not None:
            if count:
                self._staged_bytes -= nbytes
                self.errors.record("hook", error, where=self.gates[row].name)
            return None
        if routing.valid is not None:
            mask = None
        tensors = (routing.logits, routing.indices, routing.probs, routing.dropped, routing.valid, mask,
                   routing.positions)
        # versions None: the output's own were checked just now, and nothing writes to it after
        return Call(row, routing.grid or 0, tensors, None, nbytes)

    def stage(self, row: int, logits, indices, probs, dropped, valid, positions, grid: int, copy: bool) -> None:
        """Record one gate call (the body of the ``moewatch::stage`` op on CPU tensors).

        ``copy``: the tensors' buffers may be reused after the call (compiled code): copy them.
        Eager callers pass False: the tensors are kept alive by reference instead, their version
        counters prove at reduction that they were not modified in place, and nothing is
        dispatched here (the padding mask is kept whole; the reduction reads the columns it needs).
        """
        state = self._thread
        if not state.depth and started_before_attach(state, self.root_running):
            return
        if self.locate_rows is not None:  # an engine that may gather ranks' tokens: [T_all, k] -> [T, k]
            indices = own_decisions(logits, indices, self.locate_rows)
        mask = None if valid is not None else state.masks.get(self._mask_keys[row])  # [B, L] or None
        tensors = (logits, indices, probs, dropped, valid, mask, positions)
        versions = None if copy else _versions(tensors)
        # logits (and probs) dominate; the small tensors are not worth counting on this path
        nbytes = logits.nbytes * (1 if probs is None else 2)
        # A call is a plain tuple here (a Call's fields, made into one by the reader): cheapest.
        if nbytes + self._staged_bytes > MAX_STAGED_BYTES:
            # Reduce now (a big call amortises the ops; bounded memory when the reader lags).
            call = (row, grid, _NO_TENSORS, None, 0, self._reduce_one(row, tensors, grid))
        else:
            in_arena = False
            if versions is None:  # buffers that may be reused or modified untracked: copy
                if mask is not None:  # only the columns this call's tokens sit at: [B, S]
                    mask = mask_tail(mask, logits.shape[0], positions, grid)
                copies = None
                if logits.shape[0] >= self.arena_min_tokens and probs is None and dropped is None and valid is None \
                        and positions is None:  # prefill size, the commonest call: into the arena
                    copies = self._arena_copies((logits, indices, mask))
                if copies is not None:
                    tensors, in_arena = (copies[0], copies[1], None, None, None, copies[2], None), True
                else:  # most calls carry logits and the router's indices alone: no loop over the seven
                    tensors = (logits.clone(), None if indices is None else indices.clone(),
                               None if probs is None else probs.clone(),
                               None if dropped is None else dropped.clone(),
                               None if valid is None else valid.clone(), None if mask is None else mask.clone(),
                               None if positions is None else positions.clone())
            call = (row, grid, tensors, versions, nbytes, None, in_arena)
            self._staged_bytes += nbytes
        if state.depth:
            state.pending.append(call)
        else:  # a gate called outside a monitored root forward is a forward of its own
            self._committed.append((time.time(), [call], None, None))
            self._waiting_bound = None  # its tokens are not bounded by a forward's rows

    def stage_copy(self, row: int, logits: torch.Tensor, indices: Optional[torch.Tensor]) -> None:
        """``stage(row, logits, indices, None, None, None, None, 0, copy=True)`` in fewer steps for
        the compiled op's commonest call: a decode-sized call (logits [T, E], the router's ids
        [T, k]) inside a root forward without padding (an engine's step); any other call goes
        to ``stage``. Its record is a plain one, ``(row, logits, indices)``, which the reader
        reduces many at a time without a Call each (``_plain_calls``)."""
        state = self._thread
        nbytes = logits.nbytes
        if (state.masks is not NO_MASKS or not state.depth or indices is None or self.locate_rows is not None
                or logits.shape[0] >= self.arena_min_tokens or nbytes + self._staged_bytes > MAX_STAGED_BYTES):
            self.stage(row, logits, indices, None, None, None, None, 0, True)
            return
        state.pending.append((row, logits.clone(), indices.clone()))  # a plain record (see _plain_calls)
        self._staged_bytes += nbytes

    def _record_call(self, fields: tuple) -> Call:
        """The Call of a staged call's own fields (6, or 7 with arena copies: their numpy views
        are made here, on the reader's thread)."""
        call = Call(*fields)
        if call.in_arena:  # the copies are tuples (an eager call's mask is the model's own tensor)
            call.copies = (call.logits, call.indices, call.mask)  # given back by slot: no view to trace back
            view = self._arena.view
            call.logits = view(call.logits)
            if type(call.indices) is tuple:
                call.indices = view(call.indices)
            if type(call.mask) is tuple:
                call.mask = view(call.mask)
        return call

    def waiting(self) -> List[Call]:
        """The calls of whole forwards staged and not reduced yet, oldest first (a look only:
        they stay staged)."""
        calls = [self._call(fields, count=False) for _, staged, _, _ in list(self._committed) for fields in staged]
        held = [self._call(call, count=False) if type(call) is tuple else call for call in self._held]
        return held + [call for call in calls if call is not None]

    # -- the reader ----------------------------------------------------------------------------
    def due(self, now: float) -> bool:
        """Whether a poll at ``now`` (time.time()) should take the committed forwards (see
        ``LOOK_SECONDS``); a few attribute reads: most polls end here."""
        waiting = len(self._committed)
        if waiting == 0:
            return False
        if waiting >= LOOK_FORWARDS or self._staged_bytes >= MAX_STAGED_BYTES // 4:
            return True
        if now < self._next_look:
            return False
        bound = self._waiting_bound  # None: the forwards may fill the window
        return bound is None or self._window_tokens + bound >= self._window_limit

    def next_look(self) -> float:
        """When (time.time()) a poll next looks at the committed forwards, unless woken sooner."""
        return self._next_look

    def take(self, window_tokens: float, force: bool, on_cut: Callable, now: float = 0.0,
             idle: bool = True, hold: bool = False) -> None:
        """Reduce every committed forward into the accumulators, in order.

        ``on_cut(t, sums, counts, absmax)`` gets host copies of the accumulators at each forward
        boundary where the window reaches ``window_tokens`` tokens (``t``: that forward's end);
        with ``force``, also after the last committed forward when the window holds any token.
        ``hold`` (the reader's polls): forwards that no cut needs may stay unreduced (see
        ``HOLD_CALLS``); the next take reduces them first, in order.
        """
        with self._drain:
            self._next_look = (now or time.time()) + LOOK_SECONDS
            # before the forwards are taken: one committed meanwhile is counted again (an early look)
            self._waiting_bound, self._window_limit = 0.0, window_tokens
            segment, self._held = self._held, []
            last_time = None
            while self._committed:
                commit_time, staged, rows, thread = self._committed.popleft()
                # a plain record (3) stays as it is until its segment is reduced (_plain_calls);
                # a staged call's own fields (6, 7) make a Call at once; an output record (5) is extracted
                calls = [fields if len(fields) == 3 else self._call(fields) for fields in staged]
                if None in calls:  # records that cannot be counted (their errors are recorded)
                    calls = [call for call in calls if call is not None]
                if rows is not None and calls:
                    self._count_rows(rows, thread)
                last_time = commit_time
                segment.extend(calls)
                self._window_tokens = self._add_tokens(calls)
                if self._window_tokens >= window_tokens:
                    self._reduce(segment)
                    segment = []
                    self._cut(on_cut, commit_time)
            if hold and not force and len(segment) < HOLD_CALLS and self._staged_bytes < MAX_STAGED_BYTES // 2:
                self._held = segment
                return
            self._reduce(segment)
            if force and self._window_tokens > 0:
                self._cut(on_cut, last_time or time.time())

    def _count_rows(self, rows, thread: int) -> None:
        """Add one forward's token rows: B rows of L new tokens, each row one request. A decode
        step continues the rows of its thread's previous forward, so its rows grow (their squares
        by (n + L)**2 - n**2) instead of counting as B new requests. An engine's forward names
        its requests instead (``RequestTokens``)."""
        totals = self._rows
        if isinstance(rows, RequestTokens):
            tokens, squares = self._request_runs.add(rows)
        else:
            batch, length, continued = rows
            last = self._row_runs.get(thread)
            before = last[1] if continued and last is not None and last[0] == batch else 0.0
            after = before + length
            tokens, squares = batch * length, batch * (after * after - before * before)
            self._row_runs[thread] = (batch, after)
        totals[0] += tokens
        totals[1] += squares

    def _cut(self, on_cut, when: float) -> None:
        on_cut(when, self.sums.numpy().copy(), self.counts.numpy().copy(), self.absmax.numpy().copy(),
               np.array(self._rows))
        self._row_runs.clear()  # a request that goes on counts its tokens in the next window anew
        self._request_runs.cut()
        self.absmax.zero_()
        self._window_tokens = 0.0
        self._window_gate_tokens = [0.0] * len(self._window_gate_tokens)

    def _add_tokens(self, calls: List[Call]) -> float:
        """Count the traffic tokens of one forward's calls; returns the window's tokens so far."""
        per_gate = self._window_gate_tokens
        masks: Dict[tuple, object] = {}
        for call in calls:
            if type(call) is tuple:  # a plain record (row, logits, indices): no padding
                per_gate[call[0]] += call[1].shape[0]
                continue
            if call.mask is None and call.valid is None and call.reduced is None:  # no padding: T
                per_gate[call.row] += call.logits.shape[0]
                continue
            try:
                if call.reduced is not None:
                    tokens = float(call.reduced.scalars[TOKENS])
                else:
                    weights = self._weights(call, masks)
                    tokens = call.logits.shape[0] if weights is None else float(weights.sum())
                per_gate[call.row] += tokens
            except Exception:  # a malformed call: counted when it is reduced
                pass
        return max(per_gate, default=0.0)

    @staticmethod
    def _weights(call: Call, cache: Optional[dict] = None):
        """[T] traffic weights of a staged call (the padding mask, or the router's override)."""
        if call.valid is not None:
            return call.valid
        if call.mask is None:
            return None
        mask = as_tensor(call.mask)  # calls of one forward share the mask's memory (eager): reduce it once
        key = (mask.data_ptr(), tuple(mask.shape), mask.stride(), call.logits.shape[0], id(call.positions),
               call.grid)
        if cache is not None and key in cache:
            return cache[key]
        weights = mask_weights(mask, call.logits.shape[0], call.positions, call.grid)
        if cache is not None:
            cache[key] = weights
        return weights

    def _reduce(self, calls: List[Call]) -> None:
        """Add the calls into the accumulators: one batched reduction per kind of gate (all the
        gates of most models: one pass for all of them), else per gate, else per call."""
        calls = self._plain_calls(calls)
        try:
            self._reduce_by_kind(calls)
        finally:
            self._give_back(calls)

    def _reduce_by_kind(self, calls: List[Call]) -> None:
        by_row: Dict[int, List[Call]] = {}
        for call in calls:
            if call.reduced is not None:
                self._add(call.row, call.reduced)
            elif call.versions is None or self._unchanged(call):
                by_row.setdefault(call.row, []).append(call)
        for rows in self._kinds(by_row):
            merged = len(rows) > 1 and self._reduce_merged([(row, by_row[row]) for row in rows])
            for row in rows:
                group = by_row[row]
                if not merged:
                    self._reduce_row(row, group)
                self._staged_bytes -= sum([c.nbytes for c in group])
                sampler = self.sampler_of(row)
                if sampler is not None:
                    for call in group:
                        try:
                            sampler.record(as_tensor(call.logits), as_tensor(call.indices), call.probs,
                                           self._weights(call), call.positions)
                        except Exception as error:
                            self.errors.record("hook", error, where=self.gates[row].name)

    def _plain_calls(self, calls: list) -> List[Call]:
        """The calls with the plain records among them (``stage_copy``'s ``(row, logits,
        indices)``) made Calls: a gate's plain records one Call of them all, their tensors
        concatenated in one op each (a decode step's records are a few tokens each: a Call and
        a concatenation per record cost the reader more than their reduction). Where the
        gate's drops are counted per call (a capacity factor), its decisions are sampled per
        call (``sample_decisions``: a dump's rows name their call), or they do not concatenate
        (the bad one is then found and counted by the reduction), a Call each."""
        plain: Dict[int, list] = {}
        made = []
        for call in calls:
            if type(call) is tuple:
                plain.setdefault(call[0], []).append(call)
            else:
                made.append(call)
        if not plain:
            return calls
        for row, group in plain.items():
            merged = None
            if len(group) > 1 and not self.gates[row].capacity_factor > 0 and self.sampler_of(row) is None:
                try:
                    logits = torch.cat([record[1] for record in group])  # [sum T, E]
                    indices = torch.cat([record[2] for record in group])  # [sum T, k]
                    merged = Call(row, 0, (logits, indices, None, None, None, None, None), None,
                                  sum([record[1].nbytes for record in group]))
                except (RuntimeError, TypeError, ValueError):  # widths or dtypes that differ
                    merged = None
            if merged is not None:
                made.append(merged)
            else:
                made.extend([self._call(record) for record in group])
        return made

    def _give_back(self, calls: List[Call]) -> None:
        """Give the arena slots of reduced (or dropped) calls back for reuse."""
        arena = self._arena
        for call in calls:
            if call.in_arena:
                for copy in call.copies:  # set by _record_call, the only maker of arena Calls
                    arena.give(copy)
                call.logits = call.indices = call.mask = call.copies = None

    def _kinds(self, by_row: Dict[int, List[Call]]) -> List[List[int]]:
        """The rows with calls, grouped by what their reduction needs to know (same number of
        experts, top-k, scoring and capacity, no placement): each group can be one pass."""
        kinds: Dict[tuple, List[int]] = {}
        for row in by_row:
            gate = self.gates[row]
            key = (gate.num_experts, gate.top_k, gate.scoring, gate.capacity_factor,
                   row if self.ranks[row] is not None else None)
            kinds.setdefault(key, []).append(row)
        return list(kinds.values())

    def _reduce_merged(self, groups: List[Tuple[int, List[Call]]]) -> bool:
        """Reduce several gates' calls in one pass (``numpy_backend.segment_sums``); False where
        that fails (nothing was added: the caller reduces them gate by gate)."""
        try:
            calls = [call for _, group in groups for call in group]
            batch, lengths = self._batch(groups[0][0], calls)
            ends = np.cumsum(lengths)  # [calls]: tokens up to each call's end
            starts, first_call = [], 0  # each gate's first token
            for _, group in groups:
                starts.append(0 if first_call == 0 else int(ends[first_call - 1]))
                first_call += len(group)
            if int(ends[-1]) != batch["logits"].shape[1]:  # calls of several dimensions: gate by gate
                return False
            parts = numpy_backend.segment_sums(**batch, starts=starts)
        except Exception:
            return False
        for (row, _), part in zip(groups, parts):
            self._add(row, part)
        return True

    def _reduce_row(self, row: int, group: List[Call]) -> None:
        """One gate's calls in one pass; where that fails, call by call, so the bad ones are
        counted as errors and the others still count."""
        try:
            self._add(row, self._reduce_one(row, group[0].tensors(), group[0].grid) if len(group) == 1
                      else self._reduce_many(row, group))
        except Exception:
            for call in group:
                try:
                    self._add(row, self._reduce_one(row, call.tensors(), call.grid))
                except Exception as error:
                    self.errors.record("hook", error, where=self.gates[row].name)

    def _add(self, row: int, part: GateSums) -> None:
        """Add one gate's sums (numpy, from ``numpy_backend``) into its accumulators (see ``layout``)."""
        experts = part.prob_sum.shape[0]
        sums, counts = self._sums_view[row], self._counts_view[row]
        sums[:NUM_SCALARS] += part.scalars
        sums[NUM_SCALARS:NUM_SCALARS + experts] += part.prob_sum
        counts[ASSIGNED, :experts] += part.counts
        if part.drops is not None:
            counts[DROPPED, :experts] += part.drops
        if part.rank_tokens is not None:
            counts[RANK_TOKENS, :experts] += part.rank_tokens
        if part.cosel is not None:
            self._cosel_view[row, :experts, :experts] += part.cosel
        absmax = self._absmax_view
        absmax[row] = max(absmax[row], float(part.absmax))

    def _unchanged(self, call: Call) -> bool:
        if _versions(call.tensors()) == call.versions:
            return True
        self._staged_bytes -= call.nbytes
        self.errors.record("hook", _modified(), where=self.gates[call.row].name)
        return False

    def _reduce_one(self, row: int, tensors, grid: int) -> GateSums:
        logits, indices, probs, dropped, valid, mask, positions = tensors
        gate = self.gates[row]
        self._check_width(gate, logits)
        if valid is None:
            valid = mask_weights(as_tensor(mask), logits.shape[0], positions, grid)
        (part,) = numpy_backend.segment_sums(logits.reshape(-1, gate.num_experts), indices, valid, gate.scoring,
                                             gate.top_k, probs, dropped, gate.capacity_factor,
                                             ranks=self.ranks[row], coselect=True)
        return part

    def _reduce_many(self, row: int, group: List[Call]) -> GateSums:
        """One reduction of many calls of gate ``row``; raises where one of them is bad (the
        caller then reduces them one by one, so the bad ones are found and the others count)."""
        batch, _ = self._batch(row, group)
        (part,) = numpy_backend.segment_sums(**batch)
        return part

    def _batch(self, row: int, group: List[Call]) -> Tuple[dict, List[int]]:
        """The arguments of one reduction of the calls (of gate ``row``, or of gates of its kind):
        their tensors concatenated, padding weights and call numbers where needed; and each
        call's tokens."""
        gate = self.gates[row]
        # The reader runs this for every call of every window: a comprehension per column (about
        # half the time of one loop appending to each).
        logits = [call.logits for call in group]  # [T_i, E]
        indices = [call.indices for call in group]  # [T_i, k] or None
        probs = [call.probs for call in group]  # [T_i, E] or None
        dropped = [call.dropped for call in group]  # [T_i, k] or None
        lengths = [t.shape[0] for t in logits]
        # A batch mixes calls with and without the router's own indices/probs/drops only in
        # odd models; reduce those one by one rather than guess.
        if not (_all_or_none(indices) and _all_or_none(probs) and _all_or_none(dropped)):
            raise _Mixed()
        padded = any([call.valid is not None or call.mask is not None for call in group])  # some call has padding weights
        all_logits = concat_experts(logits)  # [E, sum T]: fails where the calls' widths differ
        if all_logits.shape[0] != gate.num_experts:
            self._check_width(gate, all_logits.T)
        valid = None  # [sum T] float64, or None when no call has padding
        if padded:
            masks: dict = {}
            weights = [self._weights(call, masks) for call in group]  # [T_i] or None (no padding)
            valid = np.concatenate([np.ones(n) if w is None else as_array(w, np.float64)
                                    for w, n in zip(weights, lengths)])
        call_ids = None  # [sum T] which call each token came from: only the would-be drops need it
        if gate.capacity_factor > 0:
            call_ids = np.repeat(np.arange(len(group)), lengths)

        def cat(column, dtype=np.float32):
            return None if column[0] is None else concat(column, dtype)
        return dict(logits=all_logits, indices=cat(indices, np.int64), valid=valid, scoring=gate.scoring,
                    top_k=gate.top_k, probs=cat(probs), dropped=cat(dropped, np.int64),
                    capacity_factor=gate.capacity_factor, call_ids=call_ids, num_calls=len(group),
                    ranks=self.ranks[row], coselect=True, expert_major=True), lengths

    @staticmethod
    def _check_width(gate: GateParams, logits) -> None:
        if len(logits.shape) < 1 or logits.shape[-1] != gate.num_experts:  # a tensor or an array
            raise ValueError(
                f"gate {gate.name!r} returned logits of width {logits.shape[-1] if len(logits.shape) else 0}, "
                f"but it was attached with num_experts={gate.num_experts}; pass the right num_experts= "
                "(or gates=) to moewatch.attach")

    def rows_total(self) -> np.ndarray:
        """float64 [2]: the token rows of the forwards reduced so far (``Window.rows``)."""
        return np.array(self._rows)

    def live(self):
        """Host copies (numpy) of the sums and counts (call after ``take``)."""
        with self._drain:
            return self.sums.numpy().copy(), self.counts.numpy().copy()

    def coselection(self):
        """Host copy (numpy int64 [G, E_max, E_max], upper triangle) of the co-selection counts of
        every forward reduced so far (call after ``take``)."""
        with self._drain:
            return self.cosel.numpy().copy()


def _all_or_none(column: list) -> bool:
    """Whether every member of ``column`` is None, or none is (by identity: ``in`` would compare
    tensors with ``==``)."""
    missing = [member is None for member in column]
    return all(missing) or not any(missing)


def _modified() -> RuntimeError:
    return RuntimeError("the gate's output was modified in place before moewatch read it; the call is not counted")


class _Mixed(Exception):
    """A batch whose calls do not all carry the same optional tensors (reduced one by one)."""
