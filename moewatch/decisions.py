"""Sampled per-token routing decisions, kept in a fixed-size ring on the gates' device.

With ``sample_decisions=f`` every gate hook keeps one token out of ``n = round(1/f)`` of the
tokens it routes (a deterministic stride that continues across calls, so the gate's token stream
is sampled evenly). For each kept token the ring stores the gate, the gate call it came from, the
token's row in that call, the expert ids the router chose, the routing probabilities of those
experts, and whether the token was traffic (not padding).

Writing a sample is a handful of device ops and never reads a value back to the host: the sampled
rows are chosen from tensor shapes only (host integers), ring slots are ``(ptr + arange(n)) % R``
for a device pointer ``ptr`` that is advanced in place, and every column is written with
``index_copy_``. The ring is bounded (``decision_slots`` entries): old decisions are overwritten.
With ``sample_decisions=0`` nothing is allocated and the hooks do no extra work.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from .routing import GateInfo
from .stats import routing_probs

# Columns of the decisions table (``read_dump(path).decisions``).
DECISION_COLUMNS = ["gate", "window", "call", "token", "experts", "expert_probs", "valid", "seq"]


def stride_of(fraction: float) -> int:
    """Keep one token in ``stride_of(fraction)``: the fraction rounded to 1/n (0 = off)."""
    if fraction <= 0:
        return 0
    return max(1, int(round(1.0 / fraction)))


class DecisionRing:
    """The decisions of the gates on one device: fixed-size columns written in place.

    ``seq[i]`` is the write number of slot i's decision (-1: never written); the ring's order is
    the order of ``seq``. ``ptr`` counts decisions written since attach; ``calls[g]`` counts the
    calls of gate g (its global gate index) since attach.
    """

    def __init__(self, capacity: int, max_k: int, num_gates: int, device: torch.device,
                 mark_limit: int):
        self.capacity = capacity
        self.max_k = max_k
        self.device = torch.device(device)
        long = dict(dtype=torch.int64, device=self.device)
        self.seq = torch.full((capacity,), -1, **long)  # [R]
        self.gate = torch.zeros(capacity, dtype=torch.int32, device=self.device)  # [R]
        self.call = torch.zeros(capacity, **long)  # [R]
        self.token = torch.zeros(capacity, **long)  # [R]
        self.experts = torch.full((capacity, max_k), -1, dtype=torch.int32, device=self.device)  # [R, K]
        self.probs = torch.full((capacity, max_k), float("nan"), dtype=torch.float32, device=self.device)  # [R, K]
        self.valid = torch.zeros(capacity, dtype=torch.bool, device=self.device)  # [R]
        self.ptr = torch.zeros(1, **long)  # [1]
        self.calls = torch.zeros(num_gates, **long)  # [G]
        self.lock = threading.Lock()  # forwards may run on several threads
        # (window index, ptr when it closed), host side; the floor is the last mark dropped.
        self.marks: deque = deque(maxlen=mark_limit)
        self.floor: Optional[Tuple[int, int]] = None

    def write(self, gate: int, tokens: torch.Tensor, experts: torch.Tensor, probs: torch.Tensor,
              valid: torch.Tensor) -> None:
        """Append the n sampled decisions of one call of gate ``gate`` and count the call.

        tokens [n] int64, experts [n, k], probs [n, k], valid [n] bool; n must be at most the
        capacity (slots would collide). Device ops only.
        """
        n, k = experts.shape
        dev = self.device
        tokens, experts, probs, valid = (t.to(dev, non_blocking=True) for t in (tokens, experts, probs, valid))
        padded_experts = torch.full((n, self.max_k), -1, dtype=torch.int32, device=dev)  # [n, K]
        padded_experts[:, :k] = experts.to(torch.int32)
        padded_probs = torch.full((n, self.max_k), float("nan"), dtype=torch.float32, device=dev)  # [n, K]
        padded_probs[:, :k] = probs.to(torch.float32)
        steps = torch.arange(n, dtype=torch.int64, device=dev)  # [n]
        with self.lock:
            seq = self.ptr + steps  # [n]
            slots = seq % self.capacity  # [n]
            self.seq.index_copy_(0, slots, seq)
            self.gate.index_fill_(0, slots, gate)
            self.call.index_copy_(0, slots, self.calls[gate:gate + 1].expand(n))
            self.token.index_copy_(0, slots, tokens)
            self.experts.index_copy_(0, slots, padded_experts)
            self.probs.index_copy_(0, slots, padded_probs)
            self.valid.index_copy_(0, slots, valid)
            self.ptr.add_(n)
            self.calls[gate:gate + 1].add_(1)

    def count_call(self, gate: int) -> None:
        with self.lock:
            self.calls[gate:gate + 1].add_(1)

    # -- host side (reader thread, dumps) ---------------------------------------------------
    def mark(self, window: int) -> None:
        """Remember where the ring stood when window ``window`` closed (a host read)."""
        ptr = int(self.ptr.to("cpu")[0])
        if len(self.marks) == self.marks.maxlen:
            self.floor = self.marks[0]
        self.marks.append((window, ptr))

    def host_copy(self) -> Dict[str, np.ndarray]:
        """A consistent host copy of every column and of the window marks."""
        with self.lock:
            cols = {name: getattr(self, name).clone() for name in
                    ("seq", "gate", "call", "token", "experts", "probs", "valid", "ptr")}
            marks = list(self.marks)
            floor = self.floor
        out = {name: t.to("cpu").numpy() for name, t in cols.items()}
        out["marks"] = marks
        out["floor"] = floor
        return out


def window_of(seq: np.ndarray, marks: List[Tuple[int, int]], floor: Optional[Tuple[int, int]]) -> np.ndarray:
    """The closed window each decision fell in (-1: outside the windows still marked).

    A decision with write number s belongs to the first window whose mark (the ring pointer when
    it closed) is above s. The mark is read just after the window's accumulators, so a decision
    written in between is attributed to the earlier window.
    """
    out = np.full(seq.shape, -1, dtype=np.int64)
    if not marks:
        return out
    ptrs = np.array([p for _, p in marks], dtype=np.int64)
    wins = np.array([w for w, _ in marks], dtype=np.int64)
    pos = np.searchsorted(ptrs, seq, side="right")
    inside = pos < len(ptrs)
    if floor is not None:
        inside &= seq >= floor[1]
    out[inside] = wins[pos[inside]]
    return out


class DecisionSampler:
    """Per-gate writer called from the gate hook: picks the sampled rows and writes them."""

    def __init__(self, ring: DecisionRing, gate: int, stride: int, scoring: str, top_k: int):
        self.ring = ring
        self.gate = gate
        self.stride = stride
        self.scoring = scoring
        self.top_k = top_k
        self.seen = 0  # tokens seen by this gate (host integer, from shapes only)

    def rows(self, num_tokens: int) -> range:
        """The rows of a call with ``num_tokens`` tokens that are kept (the last R at most)."""
        first = (-self.seen) % self.stride
        self.seen += num_tokens
        rows = range(first, num_tokens, self.stride)
        if len(rows) > self.ring.capacity:
            rows = rows[len(rows) - self.ring.capacity:]
        return rows

    def record(self, logits: torch.Tensor, indices: Optional[torch.Tensor], probs: Optional[torch.Tensor],
               valid: Optional[torch.Tensor], positions: Optional[torch.Tensor] = None) -> None:
        """Sample one gate call. logits [T, E]; indices [T, k] or None; probs [T, E] or None;
        valid [T] or None; positions [T] int64 or None (the rows' places in the call's token grid
        when the gate saw a gathered subset of the tokens).

        The experts are the router's own choice when it returned them, else the top-k of the
        routing distribution, as the statistics count them. The token recorded is the row in
        the call's flattened [batch * sequence] tokens.
        """
        rows = self.rows(logits.shape[0])
        if len(rows) == 0:
            self.ring.count_call(self.gate)
            return
        dev = logits.device
        pos = torch.arange(rows.start, rows.stop, rows.step, dtype=torch.int64, device=dev)  # [n]
        x = logits.detach().index_select(0, pos).float()  # [n, E]
        x = torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=dev))
        if probs is None:
            p = routing_probs(x, self.scoring)  # [n, E]
        else:
            p = torch.nan_to_num(probs.detach().index_select(0, pos).float(), nan=0.0, posinf=0.0, neginf=0.0)
        if indices is None:
            chosen = torch.topk(p, self.top_k, dim=-1).indices  # [n, k]
        else:
            chosen = indices.index_select(0, pos).long()  # [n, k]
        chosen_probs = p.gather(1, chosen)  # [n, k]
        if valid is None:
            keep = torch.ones(pos.shape, dtype=torch.bool, device=dev)  # [n]
        else:
            keep = valid.to(dev).index_select(0, pos) != 0  # [n]
        token = pos if positions is None else positions.to(dev).index_select(0, pos).long()  # [n]
        self.ring.write(self.gate, token, chosen, chosen_probs, keep)


class DecisionRecorder:
    """The decision rings of one monitor (one per device) and the samplers of its gates."""

    def __init__(self, fraction: float, slots: int, gates: Sequence[GateInfo], devices: Sequence[torch.device],
                 mark_limit: int):
        self.fraction = fraction
        self.stride = stride_of(fraction)
        self.slots = slots
        self.gates = list(gates)
        max_k = max(g.top_k for g in self.gates)
        self.rings: Dict[torch.device, DecisionRing] = {}
        self.samplers: Dict[str, DecisionSampler] = {}
        for index, (gate, device) in enumerate(zip(self.gates, devices)):
            device = torch.device(device)
            if device not in self.rings:
                self.rings[device] = DecisionRing(slots, max_k, len(self.gates), device, mark_limit)
            self.samplers[gate.name] = DecisionSampler(self.rings[device], index, self.stride,
                                                       gate.scoring, gate.top_k)

    @classmethod
    def create(cls, fraction: float, slots: int, gates: Sequence[GateInfo], devices: Sequence[torch.device],
               mark_limit: int) -> Optional["DecisionRecorder"]:
        """None when sampling is off (``fraction == 0``): no memory, no work in the hooks."""
        if stride_of(fraction) == 0 or not gates:
            return None
        return cls(fraction, slots, gates, devices, mark_limit)

    def sampler(self, gate_name: str) -> Optional[DecisionSampler]:
        return self.samplers.get(gate_name)

    def mark(self, window: int) -> None:
        for ring in self.rings.values():
            ring.mark(window)

    def written(self) -> int:
        """Decisions written since attach (a host read)."""
        return sum(int(r.ptr.to("cpu")[0]) for r in self.rings.values())

    def frame(self) -> pd.DataFrame:
        """The ring's decisions, oldest first, columns :data:`DECISION_COLUMNS`."""
        parts = []
        for ring in self.rings.values():
            host = ring.host_copy()
            written = host["seq"] >= 0
            order = np.argsort(host["seq"][written], kind="stable")
            cols = {k: host[k][written][order] for k in ("seq", "gate", "call", "token", "experts", "probs", "valid")}
            cols["window"] = window_of(cols["seq"], host["marks"], host["floor"])
            parts.append(cols)
        return decisions_frame(parts, self.gates)


