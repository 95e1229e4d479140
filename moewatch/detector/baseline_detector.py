"""The calibrated detector: every gate of every closed window against the baseline."""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..health import GateHealth, Health, worst
from ..stats import NONFINITE, TOKENS
from . import rules
from .calibrate import sidak, thresholds
from .features import Features, baseline_features, window_features
from .nullmodel import (CHECKS, CONCENTRATION, DROP_RATE, ENTROPY, LOAD, LOGIT_STD, OVERLOAD, TOP1_PROB,
                        UNDERLOAD, Params, fit, scores, tested)
from .pooling import Pool, Pooled, joined

FOLDS = 10


def _take(f: Features, idx: np.ndarray) -> Features:
    return Features(**{k: v[idx] for k, v in vars(f).items()})


def calibrated_scores(f: Features, params: Params) -> np.ndarray:
    """Out-of-sample scores [W, K] of the baseline windows: each block against a fit without it.

    Also sets ``params["phi"]``, the dispersion of the load statistic, from these windows.
    """
    w = f.tokens.shape[0]
    folds = np.array_split(np.arange(w), min(FOLDS, w))
    out = np.empty((w, len(CHECKS)))
    for held in folds:
        rest = np.setdiff1d(np.arange(w), held)
        out[held] = scores(fit(_take(f, rest), evidence=False), _take(f, held), raw_load=True)
    raw = out[:, LOAD]
    finite = raw[np.isfinite(raw)]  # none where the load is fixed (nullmodel.fit): phi unused, 1
    params["phi"] = np.float64(max(float(np.mean(finite)), 0.5) if finite.size else 1.0)
    df = np.maximum(tested(params, f).sum(-1) - 1, 1)
    c = 2.0 / (9.0 * df)
    out[:, LOAD] = (np.cbrt(raw / params["phi"]) - (1 - c)) / np.sqrt(c)
    return out


def _stack(per_gate: List[Params], experts: int) -> Params:
    """Per-gate params -> arrays over gates ([G], [G, E] with experts padded as unused, or [G, S])."""
    out: Params = {}
    for key in per_gate[0]:
        values = [p[key] for p in per_gate]
        if key.startswith(("scalar_", "recent_")):  # [S] per gate: one value per scalar check, or per count
            out[key] = np.stack(values)
        elif np.ndim(values[0]) == 1:
            pad = {"alive": False, "p": 1.0, "var": 1.0}[key]
            arr = np.full((len(values), experts), pad, dtype=np.asarray(values[0]).dtype)
            for i, v in enumerate(values):
                arr[i, :len(v)] = v
            out[key] = arr
        else:
            out[key] = np.array(values, dtype=np.float64)
    return out


