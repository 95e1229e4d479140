"""Hugging Face ``transformers`` integration: record a baseline while a Trainer trains or evaluates.

    from moewatch.integrations import MoewatchCallback
    trainer = Trainer(model=model, args=args, ..., callbacks=[MoewatchCallback(window_tokens=4096)])

Every checkpoint folder then holds ``moewatch_baseline.json``: the healthy routing of the model
as it was trained, ready for ``moewatch.attach(model, baseline=".../moewatch_baseline.json")``.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from transformers import TrainerCallback

from .baseline import Baseline, BaselineError
from .monitor import Monitor, attach

BASELINE_FILE = "moewatch_baseline.json"
log = logging.getLogger("moewatch")


class MoewatchCallback(TrainerCallback):
    """Attaches moewatch to the trainer's model and saves a baseline beside each checkpoint.

    ``options`` go to :func:`moewatch.attach` (e.g. ``window_tokens=``). Traffic of both
    training and evaluation steps is recorded; the baseline holds the windows still in the
    monitor's ring (``ring_windows=``). ``monitor`` and ``baseline`` (the last one saved) are
    available on the callback. A checkpoint taken before enough windows were seen gets no
    baseline file, and a warning says why.
    """

    def __init__(self, **options):
        options.setdefault("background", False)  # windows close at step ends: deterministic
        self.options = options
        self.monitor: Optional[Monitor] = None
        self.baseline: Optional[Baseline] = None

    def _poll(self) -> None:
        if self.monitor is not None:
            self.monitor._poll()  # close the window if it has enough tokens

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.monitor is None and model is not None:
            self.monitor = attach(model, **self.options)

    def on_step_end(self, args, state, control, **kwargs):
        self._poll()

    def on_prediction_step(self, args, state, control, **kwargs):
        self._poll()

    def on_save(self, args, state, control, **kwargs):
        if self.monitor is None or not state.is_world_process_zero:
            return
        self.monitor.flush()
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        try:
            baseline = self.monitor.baseline()
        except BaselineError as error:
            log.warning("moewatch: no baseline saved in %s: %s", folder, error)
            return
        baseline.meta.update({"global_step": state.global_step, "source": "transformers.Trainer"})
        os.makedirs(folder, exist_ok=True)
        baseline.save(os.path.join(folder, BASELINE_FILE))
        self.baseline = baseline

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.detach()
