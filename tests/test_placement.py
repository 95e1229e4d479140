"""``moewatch placement``: a synthetic router with planted expert clusters is recovered and its
volume cut by the planted amount (measured on held-out windows); the pairwise model; the CLI,
its JSON (read back by expert_placement=) and its errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import moewatch
from moewatch import cli
from moewatch.dump import read_dump
from moewatch.placement.plan import plan
from moewatch.placement.propose import _canonical, fix_sizes, rank_sizes
from moewatch.placement.spec import PlacementError, contiguous
from moewatch.placement.traffic import pairwise_ranks_per_token, ranks_per_token
from tests.coselection_numpy import numpy_coselection

E, R, K = 16, 4, 2
CLUSTERS = [[c, c + 4, c + 8, c + 12] for c in range(4)]  # interleaved: contiguous placement splits each
P_CLUSTER = 0.9  # a token picks both experts from one cluster with this probability


class PlantedRouter(nn.Module):
    """Root model whose gate (``router``) passes through logits the test makes."""

    def __init__(self):
        super().__init__()
        self.router = nn.Identity()

    def forward(self, logits):
        return self.router(logits)


def planted_logits(tokens: int, rng: np.random.Generator) -> torch.Tensor:
    """[T, E]: every token's top-2 is two experts of one cluster (P_CLUSTER) or of all 16."""
    x = rng.normal(0, 0.1, (tokens, E))
    for t in range(tokens):
        pool = CLUSTERS[rng.integers(4)] if rng.random() < P_CLUSTER else list(range(E))
        x[t, rng.choice(pool, 2, replace=False)] += [5.0, 4.0]
    return torch.tensor(x, dtype=torch.float32)


@pytest.fixture(scope="module")
def planted_dump(tmp_path_factory):
    rng = np.random.default_rng(0)
    model = PlantedRouter()
    mon = moewatch.attach(model, gates="router", top_k=K, num_experts=E, background=False, sample_decisions=0.5,
                          window_tokens=10**9)
    for _ in range(24):
        model(planted_logits(400, rng))
        mon.flush()
    path = mon.dump(tmp_path_factory.mktemp("planted") / "planted.parquet")
    mon.detach()
    return path


def test_planted_clusters_are_recovered_and_the_volume_cut_by_the_planted_amount(planted_dump):
    (gate,) = plan(read_dump(planted_dump), R, "contiguous", max_imbalance=1.1)
    planted = np.empty(E, dtype=np.int64)
    for rank, members in enumerate(CLUSTERS):
        planted[members] = rank
    assert _canonical(gate.proposal.ranks) == _canonical(planted)  # the clusters, up to naming the ranks
    assert gate.proposal.within_bound and gate.held_proposed.imbalance <= 1.1
    assert gate.held_current.method.startswith("exact")
    # contiguous puts the 4 experts of every cluster on 4 ranks: a cluster token costs 2 ranks, 1 when
    # its cluster shares a rank; a random pair costs 1 + 12/15 either way. Planted cut: P_CLUSTER.
    want_current = P_CLUSTER * 2 + (1 - P_CLUSTER) * (1 + 12 / 15)
    want_proposed = P_CLUSTER * 1 + (1 - P_CLUSTER) * (1 + 12 / 15)
    assert gate.held_current.ranks_per_token == pytest.approx(want_current, abs=0.03)
    assert gate.held_proposed.ranks_per_token == pytest.approx(want_proposed, abs=0.03)
    cut = gate.held_current.ranks_per_token - gate.held_proposed.ranks_per_token
    assert cut == pytest.approx(P_CLUSTER, abs=0.04)
    assert max(gate.held_windows) > max(gate.fit_windows)  # measured on windows it did not fit on


def test_without_sampled_decisions_the_pairwise_model_measures_k2_exactly(tmp_path):
    rng = np.random.default_rng(1)
    model = PlantedRouter()
    mon = moewatch.attach(model, gates="router", top_k=K, num_experts=E, background=False, window_tokens=10**9)
    for _ in range(24):
        model(planted_logits(300, rng))
        mon.flush()
    dump = read_dump(mon.dump(tmp_path / "no-decisions.parquet"))
    mon.detach()
    assert dump.decisions.empty and len(dump.coselection) == 6  # a span every E/4 = 4 windows
    (gate,) = plan(dump, R, "contiguous", max_imbalance=1.1)  # fitted on 4 spans, measured on 2
    assert gate.held_current.method.startswith("pairwise")
    planted = np.empty(E, dtype=np.int64)
    for rank, members in enumerate(CLUSTERS):
        planted[members] = rank
    assert _canonical(gate.proposal.ranks) == _canonical(planted)
    assert gate.held_current.ranks_per_token - gate.held_proposed.ranks_per_token == pytest.approx(P_CLUSTER, abs=0.05)