class BaselineDetector:
    """Scores each window against the baseline; thresholds set for ``ert_windows`` (see calibrate)."""

    def __init__(self, gates: Sequence, baseline, ert_windows: float, persistence: int, seed: int = 0):
        baseline.check_gates(gates)
        self.names = [g.name for g in gates]
        self.top_k = np.array([g.top_k for g in gates], dtype=np.float64)
        self.experts = max(g.num_experts for g in gates)
        # Only a capacity-limited gate really drops tokens; a dropless gate's drops are the
        # would-be drops of capacity_factor=, a load signal that cannot by itself be a collapse.
        self.real_drops = np.array([bool(getattr(g, "native_capacity", False)) for g in gates])
        self.persistence = persistence
        self.beta_gate = sidak(ert_windows, len(gates))
        self.beta_check = self.beta_gate / len(CHECKS)
        rng = np.random.default_rng(seed)
        fitted, h1, hr = [], [], []
        self.calibration: Dict[str, dict] = {}
        for gate in gates:
            f = baseline_features(baseline.gates[gate.name])
            params = fit(f)
            cv = calibrated_scores(f, params)
            a, b, c, rho = thresholds(cv, self.beta_check, persistence, rng)
            fitted.append(params)
            h1.append(a)
            hr.append(b)
            self.calibration[gate.name] = {"windows": int(f.tokens.shape[0]), "phi": float(params["phi"]),
                                           "assignments_per_window": float(params["n0"]),
                                           "dispersion": round(float(params["dispersion"]), 3),
                                           "h1": dict(zip(CHECKS, a.round(3).tolist())),
                                           "h_persist": dict(zip(CHECKS, b.round(3).tolist())),
                                           "tail_scale": dict(zip(CHECKS, c.round(3).tolist())),
                                           "lag1": dict(zip(CHECKS, rho.tolist()))}
        self.params = _stack(fitted, self.experts)
        self.h1 = np.array(h1)  # [G, K]
        self.hr = np.array(hr)  # [G, K]
        self._history = np.zeros((max(persistence - 1, 0), len(gates), len(CHECKS)), dtype=bool)
        # The evidence rule: windows are judged alone, or pooled until they carry enough (pooling.py).
        self._pool = Pool(self.params, self.top_k)
        self._judged: Optional[Dict[str, GateHealth]] = None  # the last judgement, per gate
        self._judged_note = ""
        self._judged_on: Optional[Tuple[int, int]] = None  # first and last window the last judgement covered
        self._alarmed = np.zeros(len(gates), dtype=bool)  # [G] the last judgement fired
        # the state before each of the last judgements, the newest last
        self._before: Deque[_Judgement] = collections.deque(maxlen=REJUDGE_DEPTH)
        self._withdrawn = ""  # the note of an alarm withdrawn, until the next judgement

    # -- per window ----------------------------------------------------------------------
    def update(self, window, gates: Sequence) -> Health:
        nonfinite = self._nonfinite(window)  # [G], judged in every window, pooled or not
        pooled = self._pool.add(window)
        if pooled is None:
            return self._waiting(window, nonfinite)
        f, s, over_r, fire, collapse, active = self._judge(pooled.window, pooled.kappa, self._history)
        if not pooled.final:
            if not collapse.any():  # an early look at a pool: only a collapse is reported this soon
                return self._waiting(window, nonfinite)
        elif (not pooled.confirmed and not pooled.counted and not collapse.any()
              and (fire.any(1) & ~self._alarmed).any()):
            # A new drift: the first windows of traffic that turned into fewer, longer requests
            # look just like one. Confirm it on the make-up of the windows that show it (unless
            # their requests were counted: then the pool holds as many as the calibration's).
            self._pool.hold()
            return self._waiting(window, nonfinite)
        self._pool.take()
        self._before.append(_Judgement(pooled, self._judged, self._judged_note, self._judged_on, self._alarmed,
                                       self._history.copy()))
        if self._history.shape[0]:
            self._history = np.roll(self._history, 1, axis=0)
            self._history[0] = over_r
        self._judged = self._verdict(f, s, fire, collapse, active)
        self._alarmed = fire.any(1)
        self._judged_note = _pool_note(pooled)
        self._withdrawn = ""
        self._judged_on = (pooled.first, pooled.window.index)
        self._pool.settle(~fire.any(1))  # only traffic judged healthy teaches the live dispersion
        return self._health(window, nonfinite, self._judged_note, "")

    def _judge(self, window, kappa: np.ndarray, history: np.ndarray):
        """Score a (pooled) window with the variances widened by ``kappa`` [G]: its features,
        scores [G, K], the persistence rule's exceedances, the checks that fire, those that are a
        collapse, and the gates with traffic."""
        f = window_features(window, self.experts)
        s = scores(self.params, f, kappa=kappa)  # [G, K]
        active = f.tokens > 0
        s[~active] = -np.inf
        effect = np.ones_like(s, dtype=bool)
        with np.errstate(invalid="ignore"):
            effect[:, DROP_RATE] = f.drop_rate > self.params["drop_rate_hi"] + rules.DROP_MIN_EFFECT
        over_r = (s > self.hr) & effect
        fire = ((s > self.h1) & effect) | (over_r & history.all(0))
        collapse = self._collapse(f) & fire
        return f, s, over_r, fire, collapse, active

    def _rejudge_last(self) -> None:
        """An alarm judged on a window whose make-up was not yet known is judged again once the
        windows after it show it: when they are more clustered than the baseline's (twice the
        dispersion the alarm was scored with, or more) and the alarmed window, pooled with them
        and scored as clustered as they are, no longer fires, the alarm is withdrawn and the
        window joins their pool. The first window of traffic that turned into a few long
        requests can look like a collapse (one request that favours one expert is the whole
        window); a collapse stays one in the windows after it."""
        withdrawn = []
        while self._before and self._alarmed.any():
            last = self._before[-1]
            if self._pool.first != last.pooled.window.index + 1:
                break
            kappa = self._pool.measured_kappa()
            if not (kappa >= REJUDGE_KAPPA_RATIO * last.pooled.kappa)[self._alarmed].all():
                break
            together = joined(last.pooled.window, self._pool.window)
            if self._judge(together, kappa, last.history)[3].any():
                break
            self._before.pop()
            self._pool.prepend(last.pooled)
            self._judged, self._judged_note, self._judged_on = last.judged, last.note, last.judged_on
            self._alarmed, self._history = last.alarmed, last.history
            withdrawn.append(last.pooled)
        if withdrawn:
            first, end = withdrawn[-1].first, withdrawn[0].window.index
            which = f"window {first}" if first == end else f"windows {first}-{end}"
            self._withdrawn = (f"the alarm of {which} was withdrawn: the windows after it are more clustered "
                               f"than the baseline's, and scored as they are it is not one")

    def _nonfinite(self, window) -> np.ndarray:
        """[G]: non-finite router logits in this window, over twice the baseline's worst rate."""
        bad, tokens = window.sums[:, NONFINITE], window.sums[:, TOKENS]
        with np.errstate(invalid="ignore", divide="ignore"):
            return (bad > 0) & (bad / np.maximum(tokens, 1) > 2 * self.params["nonfinite_rate_max"])

    def _waiting(self, window, nonfinite: np.ndarray) -> Health:
        """A window too small to judge alone went into the pool: the last verdict stands."""
        self._rejudge_last()
        pool = self._pool
        one = pool.first == window.index
        held = (f"window {window.index} holds" if one else f"windows {pool.first}-{window.index} hold") + \
            f" {pool.tokens:,.0f} tokens"
        requests = pool.requests()
        if np.isfinite(requests):
            held += f" of {requests:,.1f} requests"
        measuring = pool.windows_to_measure()
        if pool.confirming:
            reason = "confirming"
            more = pool.windows_to_confirm()
            waiting = (f"waiting to confirm a drift: {held} and {'looks' if one else 'look'} like one; a drift is "
                       f"reported once the pairs of its windows show their make-up is the baseline's, {more} more "
                       f"{'window' if more == 1 else 'windows'}")
        elif measuring:
            reason = "make-up"
            more = measuring
            waiting = (f"waiting for evidence: {held}; the live traffic's make-up is measured on the pairs of its "
                       f"first windows, {more} more {'window' if more == 1 else 'windows'} before a verdict")
        else:
            reason = "evidence"
            waiting = f"waiting for evidence: {held}, a verdict needs about {pool.tokens_needed():,.0f} tokens"
            requests_needed = pool.requests_needed()
            if requests_needed > 0:
                waiting += f" of {requests_needed:,.0f} requests"
        note = waiting + (f"; the verdict is that of {_span(self._judged_on)}" if self._judged is not None
                          else "; no verdict yet")
        if self._withdrawn:
            note += f"; {self._withdrawn}"
        return self._health(window, nonfinite, note, reason)

    def _health(self, window, nonfinite: np.ndarray, note: str, waiting: str) -> Health:
        """The last judgement's gates (copies), with this window's non-finite logits."""
        gates: Dict[str, GateHealth] = {}
        for i, name in enumerate(self.names):
            last = self._judged[name] if self._judged is not None else _NO_VERDICT
            gate = _copy(last)
            if nonfinite[i]:
                gate.checks["nonfinite"] = "collapse"
                gate.reasons.append(f"{int(window.sums[i, NONFINITE])} non-finite router logits in "
                                    f"{int(window.sums[i, TOKENS])} tokens")
                gate.severity = "collapse"
            gates[name] = gate
        return Health(severity=worst(g.severity for g in gates.values()), gates=gates, window=window.index,
                      has_baseline=True, detector=True, note=note, waiting=waiting,
                      verdict_on=self._judged_on)  # None until the first judgement, and after its withdrawal

    def _collapse(self, f: Features) -> np.ndarray:
        """[G, K]: the window is far enough from the baseline to call it a collapse."""
        p = self.params
        alive = p["alive"]
        out = np.zeros((f.tokens.shape[0], len(CHECKS)), dtype=bool)
        with np.errstate(invalid="ignore", divide="ignore"):
            token_frac = f.counts / np.maximum(f.tokens, 1)[:, None]
            overload = (alive & (token_frac >= rules.OVERLOAD_TOKEN_FRACTION)
                        & (f.share >= rules.OVERLOAD_SHARE_RATIO * p["p"])).any(-1)
            concentrated = f.effective <= rules.COLLAPSE_EFFECTIVE_RATIO * p["effective_m"]
            dead = (alive & (f.counts == 0) & (f.assignments[:, None] * p["p"] >= rules.DEAD_MIN_EXPECTED)).any(-1)
            out[:, LOAD] = concentrated | overload
            out[:, OVERLOAD] = overload
            out[:, UNDERLOAD] = dead
            out[:, CONCENTRATION] = concentrated | overload
            out[:, LOGIT_STD] = f.logit_std >= rules.SATURATION_LOGIT_RATIO * p["logit_std_m"]
            out[:, TOP1_PROB] = (1 - f.top1) <= rules.SATURATION_TOP1_RATIO * (1 - p["top1_m"])
            out[:, ENTROPY] = f.entropy <= rules.COLLAPSE_ENTROPY_RATIO * p["entropy_m"]
            out[:, DROP_RATE] = self.real_drops & (f.drop_rate >= np.maximum(
                rules.DROP_COLLAPSE_RATE, rules.DROP_COLLAPSE_RATIO * p["drop_rate_hi"]))
        return out

    def _verdict(self, f, s, fire, collapse, active) -> Dict[str, GateHealth]:
        """Per gate, the verdict of the judged (possibly pooled) window."""
        gates: Dict[str, GateHealth] = {}
        alarmed = fire.any(1)
        for i, name in enumerate(self.names):
            if not alarmed[i]:
                gates[name] = GateHealth(checks=dict.fromkeys(CHECKS + ("nonfinite",), "ok") if active[i] else {})
                continue
            checks = {c: ("collapse" if collapse[i, k] else "drift") if fire[i, k] else "ok"
                      for k, c in enumerate(CHECKS)}
            checks["nonfinite"] = "ok"
            reasons = [self._reason(i, k, f, s) for k in range(len(CHECKS)) if fire[i, k]]
            gates[name] = GateHealth(severity=worst(checks.values()), reasons=reasons, checks=checks)
        return gates

    # -- reasons ---------------------------------------------------------------------------
    def _reason(self, i: int, k: int, f: Features, s: np.ndarray) -> str:
        p = {key: v[i] for key, v in self.params.items()}
        score = f"[{CHECKS[k]}: score {s[i, k]:.1f} > {min(self.h1[i, k], self.hr[i, k]):.1f}]"
        share, counts, alive = f.share[i], f.counts[i], p["alive"]
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(alive, (share - p["p"]) / np.sqrt(p["var"]), 0.0)
        if k == CONCENTRATION:
            up = [e for e in np.argsort(-z) if z[e] >= 3 and alive[e]][:8]
            held = (f": {_experts(up)} {_take_verb(up)} {share[up].sum():.0%} of assignments "
                    f"(baseline {p['p'][up].sum():.0%})") if up else ""
            return f"effective experts {f.effective[i]:.2f} (baseline {p['effective_m']:.2f}){held} {score}"
        if k in (LOAD, OVERLOAD):
            up = [e for e in np.argsort(-z) if z[e] >= 3 and alive[e]][:8]
            if k == OVERLOAD:
                up = up[:1]
            if up:
                # a share of assignments; with top-k a token makes k of them, so also say how many
                # tokens chose these experts (up to k times the share)
                chosen = _chosen_by(counts[up], f.tokens[i])
                return (f"{_experts(up)} {_take_verb(up)} {share[up].sum():.0%} of assignments{chosen} "
                        f"(baseline {p['p'][up].sum():.0%} of assignments) {score}")
            down = [e for e in np.argsort(z) if z[e] <= -3 and alive[e]][:8]
            if down:
                return (f"{_experts(down)} {_take_verb(down)} {share[down].sum():.1%} of assignments "
                        f"(baseline {p['p'][down].sum():.1%}) {score}")
            return f"expert load differs from baseline {score}"
        if k == UNDERLOAD:
            dead = [e for e in range(len(share)) if alive[e] and counts[e] == 0
                    and f.assignments[i] * p["p"][e] >= rules.DEAD_MIN_EXPECTED]
            if dead:
                expected = f.assignments[i] * p["p"][dead].sum()
                return (f"{_experts(dead)} {'is' if len(dead) == 1 else 'are'} dead: 0 of {int(f.assignments[i])} assignments "
                        f"(baseline {p['p'][dead].sum():.1%}, ~{expected:.0f} expected) {score}")
            low = [e for e in np.argsort(z) if alive[e]][:3]
            return f"{_experts(low[:1])} takes {share[low[0]]:.1%} of assignments (baseline {p['p'][low[0]]:.1%}) {score}"
        if k == LOGIT_STD:
            return f"router-logit std {f.logit_std[i]:.3g} (baseline {p['logit_std_m']:.3g}) {score}"
        if k == TOP1_PROB:
            return f"mean top-1 probability {f.top1[i]:.3f} (baseline {p['top1_m']:.3f}) {score}"
        if k == ENTROPY:
            return f"token routing entropy {f.entropy[i]:.3f} nats (baseline {p['entropy_m']:.3f}) {score}"
        what, note = ("drop rate", "") if self.real_drops[i] else ("would-be drop rate", rules.WOULD_BE)
        return (f"{what} {f.drop_rate[i]:.2%} of assignments{note} (baseline 99th percentile "
                f"{p['drop_rate_hi']:.2%}) {score}")