def decisions_frame(parts: List[dict], gates: Sequence[GateInfo]) -> pd.DataFrame:
    """Host columns of one or more rings -> the decisions table (expert lists cut to each gate's k)."""
    parts = [p for p in parts if len(p["seq"])]
    if not parts:
        return empty_decisions()
    names = np.array([g.name for g in gates], dtype=object)
    ks = np.array([g.top_k for g in gates], dtype=np.int64)
    cat = {c: np.concatenate([p[c] for p in parts]) for c in ("seq", "gate", "call", "token", "window", "valid")}
    experts = np.concatenate([p["experts"] for p in parts])
    probs = np.concatenate([p["probs"] for p in parts])
    k_of = ks[cat["gate"]]
    frame = pd.DataFrame({
        "gate": names[cat["gate"]],
        "window": cat["window"].astype(np.int64),
        "call": cat["call"].astype(np.int64),
        "token": cat["token"].astype(np.int64),
        "experts": [row[:k].astype(np.int32) for row, k in zip(experts, k_of)],
        "expert_probs": [row[:k].astype(np.float32) for row, k in zip(probs, k_of)],
        "valid": cat["valid"].astype(bool),
        "seq": cat["seq"].astype(np.int64),
    }, columns=DECISION_COLUMNS)
    return frame


def empty_decisions() -> pd.DataFrame:
    """A decisions table without rows, with the column types of a full one."""
    return pd.DataFrame({
        "gate": pd.Series([], dtype=object), "window": pd.Series([], dtype="int64"),
        "call": pd.Series([], dtype="int64"), "token": pd.Series([], dtype="int64"),
        "experts": pd.Series([], dtype=object), "expert_probs": pd.Series([], dtype=object),
        "valid": pd.Series([], dtype="bool"), "seq": pd.Series([], dtype="int64"),
    }, columns=DECISION_COLUMNS)
