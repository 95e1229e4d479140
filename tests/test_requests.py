"""The requests behind a window: the root forwards' token rows, which the detector weighs a
window's evidence by (a transformers batch row is one request, and its tokens route alike)."""
from __future__ import annotations

import json
import math
import threading
import warnings

import numpy as np
import pytest
import torch

import moewatch
from moewatch.baseline import Baseline
from moewatch.detector import BaselineDetector
from tests.tiny_models import tiny_mixtral


def _rows(shapes):
    """The expected Window.rows of forwards of these [B, L] shapes."""
    return np.array([sum(b * l for b, l in shapes), sum(b * l * l for b, l in shapes)], dtype=float)


def _windows(model, mon, count: int, shape) -> None:
    """``count`` windows of one forward of random ids of ``shape`` each."""
    with torch.no_grad():
        for _ in range(count):
            model(torch.randint(0, 128, shape))
            mon.flush()


def _requests(shapes):
    tokens, squares = _rows(shapes)
    return tokens * tokens / squares


@pytest.mark.parametrize("backend", ["staged", "device"])
def test_a_window_counts_the_rows_of_its_forwards(backend):
    model = tiny_mixtral()
    with moewatch.attach(model, background=False, backend=backend) as mon, torch.no_grad():
        model(torch.randint(0, 128, (3, 7)))
        model(input_ids=torch.randint(0, 128, (1, 20)), attention_mask=torch.ones(1, 20, dtype=torch.long))
        mon.flush()
        model(inputs_embeds=torch.randn(4, 5, model.config.hidden_size))
        mon.flush()
        windows = list(mon._ring)
        frame = mon.windows()
    np.testing.assert_allclose(windows[0].rows, _rows([(3, 7), (1, 20)]))
    np.testing.assert_allclose(windows[1].rows, _rows([(4, 5)]))
    assert windows[1].requests == pytest.approx(4.0)
    assert frame.groupby("window")["requests"].nunique().eq(1).all()  # one value for every gate
    assert frame[frame.window == 0]["requests"].iloc[0] == pytest.approx(_requests([(3, 7), (1, 20)]))


@pytest.mark.parametrize("backend", ["staged", "device"])
def test_decode_steps_grow_the_requests_of_their_prompt(backend):
    """generate() with a cache: each decode step's mask spans the past tokens too, so its rows
    continue the prompt's rows. Two requests decoding are two requests, not one per step."""
    model = tiny_mixtral()
    with moewatch.attach(model, background=False, backend=backend) as mon, torch.no_grad():
        model.generate(torch.randint(0, 128, (2, 5)), attention_mask=torch.ones(2, 5, dtype=torch.long),
                       max_new_tokens=4, do_sample=False, min_new_tokens=4)
        mon.flush()
        first = mon._ring[-1]
        # a new prompt is new requests, and a window cut mid-generation counts from 0 anew
        model(torch.randint(0, 128, (3, 4)))
        model(torch.randint(0, 128, (3, 1)), attention_mask=torch.ones(3, 5, dtype=torch.long))
        mon.flush()
        model(torch.randint(0, 128, (3, 1)), attention_mask=torch.ones(3, 6, dtype=torch.long))
        mon.flush()
        second, third = mon._ring[-2], mon._ring[-1]
    # the prompt (2 rows of 5), then three steps of 2 rows of 1 (the last new token is not fed
    # back): 2 rows of 8 tokens
    np.testing.assert_allclose(first.rows, [16.0, 2 * 8.0 ** 2])
    assert first.tokens[0] == 16 and first.requests == pytest.approx(2.0)
    np.testing.assert_allclose(second.rows, [15.0, 3 * 5.0 ** 2])
    np.testing.assert_allclose(third.rows, [3.0, 3.0])


