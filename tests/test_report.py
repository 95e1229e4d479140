"""An injected router collapse: the automatic dump is written, and ``moewatch report`` names
the collapsed gate and its experts, against the baseline. Bad files exit with code 2."""
import os

import pandas as pd
import pytest
import torch

import moewatch
from moewatch.cli import main
from moewatch.dump import read_dump
from tests.conftest import tiny_mixtral, until_first_verdict

COLLAPSING = "model.layers.1.mlp.gate"
HEALTHY = "model.layers.0.mlp.gate"
OFFSET_DIM = 0  # a hidden dimension every token carries; the injected fault routes on it


def _model():
    """Tiny Mixtral whose tokens all share one positive hidden dimension the routers ignore."""
    model = tiny_mixtral(seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(std=1.0)
        model.model.embed_tokens.weight[:, OFFSET_DIM] += 4.0
        for layer in model.model.layers:
            layer.mlp.gate.weight[:, OFFSET_DIM] = 0.0
    return model


def _inject_collapse(model) -> None:
    """Router weights that read the shared dimension: every token goes to experts 3 and 5."""
    gate = model.get_submodule(COLLAPSING)
    with torch.no_grad():
        gate.weight[3, OFFSET_DIM] = 30.0
        gate.weight[5, OFFSET_DIM] = 25.0


@pytest.fixture(scope="module")
def incident(tmp_path_factory):
    folder = tmp_path_factory.mktemp("incident")
    model = _model()
    gen = torch.Generator().manual_seed(0)

    def window(mon):
        with torch.no_grad():
            model(torch.randint(0, 128, (2, 32), generator=gen))
        return mon.flush()

    recorder = moewatch.attach(model, background=False)
    for _ in range(8):
        window(recorder)
    baseline = recorder.baseline()
    recorder.detach()

    mon = moewatch.attach(model, baseline=baseline, background=False, sample_decisions=0.25,
                          dump_dir=str(folder / "dumps"))
    warm = until_first_verdict(lambda: window(mon))
    verdicts = [window(mon).severity for _ in range(3)]
    _inject_collapse(model)
    verdicts += [window(mon).severity for _ in range(3)]
    listing_before_exit = sorted(os.listdir(folder / "dumps"))
    mon.detach()
    return {"folder": folder, "mon": mon, "verdicts": verdicts, "before_exit": listing_before_exit, "warm": warm}


def _collapse_dump(incident) -> str:
    (name,) = [n for n in incident["before_exit"] if "collapse" in n]
    return str(incident["folder"] / "dumps" / name)


def test_injected_collapse_writes_one_automatic_dump(incident):
    verdicts = incident["verdicts"]
    assert verdicts[:3] == ["ok"] * 3 and "collapse" in verdicts[3:]
    first = incident["warm"] + verdicts.index("collapse")  # the window's index
    # one dump on the first collapse (not one per collapsed window), then the shutdown dump
    assert len(incident["before_exit"]) == 1 and "collapse" in incident["before_exit"][0]
    assert COLLAPSING.replace(".", "_") in incident["before_exit"][0]
    after = sorted(os.listdir(incident["folder"] / "dumps"))
    assert len(after) == 2 and any(n.endswith("-shutdown.parquet") for n in after)

    dump = read_dump(_collapse_dump(incident))
    assert dump.metadata["reason"] == "collapse"
    assert dump.metadata["trigger"] == {"window": first, "gates": [COLLAPSING]}
    assert dump.windows["window"].max() == first  # the ring up to the incident, nothing after
    assert sorted(dump.metadata["baseline"]["gates"][i]["name"] for i in range(2)) == sorted([HEALTHY, COLLAPSING])
    incident_decisions = dump.decisions[(dump.decisions["gate"] == COLLAPSING) & (dump.decisions["window"] == first)]
    assert len(incident_decisions) > 0
    assert all(sorted(e.tolist()) == [3, 5] for e in incident_decisions["experts"])
    assert incident["mon"].error_counts().get("dump", 0) == 0


def test_report_names_the_collapsed_gate_and_experts(incident, tmp_path, capsys):
    out = tmp_path / "pictures"
    assert main(["report", _collapse_dump(incident), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    timeline = text.split("Health timeline")[1].split("Worst gates")[0]
    assert f"window 0-{incident['warm'] + 2}: ok" in timeline
    assert f"COLLAPSE  {COLLAPSING} collapse" in timeline
    worst = text.split("Worst gates")[1].split("\n")
    assert worst[2].split()[:2] == [COLLAPSING, "collapse"]  # first row of the table
    experts = text.split("Worst experts")[1].split("Against the baseline")[0]
    assert "expert 3: 50.0% of assignments, chosen by 100% of tokens" in experts
    assert "expert 5: 50.0% of assignments" in experts
    assert "dead: experts 0-2, 4, 6-7" in experts
    against = text.split("Against the baseline")[1].split("Plots")[0]
    assert COLLAPSING in against and "effective experts 2 (baseline median" in against
    assert HEALTHY not in against
    names = sorted(os.listdir(out))
    assert names == sorted(["effective_experts.png", "entropy_logit_std.png",
                            f"load_{HEALTHY}.png", f"load_{COLLAPSING}.png"])
    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_report_of_a_dump_without_baseline(tmp_path, capsys):
    model = tiny_mixtral(seed=2, layers=1)
    with moewatch.attach(model, background=False) as mon:
        with torch.no_grad():
            model(torch.randint(0, 128, (2, 16)))
        mon.flush()
        path = mon.dump(tmp_path / "plain.parquet")
    assert main(["report", str(path), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "baseline: none" in text and "no baseline in this dump" in text
    assert "model.layers.0.mlp.gate" in text and "Plots" not in text


@pytest.mark.parametrize("case", ["truncated", "foreign", "garbage", "missing", "empty"])
def test_bad_dump_exits_2_with_a_message(incident, tmp_path, capsys, case):
    path = tmp_path / f"{case}.parquet"
    good = open(_collapse_dump(incident), "rb").read()
    if case == "truncated":
        path.write_bytes(good[: len(good) - 300])
    elif case == "foreign":
        pd.DataFrame({"x": [1.0]}).to_parquet(path)
    elif case == "garbage":
        path.write_bytes(b"hello, I am not parquet\n" * 40)
    elif case == "empty":
        path.write_bytes(b"")
    out = tmp_path / "never"
    assert main(["report", str(path), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    message = captured.err
    assert message.startswith("moewatch report: ") and str(path) in message
    expected = {"truncated": "not a readable Parquet file", "foreign": "not a moewatch dump",
                "garbage": "not a readable Parquet file", "missing": "no such file",
                "empty": "not a readable Parquet file"}[case]
    assert expected in message
    assert not out.exists()