@pytest.mark.parametrize("k", [2, 3])
def test_pairwise_model_is_exact_for_k2_and_a_lower_bound_above(k):
    rng = np.random.default_rng(k)
    experts = [rng.choice(12, k, replace=False) for _ in range(500)]
    ranks = rng.integers(0, 3, 12)
    exact = ranks_per_token(experts, ranks)
    pairwise = pairwise_ranks_per_token(numpy_coselection(np.array(experts), None, 12), 500, ranks)
    if k == 2:
        assert pairwise == pytest.approx(exact)
    else:
        assert pairwise <= exact + 1e-12 and pairwise < exact  # triples on one rank are counted twice


def test_sizes_are_fixed_to_e_over_r():
    rng = np.random.default_rng(0)
    parts = np.array([0] * 10 + [1] * 4 + [2] * 2)  # an unbalanced METIS answer
    cos = rng.integers(0, 50, (E, E))
    fixed = fix_sizes(parts, cos + cos.T, 4)
    assert sorted(np.bincount(fixed, minlength=4)) == [4, 4, 4, 4] == sorted(rank_sizes(E, 4))
    assert (fixed[10:14] == 1).all()  # part 1 had room for all of its experts: they stay


def test_cli_prints_the_table_and_writes_a_placement_that_attach_reads(planted_dump, tmp_path, capsys):
    out = tmp_path / "placement.json"
    assert cli.main(["placement", str(planted_dump), "--ranks", "4", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "current" in text and "proposed" in text and "held out" in text and "METIS" in text
    doc = json.loads(out.read_text())
    assert doc["ranks"] == 4 and sorted(np.bincount(doc["gates"]["router"])) == [4, 4, 4, 4]
    # the written file is what expert_placement= reads, and --current takes it back
    with moewatch.attach(PlantedRouter(), gates="router", top_k=K, num_experts=E, expert_placement=str(out),
                         background=False) as mon:
        assert mon.placement.ranks["router"].tolist() == doc["gates"]["router"]
    assert cli.main(["placement", str(planted_dump), "--ranks", "4", "--current", str(out)]) == 0
    again = capsys.readouterr().out
    assert "+0.0%" in again or "-0.0%" in again  # the proposal is the placement that runs


@pytest.mark.parametrize("argv, message", [
    (["--ranks", "0"], "positive number of ranks"),
    (["--ranks", "32"], "only 16 experts"),
    (["--ranks", "4", "--max-imbalance", "0.5"], "at least 1"),
    (["--ranks", "4", "--current", "/nonexistent.json"], "does not exist"),
    (["--ranks", "2", "--current", "PLACEMENT4"], "on 4 ranks, not --ranks 2"),
    (["--ranks", "4", "--current", "STRINGS"], "ranks are non-negative integers"),
])
def test_cli_errors_are_one_line_and_exit_2(planted_dump, tmp_path, capsys, argv, message):
    placement = tmp_path / "p4.json"
    placement.write_text(json.dumps({"ranks": 4, "gates": {"router": contiguous(E, 4).tolist()}}))
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps({"ranks": 4, "gates": {"router": ["a"] * E}}))
    argv = [{"PLACEMENT4": str(placement), "STRINGS": str(strings)}.get(a, a) for a in argv]
    assert cli.main(["placement", str(planted_dump), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_cli_on_a_missing_or_foreign_file(tmp_path, capsys):
    assert cli.main(["placement", str(tmp_path / "none.parquet"), "--ranks", "2"]) == 2
    (tmp_path / "foreign.parquet").write_bytes(b"PAR1 not really")
    assert cli.main(["placement", str(tmp_path / "foreign.parquet"), "--ranks", "2"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_dump_with_one_window_cannot_be_held_out(tmp_path):
    model = PlantedRouter()
    with moewatch.attach(model, gates="router", top_k=K, num_experts=E, background=False) as mon:
        model(planted_logits(50, np.random.default_rng(2)))
        mon.flush()
        dump = read_dump(mon.dump(tmp_path / "one.parquet"))
    with pytest.raises(PlacementError, match="at least 2"):
        plan(dump, R)
