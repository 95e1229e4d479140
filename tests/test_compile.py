"""torch.compile(fullgraph=True) with moewatch attached: one graph, exact counts, unchanged outputs.

For tiny real models of the families production serves (and a from-scratch MoE), on Dynamo's
eager backend and on inductor: the compiled model traces into one graph with a ``moewatch``
op per gate call and nothing else of moewatch's, ``torch._dynamo.explain`` finds no graph break
that the model alone does not have, the compiled forwards count exactly what eager forwards
count (padding left out), and the outputs equal those of the compiled model without moewatch.
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter

import numpy as np
import pytest
import torch

import moewatch
from tests.conftest import tiny_mixtral
from tests.hf_zoo import padded_batch, tiny_model
from tests.moe_from_scratch import TinyMoELM

FAMILIES = ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "olmoe", "scratch"]


def _build(family: str):
    """(model, batch, attach options)."""
    batch = padded_batch(seed=3)
    if family == "scratch":
        torch.manual_seed(0)
        model = TinyMoELM(vocab=128).eval()
        return model, batch, dict(gates="blocks.*.router", top_k=2)
    return tiny_model(family), batch, {}


def _output(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


class GraphRecorder:
    """A Dynamo backend that records each graph's moewatch ops and all its op nodes (by target),
    then runs ``inner``."""

    def __init__(self, inner: str):
        self.inner = inner
        self.graphs = []
        self.nodes = []  # per graph: Counter of its op nodes' targets

    def __call__(self, gm, example_inputs):
        self.graphs.append([str(n.target) for n in gm.graph.nodes
                            if n.op == "call_function" and "moewatch" in str(n.target)])
        self.nodes.append(Counter(str(n.target) for n in gm.graph.nodes
                                  if n.op in ("call_function", "call_method", "call_module")))
        if self.inner == "eager":
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)


def _compiled(model, backend: str):
    recorder = GraphRecorder(backend)
    return torch.compile(model, backend=recorder, fullgraph=True), recorder


def test_the_cpu_op_declares_no_mutation_so_inductor_fuses_the_model_as_without_it():
    """A mutating op in the middle of the graph changes inductor's fusion of the model's own
    kernels, and their rounding (seen with AVX-512: outputs 1 ulp off; with AVX2 the same bits by
    luck). The outputs test below shows it only on such a machine; the schema shows it anywhere."""
    from torch._library.utils import is_impure

    import moewatch.hotpath.ops  # noqa: F401  (registers the ops)

    stage = torch.ops.moewatch.stage.default
    assert not stage._schema.is_mutable
    assert is_impure(stage)  # side-effecting: never dropped from a graph


# (Dynamo backend, moewatch's hot path): the staged CPU path on both; the device path (the CUDA
# path's ops, with the torch reference in place of the kernel) on Dynamo's eager backend
CASES = [("eager", "staged"), ("inductor", "staged"), ("eager", "device")]
VIEWS = {"reshape", "view", "flatten"}  # graph nodes that run no kernel on contiguous logits


@pytest.mark.parametrize("backend,hot_path", CASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_fullgraph_compile_counts_exactly_and_leaves_outputs_unchanged(family, backend, hot_path, one_thread):
    model, batch, options = _build(family)
    options = dict(options, backend=hot_path)
    torch._dynamo.reset()
    plain, plain_recorder = _compiled(model, backend)
    with torch.no_grad():
        expected = _output(plain(**batch))
    breaks_alone = torch._dynamo.explain(model)(**batch).graph_break_count
    torch._dynamo.reset()

    mon = moewatch.attach(model, background=False, **options)
    try:
        with torch.no_grad():
            _output(model(**batch))
        eager = mon.counts()
        explained = torch._dynamo.explain(model)(**batch)  # one more (traced) forward
        assert explained.graph_break_count == breaks_alone
        torch._dynamo.reset()
        compiled, recorder = _compiled(model, backend)
        with torch.no_grad():
            first = _output(compiled(**batch))
            second = _output(compiled(**batch))
        got = mon.counts()
        # one graph in all (the root hooks' boundary code compiles no graph of its own), each
        # gate call one op
        gates = len(mon.gates)
        op = "moewatch.stage" if hot_path == "staged" else "moewatch.observe"
        assert recorder.graphs == [[op] * gates]
        # and nothing else: no node of the model's own graph gone, none added but the ops and
        # the views that flatten a custom gate's [B, S, E] logits to [T, E] (no kernel, no copy)
        assert len(plain_recorder.nodes) == 1
        added = recorder.nodes[0] - plain_recorder.nodes[0]
        assert Counter({target: n for target, n in added.items() if target not in VIEWS}) == Counter({op: gates})
        assert plain_recorder.nodes[0] - recorder.nodes[0] == Counter()
        assert torch.equal(first, expected) and torch.equal(second, expected)
        assert mon.error_counts() == {}
        for name, counts in eager.items():
            assert counts.sum() > 0
            np.testing.assert_array_equal(got[name], 4 * counts)  # eager + explain + 2 compiled
        mon.flush()
        tokens = mon.windows().groupby("window")["tokens"].agg(["min", "max"])
        real = int(batch["attention_mask"].sum())
        assert (tokens["min"] == tokens["max"]).all() and int(tokens["max"].sum()) == 4 * real
    finally:
        mon.detach()
        torch._dynamo.reset()


def test_compiled_model_called_inside_a_bigger_compiled_module_stays_one_graph(one_thread):
    """The root hooks are traced into the outer graph (as the forward boundary ops), no break."""
    model = tiny_mixtral(layers=2)
    batch = padded_batch(seed=2)

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits * 2

    mon = moewatch.attach(model, background=False)
    try:
        with torch.no_grad():
            model(**batch)
        eager = mon.counts()
        torch._dynamo.reset()
        compiled, recorder = _compiled(Wrapper(model), "eager")
        with torch.no_grad():
            compiled(**batch)
        assert recorder.graphs == [["moewatch.forward_begin", "moewatch.stage", "moewatch.stage",
                                    "moewatch.forward_end"]]
        got = mon.counts()
        for name in eager:
            np.testing.assert_array_equal(got[name], 2 * eager[name])
    finally:
        mon.detach()
        torch._dynamo.reset()


@pytest.mark.parametrize("order", ["compiled-before-attach", "compiled-while-attached"])
def test_code_compiled_for_another_instance_of_the_class_is_not_reused(order, one_thread):
    """Dynamo compiles per class and by default does not guard on hooks: a graph traced for an
    unmonitored instance must not run for the monitored one (outputs right, monitor blind),
    and after detach the monitored instance's graph must stop calling the gate ops."""
    torch._dynamo.reset()
    plain = tiny_mixtral(layers=2)
    watched = copy.deepcopy(plain)
    batch = padded_batch(seed=2)
    per_forward = int(batch["attention_mask"].sum()) * 2  # top-2 assignments of real tokens
    recorder = GraphRecorder("eager")
    run_plain = torch.compile(plain, backend=recorder, fullgraph=True)
    run_watched = torch.compile(watched, backend=recorder, fullgraph=True)
    try:
        with torch.no_grad():
            if order == "compiled-before-attach":
                expected = _output(run_plain(**batch))
            mon = moewatch.attach(watched, background=False)
            if order == "compiled-while-attached":
                expected = _output(run_plain(**batch))
            assert torch.equal(_output(run_watched(**batch)), expected)
            assert recorder.graphs[-1] == ["moewatch.stage"] * 2
            assert torch.equal(_output(run_plain(**batch)), expected)  # the plain one is not counted
            assert {name: int(c.sum()) for name, c in mon.counts().items()} == {
                "model.layers.0.mlp.gate": per_forward, "model.layers.1.mlp.gate": per_forward}
            mon.detach()
            graphs = len(recorder.graphs)
            assert torch.equal(_output(run_watched(**batch)), expected)
            assert len(recorder.graphs) == graphs + 1 and recorder.graphs[-1] == []  # re-traced bare
        assert mon.error_counts() == {}
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("how", ["torch.compile", "module.compile", "forward"])
def test_attaching_to_an_already_compiled_model_warns(how, one_thread):
    model = tiny_mixtral(layers=1)
    if how == "torch.compile":
        target = torch.compile(model, backend="eager")
    elif how == "module.compile":
        model.compile(backend="eager")
        target = model
    else:
        model.model.forward = torch.compile(model.model.forward, backend="eager")
        target = model
    with pytest.warns(UserWarning, match="Attach before compiling"):
        mon = moewatch.attach(target, background=False)
    assert [g.name for g in mon.gates] == ["model.layers.0.mlp.gate"]
    mon.detach()
    torch._dynamo.reset()


def test_attaching_to_an_uncompiled_model_does_not_warn(one_thread):
    model = tiny_mixtral(layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon = moewatch.attach(model, background=False)
    mon.detach()