@pytest.mark.parametrize("backend", ["staged", "device"])
@pytest.mark.parametrize("how", ["assisted", "prompt_lookup", "chunked_prefill", "next_turn"])
def test_several_new_tokens_on_a_cache_go_on_with_its_request(backend, how):
    """A forward of several new tokens a row on a cache that holds tokens continues the cached
    requests: assisted generation's and prompt lookup's candidates, a prompt prefilled in chunks,
    a conversation's next turn on the same cache. generate() passes no mask there, so only the
    cache says so; each such forward counted as new requests before (3.1 to 5.6 requests for 2)."""
    from transformers import DynamicCache

    model = tiny_mixtral()
    model.generation_config.pad_token_id = 0
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]])  # repeats: prompt lookup finds candidates
    options = {"assisted": {"assistant_model": tiny_mixtral(seed=1, layers=1)},
               "prompt_lookup": {"prompt_lookup_num_tokens": 3},
               "chunked_prefill": {"prefill_chunk_size": 4}}
    multi_token_forwards = []
    probe = model.register_forward_pre_hook(
        lambda module, args, kwargs: multi_token_forwards.append(kwargs["input_ids"].shape[1] > 1
                                                                 and kwargs["past_key_values"].get_seq_length() > 0),
        with_kwargs=True)
    with moewatch.attach(model, background=False, backend=backend) as mon, torch.no_grad():
        for _ in range(2):  # two requests, one after the other
            if how == "next_turn":
                cache = DynamicCache(config=model.config)
                model(input_ids=prompt, past_key_values=cache)
                model(input_ids=torch.tensor([[9, 10, 11]]), past_key_values=cache)
            else:
                model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5,
                               do_sample=False, **options[how])
        mon.flush()
        window = mon._ring[-1]
    probe.remove()
    assert any(multi_token_forwards)  # the case is exercised: several new tokens on a filled cache
    tokens = window.tokens[0]
    # two requests of equal length, whatever the candidates rejected added to each
    np.testing.assert_allclose(window.rows, [tokens, 2 * (tokens / 2) ** 2])
    assert window.requests == pytest.approx(2.0)


def test_compiled_fullgraph_forwards_count_their_rows():
    model = tiny_mixtral()
    with moewatch.attach(model, background=False) as mon, torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)
        compiled(torch.randint(0, 128, (2, 9)))
        compiled(torch.randint(0, 128, (2, 9)))
        mon.flush()
        window = mon._ring[-1]
    np.testing.assert_allclose(window.rows, _rows([(2, 9)] * 2))
    assert window.requests == pytest.approx(4.0)


@pytest.mark.parametrize("backend", ["staged", "device"])
def test_a_model_called_inside_a_bigger_compiled_function_counts_its_rows(backend):
    """The root hooks are traced into the outer graph: the rows go into the forward_begin op as
    the input's (symbolic) shape, so batches of other shapes are counted by the same graph."""
    model = tiny_mixtral()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with moewatch.attach(model, background=False, backend=backend) as mon, torch.no_grad():
        @torch.compile(fullgraph=True, dynamic=True, backend="eager")
        def step(input_ids, attention_mask):
            return model(input_ids=input_ids, attention_mask=attention_mask).logits * 2

        shapes = [(2, 9), (3, 5), (4, 12)]  # no size 1: Dynamo specialises sizes 0 and 1
        for batch, length in shapes:
            step(torch.randint(0, 128, (batch, length)), torch.ones(batch, length, dtype=torch.long))
        mon.flush()
        window = mon._ring[-1]
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    np.testing.assert_allclose(window.rows, _rows(shapes))
    assert frames == 1  # one graph for every shape: the rows did not specialise it


