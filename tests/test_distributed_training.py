"""Data-parallel training on several processes (gloo on the CPU): DistributedDataParallel and
FSDP2's ``fully_shard``, moewatch attached before or after the model is wrapped, eager and
compiled. Each rank counts exactly its own batch's real tokens, and the losses are those of
the same training without moewatch."""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from export_helpers import free_ports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
STEPS = 2
SET_UPS = ("ddp", "ddp-attach-outer", "ddp-compiled", "fsdp", "fsdp-attach-after")


def _wrapped(set_up: str, model, attach):
    """(the model as trained, its monitor or None) for one set-up; ``attach``: whether moewatch is on."""
    import moewatch
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    monitor = None
    if set_up.startswith("fsdp"):
        if attach and set_up == "fsdp":
            monitor = moewatch.attach(model, background=False)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        if attach and set_up == "fsdp-attach-after":
            monitor = moewatch.attach(model, background=False)
        return model, monitor
    if attach and set_up != "ddp-attach-outer":
        monitor = moewatch.attach(model, background=False)
    wrapped = DistributedDataParallel(model)
    if attach and set_up == "ddp-attach-outer":
        monitor = moewatch.attach(wrapped, background=False)
    if set_up == "ddp-compiled":
        wrapped = torch.compile(wrapped)
    return wrapped, monitor


def _train(rank: int, port: int, results) -> None:
    """One rank: every set-up trained without and with moewatch, from the same weights."""
    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    sys.path.insert(0, ROOT)
    import torch.distributed as dist

    from tests.tiny_models import padded_batch, tiny_mixtral

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    out = {}
    try:
        ids, mask = padded_batch(seed=rank + 1, length=10 + 2 * rank)  # each rank its own batch
        for set_up in SET_UPS:
            for attach in (False, True):
                model, monitor = _wrapped(set_up, tiny_mixtral().train(), attach)
                optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
                losses = []
                for _ in range(STEPS):
                    loss = model(ids, attention_mask=mask, labels=ids).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
                    losses.append(loss.item())
                row = {"losses": losses}
                if monitor is not None:
                    monitor.flush()
                    row["tokens"] = monitor.windows().groupby("gate")["tokens"].sum().tolist()
                    row["errors"] = monitor.error_counts()
                    row["gates"] = sorted(monitor.counts())
                    monitor.detach()
                out[f"{set_up}/{attach}"] = row
        out["real"] = STEPS * int(mask.sum())
    except Exception as error:  # noqa: BLE001 (reported to the test)
        import traceback

        out["error"] = f"{type(error).__name__}: {error}\n{traceback.format_exc()[-2000:]}"
    results.put((rank, out))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def trained():
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_ports(1)
    processes = [context.Process(target=_train, args=(rank, port, results)) for rank in range(WORLD)]
    for process in processes:
        process.start()
    out = dict(results.get(timeout=500) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("set_up", SET_UPS)
def test_each_rank_counts_its_own_real_tokens_and_trains_as_without_moewatch(trained, set_up):
    for rank in range(WORLD):
        assert "error" not in trained[rank], trained[rank].get("error")
        plain, watched = trained[rank][f"{set_up}/False"], trained[rank][f"{set_up}/True"]
        assert watched["errors"] == {}
        assert watched["tokens"] and set(watched["tokens"]) == {trained[rank]["real"]}  # every gate
        assert watched["losses"] == plain["losses"]  # the same training, bit for bit
        # named as the bare model names them, DDP's wrapper or not (its names gain "module.")
        assert watched["gates"] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert trained[0]["real"] != trained[1]["real"]  # so each rank's count is its own
