"""The detector: per closed window and gate, ok / drift / collapse with reasons.

With a baseline, :class:`BaselineDetector` tests each window against it with thresholds
calibrated to an expected run time between false alarms (``ert_windows``). Without one,
:class:`AbsoluteDetector` applies fixed rules and says it has no baseline. Host-side numpy and
scipy only; see ``docs/detector.md``.
"""
from __future__ import annotations

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
    return BaselineDetector(monitor.gates, baseline, opts.ert_windows, opts.persistence)