@pytest.mark.parametrize("backend", ["staged", "device"])
def test_forwards_on_many_threads_are_each_counted_once(backend):
    model = tiny_mixtral()
    shapes = {i: (1 + i % 3, 4 + i) for i in range(6)}
    with moewatch.attach(model, background=False, backend=backend) as mon, torch.no_grad():
        barrier = threading.Barrier(len(shapes))

        def run(i):
            barrier.wait()
            for _ in range(3):
                model(torch.randint(0, 128, shapes[i]))

        threads = [threading.Thread(target=run, args=(i,)) for i in shapes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        mon.flush()
        total = sum(w.rows for w in mon._ring)
        tokens = sum(w.tokens[0] for w in mon._ring)
    np.testing.assert_allclose(total, _rows([s for s in shapes.values() for _ in range(3)]))
    assert tokens == total[0]


@pytest.mark.parametrize("backend", ["staged", "device"])
def test_a_forward_nested_in_another_counts_the_outer_rows_once(backend):
    # the root's pre-hook calls the model again once: the nested forward's rows are the outer one's
    model = tiny_mixtral()
    nested = []

    def call_again(module, args, kwargs):
        if not nested:
            nested.append(True)
            module(torch.randint(0, 128, (2, 3)))

    with moewatch.attach(model, background=False, backend=backend) as mon, torch.no_grad():
        handle = model.register_forward_pre_hook(call_again, with_kwargs=True)
        try:
            model(torch.randint(0, 128, (3, 7)))
            model(torch.randint(0, 128, (1, 4)))
        finally:
            handle.remove()
        mon.flush()
        total = sum(w.rows for w in mon._ring)
        tokens = sum(w.tokens[0] for w in mon._ring)
    assert nested == [True]
    np.testing.assert_allclose(total, _rows([(3, 7), (1, 4)]))
    assert tokens == 2 * 3 + 3 * 7 + 4  # the nested forward's gates route their tokens


def test_a_baseline_keeps_the_requests_and_one_without_them_still_loads(tmp_path):
    model = tiny_mixtral()
    with moewatch.attach(model, background=False) as mon:
        _windows(model, mon, 10, (4, 16))
        baseline = mon.baseline()
        gates = mon.gates
    path = tmp_path / "baseline.json"
    baseline.save(path)
    loaded = Baseline.load(path)
    for gate in loaded.gates.values():
        np.testing.assert_allclose(gate.series["requests"], 4.0)
    detector = BaselineDetector(gates, loaded, 100_000, 2)
    assert np.allclose(detector.params["requests_floor"], 4.0)
    # a file written before the requests were kept: read as before, the evidence rule counts no requests
    data = json.loads(path.read_text())
    for gate in data["gates"]:
        del gate["per_window"]["requests"]
    path.write_text(json.dumps(data))
    old = Baseline.load(path)
    assert all("requests" not in g.series for g in old.gates.values())
    assert np.isnan(BaselineDetector(gates, old, 100_000, 2).params["requests_floor"]).all()
    # ... and attaching with it says what that costs, where attaching with the new one is silent
    assert loaded.gates[gates[0].name].requests_known and not old.gates[gates[0].name].requests_known
    with pytest.warns(UserWarning, match="the baseline holds no request counts.*Record the baseline again"):
        moewatch.attach(model, baseline=old, background=False).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moewatch.attach(model, baseline=loaded, background=False).detach()


def test_a_bad_requests_series_is_refused_by_name(tmp_path):
    model = tiny_mixtral()
    with moewatch.attach(model, background=False) as mon:
        _windows(model, mon, 8, (2, 8))
        baseline = mon.baseline()
    path = tmp_path / "baseline.json"
    baseline.save(path)
    data = json.loads(path.read_text())
    data["gates"][0]["per_window"]["requests"] = [-1.0] * 8
    path.write_text(json.dumps(data))
    with pytest.raises(moewatch.BaselineError, match=r"per_window\.requests"):
        Baseline.load(path)


def test_unknown_rows_give_nan_not_a_guess():
    from moewatch.windows import effective_requests

    assert math.isnan(effective_requests(np.zeros(2)))
    assert effective_requests(np.array([2048.0, 2048.0 ** 2])) == pytest.approx(1.0)


def test_baseline_show_says_whether_the_requests_were_counted(tmp_path, capsys):
    from moewatch.cli_baseline import print_summary

    model = tiny_mixtral()
    with moewatch.attach(model, background=False) as mon:
        _windows(model, mon, 8, (3, 8))
        baseline = mon.baseline()
    print_summary(baseline)
    assert "requests per window (batch rows, or the engine's requests): median 3.0" in capsys.readouterr().out
    for gate in baseline.gates.values():
        del gate.series["requests"]
    print_summary(baseline)
    assert "requests per window: not counted" in capsys.readouterr().out


def test_a_dump_written_before_the_requests_were_kept_is_read_and_builds_a_baseline(tmp_path):
    import pyarrow.parquet as pq

    model = tiny_mixtral()
    with moewatch.attach(model, background=False) as mon:
        _windows(model, mon, 9, (2, 8))
        mon.dump(str(tmp_path / "new.parquet"))
    table = pq.read_table(tmp_path / "new.parquet")
    meta = json.loads(table.schema.metadata[b"moewatch"])
    assert meta["window_columns"][-1] == "requests"
    meta["window_columns"] = meta["window_columns"][:-1]
    old = table.drop(["requests"]).replace_schema_metadata(
        {**table.schema.metadata, b"moewatch": json.dumps(meta).encode()})
    pq.write_table(old, tmp_path / "old.parquet")
    frame = moewatch.read_dump(str(tmp_path / "old.parquet")).windows
    assert "requests" not in frame.columns and len(frame) == 18
    baseline = Baseline.from_frame(frame)
    assert all("requests" not in g.series for g in baseline.gates.values())


def test_a_failure_to_count_rows_is_recorded_and_the_forward_goes_on():
    model = tiny_mixtral()
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        expected = model(ids).logits
    with moewatch.attach(model, background=False, backend="device") as mon, torch.no_grad():
        mon._banks.banks[0]._row_tokens = None  # its add_ raises
        out = model(ids).logits
        mon.flush()
        errors = mon.error_counts()
        window = mon._ring[-1]
    assert torch.equal(out, expected)
    assert sum(errors.values()) >= 1, errors
    assert window.tokens[0] == 12  # the routing is still counted
