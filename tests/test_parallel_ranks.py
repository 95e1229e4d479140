"""A serving engine's parallel ranks: ``mon.parallel_ranks`` and ``moewatch_parallel_rank_info``.

A test engine is registered through ``moewatch.engines.register_engine`` (the seam vLLM's uses)
for one tiny Mixtral; it finds the gates the way a plain attach does and reports ranks. The vLLM
worker's own ranks are checked in ``tests/test_vllm.py``.
"""
from __future__ import annotations

import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import moewatch
import moewatch.engines as engines
from moewatch.discovery import resolve_gates
from moewatch.engines import Engine
from tiny_models import tiny_mixtral


class RankedEngine(Engine):
    name = "ranked"

    def __init__(self, ranks):
        self.ranks = ranks

    def gates(self, model, options):
        return resolve_gates(model, options.gates, options.top_k, options.scoring, options.num_experts)

    def parallel_ranks(self):
        if isinstance(self.ranks, Exception):
            raise self.ranks
        return self.ranks


@pytest.fixture
def engine_for_model():
    claims = []

    def register(model, engine):
        def claim(candidate):
            return engine if candidate is model else None
        engines.register_engine(claim)
        claims.append(claim)

    yield register
    for claim in claims:
        engines._CLAIMS.remove(claim)


def _info_series(port: int) -> list:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return [sample.labels for family in text_string_to_metric_families(text)
            if family.name == "moewatch_parallel_rank_info" for sample in family.samples]


def test_an_engines_parallel_ranks_are_labels_of_their_own(engine_for_model):
    model = tiny_mixtral()
    engine_for_model(model, RankedEngine({"tp": 1, "dp": 3, "ep": 7}))  # no pipeline parallelism
    mon = moewatch.attach(model, background=False, model_name="ranked", rank=11)
    try:
        assert mon.parallel_ranks == {"tp": 1, "dp": 3, "ep": 7}
        with torch.no_grad():
            model(torch.randint(0, 128, (2, 8)))
        mon.flush()
        port = mon.serve_prometheus(port=0)
        (labels,) = _info_series(port)
        assert labels == {"model": "ranked", "rank": "11", "tp_rank": "1", "pp_rank": "", "dp_rank": "3",
                          "ep_rank": "7"}
    finally:
        mon.detach()


def test_no_engine_means_no_parallel_rank_series():
    mon = moewatch.attach(tiny_mixtral(), background=False)
    try:
        assert mon.parallel_ranks == {}
        assert _info_series(mon.serve_prometheus(port=0)) == []
    finally:
        mon.detach()


def test_an_engine_that_fails_to_say_its_ranks_is_counted_not_raised(engine_for_model):
    model = tiny_mixtral()
    engine_for_model(model, RankedEngine(RuntimeError("parallel state torn down")))
    mon = moewatch.attach(model, background=False)
    try:
        assert mon.parallel_ranks == {}
        assert mon.error_counts().get("engine") == 1
        with torch.no_grad():
            model(torch.randint(0, 128, (2, 8)))
        mon.flush()
        assert sum(int(c.sum()) for c in mon.counts().values()) == 2 * 8 * 2 * 2  # monitoring goes on
    finally:
        mon.detach()
