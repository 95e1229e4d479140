"""The Trainer callback on a real transformers.Trainer with a tiny Mixtral (a few CPU steps)."""
from __future__ import annotations

import os

import numpy as np
import torch

import moewatch
from moewatch.integrations import BASELINE_FILE, MoewatchCallback
from tests.conftest import tiny_mixtral


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int = 32, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 128, (n, length), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_saves_a_loadable_baseline_in_each_checkpoint(tmp_path):
    from transformers import Trainer, TrainingArguments

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_mixtral().train()
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=24,
                                 save_steps=12, save_strategy="steps", logging_strategy="no", report_to=[],
                                 use_cpu=True, learning_rate=1e-3, dataloader_num_workers=0)
        callback = MoewatchCallback(window_tokens=128)  # one window per training step (4 x 32 tokens)
        trainer = Trainer(model=model, args=args, train_dataset=_Tokens(96), callbacks=[callback])
        trainer.train()
    finally:
        torch.set_num_threads(before)
    for step in (12, 24):
        path = os.path.join(tmp_path, f"checkpoint-{step}", BASELINE_FILE)
        assert os.path.isfile(path), sorted(os.listdir(tmp_path))
        base = moewatch.Baseline.load(path)
        assert base.meta["global_step"] == step
        gate = base.gates["model.layers.0.mlp.gate"]
        assert gate.windows >= step - 1  # a window per step (the last may close at save)
        assert gate.expert_counts.sum(1).max() <= 2 * 4 * 32 * 2
        assert np.all(gate.series["tokens"] > 0)
    assert not callback.monitor.attached  # detached at the end of training
    # the saved baseline is usable on the trained model
    with moewatch.attach(model.eval(), baseline=path, background=False) as mon:
        with torch.no_grad():
            model(torch.randint(0, 128, (4, 32)))
        assert mon.flush().has_baseline
