"""Without a baseline: fixed rules from operating experience, judged per window and gate.

These rules cannot know what healthy routing of *this* model looks like, so the verdict says
so (``has_baseline=False``). Each rule needs enough tokens to be meaningful, and must hold in
``persistence`` consecutive windows (non-finite logits fire at once).
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from ..health import GateHealth, Health, worst
from ..schema import ABSOLUTE_CHECKS
from . import rules
from .features import window_features

# The rules, in the column order of the history; each reports under a check of the schema's set
# (the same names the calibrated detector uses): starved and dead -> underload, load entropy ->
# concentration, top token fraction -> overload.
RULES = ("starved", "dead", "load_entropy", "top_share", "drop_rate")
NOTE = ("no baseline: absolute rules only (an expert with under 10% of a fair 1/N share of assignments, "
        "load entropy under 0.8 ln N, one expert chosen by over 80% of tokens, over 1% of assignments "
        "dropped); record one with mon.baseline()")


class AbsoluteDetector:
    def __init__(self, gates: Sequence, persistence: int):
        self.names = [g.name for g in gates]
        self.num_experts = np.array([g.num_experts for g in gates], dtype=np.float64)
        self.experts = int(self.num_experts.max())
        self.valid = np.arange(self.experts)[None, :] < self.num_experts[:, None]  # [G, E]
        # would-be drops of a dropless gate (capacity_factor=) are a warning, real drops a collapse
        self.real_drops = [bool(getattr(g, "native_capacity", False)) for g in gates]
        self._history = np.zeros((max(persistence - 1, 0), len(gates), len(RULES)), dtype=bool)

    def update(self, window, gates: Sequence) -> Health:
        f = window_features(window, self.experts)
        n_exp = self.num_experts
        fair = f.assignments / n_exp  # assignments per expert on an even split
        enough = f.tokens >= rules.MIN_TOKENS
        loaded = enough & (fair >= rules.MIN_EXPECTED_PER_EXPERT)
        log_n = np.log(n_exp)
        load_entropy = np.log(f.effective)  # Miller-Madow corrected
        with np.errstate(invalid="ignore", divide="ignore"):
            starved = self.valid & (f.counts < rules.STARVED_FRACTION * fair[:, None])
            token_frac = (f.counts / np.maximum(f.tokens, 1)[:, None]).max(-1)
            now = np.stack([
                loaded & starved.any(-1),
                loaded & (self.valid & (f.counts == 0)).any(-1),
                loaded & (load_entropy < rules.LOW_LOAD_ENTROPY * log_n),
                enough & (token_frac > rules.TOP_TOKEN_FRACTION),
                enough & (f.drop_rate > rules.DROP_RATE_LIMIT),
            ], axis=1)  # [G, R]
        fire = now & self._history.all(0)
        if self._history.shape[0]:
            self._history = np.roll(self._history, 1, axis=0)
            self._history[0] = now
        collapsed_entropy = load_entropy < rules.COLLAPSED_LOAD_ENTROPY * log_n
        gates_out: Dict[str, GateHealth] = {}
        for i, name in enumerate(self.names):
            checks = dict.fromkeys(ABSOLUTE_CHECKS, "ok")
            reasons = []
            n = int(n_exp[i])
            if fire[i, 0] and not fire[i, 1]:
                e = int(np.argmin(np.where(self.valid[i], f.counts[i], np.inf)))
                checks["underload"] = "drift"
                reasons.append(f"expert {e} takes {f.share[i, e]:.2%} of assignments (under "
                               f"{rules.STARVED_FRACTION:.0%} of a fair 1/{n} = {1 / n:.1%})")
            if fire[i, 1]:
                dead = np.flatnonzero(self.valid[i] & (f.counts[i] == 0))
                checks["underload"] = "collapse"
                reasons.append(f"experts {','.join(map(str, dead))} dead: 0 of {int(f.assignments[i])} assignments")
            if fire[i, 2]:
                checks["concentration"] = "collapse" if collapsed_entropy[i] else "drift"
                reasons.append(f"load entropy {load_entropy[i]:.2f} nats, under {rules.LOW_LOAD_ENTROPY} ln {n} = "
                               f"{rules.LOW_LOAD_ENTROPY * log_n[i]:.2f} (effective experts {f.effective[i]:.1f} of {n})")
            if fire[i, 3]:
                e = int(np.argmax(np.where(self.valid[i], f.counts[i], -1)))
                checks["overload"] = "collapse"
                reasons.append(f"expert {e} is chosen by {f.counts[i, e] / f.tokens[i]:.0%} of tokens "
                               f"(over {rules.TOP_TOKEN_FRACTION:.0%}) and takes {f.share[i, e]:.0%} of assignments")
            if fire[i, 4]:
                real = self.real_drops[i]
                checks["drop_rate"] = "collapse" if real else "drift"
                what, note = ("drop rate", "") if real else ("would-be drop rate", rules.WOULD_BE)
                reasons.append(f"{what} {f.drop_rate[i]:.2%} of assignments{note} (over {rules.DROP_RATE_LIMIT:.0%})")
            if f.nonfinite[i] > 0:
                checks["nonfinite"] = "collapse"
                reasons.append(f"{int(f.nonfinite[i])} non-finite router logits in {int(f.tokens[i])} tokens")
            gates_out[name] = GateHealth(severity=worst(checks.values()), reasons=reasons, checks=checks)
        return Health(severity=worst(g.severity for g in gates_out.values()), gates=gates_out, window=window.index,
                      has_baseline=False, detector=True, note=NOTE, verdict_on=(window.index, window.index))