_NO_VERDICT = GateHealth()
# An alarm is judged again when the windows after it are this many times as clustered as it was
# scored with; as far back as this many judgements.
REJUDGE_KAPPA_RATIO = 2.0
REJUDGE_DEPTH = 8


@dataclass
class _Judgement:
    """What the detector held before a judgement, to go back to if it is withdrawn."""

    pooled: Pooled
    judged: Optional[Dict[str, GateHealth]]
    note: str
    judged_on: Optional[Tuple[int, int]]
    alarmed: np.ndarray
    history: np.ndarray


def _copy(gate: GateHealth) -> GateHealth:
    """A copy whose lists the caller may change (the monitor marks each verdict it hands out);
    cheaper than dataclasses.replace, which matters at 64 gates a window."""
    out = GateHealth.__new__(GateHealth)
    out.__dict__.update(gate.__dict__)
    out.reasons, out.checks = list(gate.reasons), dict(gate.checks)
    return out


def _span(windows: Tuple[int, int]) -> str:
    first, last = windows
    return f"window {first}" if first == last else f"windows {first}-{last}"


def _pool_note(pooled: Pooled) -> str:
    """What the verdict was judged on, when that was more than the window that just closed."""
    if pooled.count == 1:
        return ""
    return (f"windows {pooled.first}-{pooled.window.index} judged together ({pooled.count} windows, "
            f"{pooled.tokens:,.0f} tokens): one alone carries less evidence than the calibration supports")


def _experts(ids) -> str:
    ids = [int(e) for e in ids]
    return ("expert " if len(ids) == 1 else "experts ") + ",".join(str(e) for e in sorted(ids))


def _take_verb(ids) -> str:
    return "takes" if len(ids) == 1 else "take"


def _chosen_by(counts: np.ndarray, tokens: float) -> str:
    """The clause ', chosen by 97% of tokens' for one expert (a token picks an expert at most once)."""
    if len(counts) != 1 or tokens <= 0:
        return ""
    return f", chosen by {float(counts[0]) / tokens:.0%} of tokens"
