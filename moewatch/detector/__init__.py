"""The detector: per closed window and gate, ok / drift / collapse with reasons.

With a baseline, :class:`BaselineDetector` tests each window against it with thresholds
calibrated to an expected run time between false alarms (``ert_windows``). Without one,
:class:`AbsoluteDetector` applies fixed rules and says it has no baseline. Host-side numpy and
scipy only; see ``docs/detector.md``.
"""
from __future__ import annotations

import warnings

from ..baseline import as_baseline
from .absolute import AbsoluteDetector
from .baseline_detector import BaselineDetector
from .nullmodel import CHECKS

__all__ = ["AbsoluteDetector", "BaselineDetector", "CHECKS", "make_detector"]


def make_detector(monitor, baseline):
    """The detector for ``monitor``: calibrated against ``baseline`` (a Baseline or a path), or absolute."""
    baseline = as_baseline(baseline)
    opts = monitor.options
    if baseline is None:
        return AbsoluteDetector(monitor.gates, opts.persistence)
    if not same_model(baseline.model_name, monitor.model_name):
        # The gates fit (or BaselineDetector raises), but another model's routing is no measure
        # of this one's: a fine-tune or another checkpoint drifts from it by design.
        warnings.warn(f"the baseline was recorded on model {baseline.model_name!r}, the monitored model is "
                      f"{monitor.model_name!r}: verdicts compare against the other model's routing (pass "
                      "model_name= to attach if they are the same model)", UserWarning, stacklevel=5)
    if not all(gate.requests_known for gate in baseline.gates.values()):
        # Without them a window of one long request is judged on its tokens alone, as if it
        # held a baseline window's requests (docs/detector.md, "Counting requests").
        warnings.warn("the baseline holds no request counts (written before moewatch kept them, or recorded "
                      "where they were not known): windows of a few long requests are judged on their tokens "
                      "alone, and the first windows after traffic turns into fewer, longer requests can be "
                      "called a collapse. Record the baseline again (moewatch baseline, or mon.baseline()) "
                      "to have such windows held until they carry enough requests", UserWarning, stacklevel=5)
    return BaselineDetector(monitor.gates, baseline, opts.ert_windows, opts.persistence)


def same_model(recorded: str, monitored: str) -> bool:
    """Whether two model names name the same model: equal, or the same last path component
    (a local directory read from two paths); a baseline without a name matches any model."""
    if not recorded or not monitored or recorded == monitored:
        return True
    tail = lambda name: name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]  # noqa: E731
    return tail(recorded) == tail(monitored)
