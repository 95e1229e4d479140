"""The test side of the vLLM engine runs, imported in every engine process (``tests/vllm_child.py``).

Independently of moewatch, each router's own routing is recorded: its ``_compute_routing`` is
wrapped (when the worker loads the model, before vLLM compiles) to hand its expert ids to a
test op, ``moewatch_test::record``, whose implementation keeps them at run time, without
vLLM's padding rows. Recording starts once the engine is up (:func:`arm`), after its warm-up.

The functions taking ``worker`` run inside vLLM's worker through ``LLM.collective_rpc``; they
live in this module (imported by name there) so that they see the worker's own recordings.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Dict, List

import torch

RECORDED: Dict[int, List[torch.Tensor]] = {}
GATHERED: Dict[int, List[torch.Tensor]] = {}  # data parallel: every DP rank's rows the router saw
SCHEDULED: List[Dict[str, int]] = []  # per step with a forward: request id -> its tokens there
GRAPH_OPS: List[Dict[str, int]] = []  # per graph Dynamo traced: its op nodes, by target
STATE = {"armed": False, "rows": 0}

_LIB = torch.library.Library("moewatch_test", "DEF")
_LIB.define("record(Tensor ids, Tensor(a!) tick, int layer) -> ()")
_TICK = torch.zeros(1, dtype=torch.int64)


def _record_impl(ids, tick, layer):
    if not STATE["armed"]:
        return
    from vllm.forward_context import get_forward_context, is_forward_context_available

    rows = ids
    if is_forward_context_available():
        rows = _this_ranks_rows(ids, get_forward_context(), layer)
        padding = get_forward_context().is_padding
        if padding is not None:
            rows = rows[torch.logical_not(padding[: rows.shape[0]])]
    RECORDED.setdefault(layer, []).append(rows.to(torch.int64).clone())


def _this_ranks_rows(ids, context, layer: int):
    """With data parallelism, vLLM's naive dispatch gathers every DP rank's tokens, in rank
    order, before routing (where the MoE kernel does not dispatch itself after routing): the
    router's ids then cover them all. Keep those (``GATHERED``) and return this rank's rows,
    placed by vLLM's own ``dp_metadata``; ids of this rank's tokens alone are returned as they are."""
    metadata = getattr(context, "dp_metadata", None)
    if metadata is None:
        return ids
    from vllm.distributed import parallel_state

    sizes = metadata.local_sizes or metadata.num_tokens_across_dp_cpu.tolist()
    rank = parallel_state.get_dp_group().rank_in_group
    STATE.setdefault("dp_calls", []).append((list(sizes), int(ids.shape[0])))
    if sum(sizes) != ids.shape[0] or len(sizes) == 1:
        return ids
    GATHERED.setdefault(layer, []).append(ids.to(torch.int64).clone())
    start = sum(sizes[:rank])
    return ids[start:start + sizes[rank]]


_LIB.impl("record", _record_impl, "CompositeExplicitAutograd")
torch.library.register_fake("moewatch_test::record", lambda ids, tick, layer: None, lib=_LIB)


def _wrap_router(router, layer: int) -> None:
    compute = router._compute_routing

    def compute_routing(*args, **kwargs):
        weights, ids = compute(*args, **kwargs)
        torch.ops.moewatch_test.record(ids, _TICK, layer)
        return weights, ids

    router._compute_routing = compute_routing


def _op_name(target) -> str:
    if isinstance(target, (str, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)  # a method's name; "moewatch.stage"
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', target)}"


def _op_counts(graph) -> Dict[str, int]:
    """How many nodes of a traced graph call each function, method or module (by target)."""
    counts: Dict[str, int] = {}
    for node in graph.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            name = _op_name(node.target)
            counts[name] = counts.get(name, 0) + 1
    return counts


def _record_graphs() -> None:
    """Keep the op counts of every graph Dynamo traces, as it hands it to the compiler (vLLM's
    backend, or on the CPU inductor or Dynamo's eager backend directly)."""
    from torch._dynamo.output_graph import OutputGraph

    compile_graph = OutputGraph.call_user_compiler

    def call_user_compiler(self, gm, *args, **kwargs):
        GRAPH_OPS.append(_op_counts(gm))
        return compile_graph(self, gm, *args, **kwargs)

    OutputGraph.call_user_compiler = call_user_compiler


def install() -> None:
    """Wrap every router of a model a worker loads; record every graph Dynamo traces (once per process)."""
    if STATE.get("installed"):
        return
    STATE["installed"] = True
    _record_graphs()
    from vllm.v1.worker.gpu_worker import Worker

    load = Worker.load_model

    def load_model(self, *args, **kwargs):
        out = load(self, *args, **kwargs)
        from moewatch.engines.vllm import moe_layers

        for index, (name, layer) in enumerate(moe_layers(self.model_runner.get_model())):
            _wrap_router(layer.router, index)
        return out

    Worker.load_model = load_model
    execute = Worker.execute_model

    def execute_model(self, scheduler_output, *args, **kwargs):
        if STATE["armed"] and scheduler_output.total_num_scheduled_tokens > 0:
            SCHEDULED.append(dict(scheduler_output.num_scheduled_tokens))
            # the scheduler's own account: requests it preempted (their tokens run again when
            # they resume), and prompt tokens a new request found in the prefix cache (never run)
            STATE["preempted"] = STATE.get("preempted", 0) + len(getattr(scheduler_output, "preempted_req_ids", None)
                                                                  or ())
            STATE["cached"] = STATE.get("cached", 0) + sum(
                r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs)
            # draft tokens a speculative decoder proposed for this step (verified by this forward)
            STATE["drafts"] = STATE.get("drafts", 0) + sum(
                len(drafts) for drafts in (getattr(scheduler_output, "scheduled_spec_decode_tokens", None) or {}).values())
        return execute(self, scheduler_output, *args, **kwargs)

    Worker.execute_model = execute_model
    _count_forward_marks()


def _count_forward_marks() -> None:
    """Count, once armed, the forwards begun by the model's root hooks and by the worker's steps
    (``VllmEngine.drive_steps``)."""
    from moewatch.hotpath.banks import Banks

    for method, key in (("begin", "hook_forwards"), ("begin_step", "step_forwards")):
        original = getattr(Banks, method)

        def counted(self, *args, _original=original, _key=key, **kwargs):
            if STATE["armed"]:
                STATE[_key] = STATE.get(_key, 0) + 1
            return _original(self, *args, **kwargs)

        setattr(Banks, method, counted)


def arm(worker) -> bool:
    """Run in the worker once the engine is up: its warm-up forwards are over; record from now on."""
    STATE["armed"] = True
    return True


def reset() -> None:
    """Forget what was recorded (in-process engines: the engine closed, another one follows)."""
    STATE["armed"] = False
    for kept in (RECORDED, GATHERED, SCHEDULED):
        kept.clear()


def _expert_map_calls() -> int:
    """Experts-kernel calls that came with an expert map (``tests/vllm_ep_experts.py``; 0 where it
    was not installed)."""
    import vllm_ep_experts

    return int(vllm_ep_experts.STATE["mapped_calls"])


def worker_report(worker) -> dict:
    """Run in the worker: recorded counts, moewatch's counts, its verdict and gates."""
    from moewatch.engines.vllm_plugin import monitors

    model = worker.model_runner.get_model()
    from moewatch.engines.vllm import moe_layers

    layers = moe_layers(model)
    experts = [int(layer.moe_config.num_logical_experts) for _, layer in layers]
    recorded, gathered = {}, {}
    for index, (name, _) in enumerate(layers):
        ids = RECORDED.get(index, [])
        flat = torch.cat(ids).reshape(-1) if ids else torch.zeros(0, dtype=torch.int64)
        recorded[name] = torch.bincount(flat, minlength=experts[index]).tolist()
        if GATHERED:
            every = torch.cat(GATHERED.get(index, [])).reshape(-1)
            gathered[name] = torch.bincount(every, minlength=experts[index]).tolist()
    from torch._dynamo.utils import counters

    from vllm.distributed import parallel_state

    groups = {label: getattr(parallel_state, name, None) for label, name in
              (("tp", "_TP"), ("pp", "_PP"), ("dp", "_DP"), ("ep", "_EP"))}
    report = {"recorded": recorded, "gathered": gathered, "rank": int(getattr(worker, "rank", 0)),
              "vllm_ranks": {label: group.rank_in_group for label, group in groups.items() if group is not None},
              "local_rank": int(getattr(worker, "local_rank", 0)),
              "dp_calls": STATE.get("dp_calls", [])[:64],  # (DP ranks' token counts, rows routed here)
              "scheduled_tokens": sum(sum(step.values()) for step in SCHEDULED),  # tokens the model ran
              "scheduled_by_request": _tokens_by_request(),
              "preempted": STATE.get("preempted", 0), "prefix_cached": STATE.get("cached", 0),
              "draft_tokens": STATE.get("drafts", 0),
              "steps": len(SCHEDULED),  # steps with a forward, once armed
              # forwards begun once armed: by the root module's hooks, by the worker's steps
              "hook_forwards": STATE.get("hook_forwards", 0), "step_forwards": STATE.get("step_forwards", 0),
              "graph_breaks": sum(counters["graph_break"].values()),
              # per layer: the experts this worker holds (E / ranks under expert parallelism)
              "local_experts": [int(layer.moe_config.num_local_experts) for _, layer in layers],
              "layers": [name for name, _ in layers],
              # layers whose router calls moewatch's capture (the plugin's seam, installed at attach)
              "captured": sum(layer.router.capture_fn is not None for _, layer in layers),
              "expert_map_calls": _expert_map_calls(),
              "unique_graphs": int(counters["stats"]["unique_graphs"]),
              "graph_ops": GRAPH_OPS}
    mons = monitors()
    if mons:
        mon = mons[0]
        mon.flush()
        report["counts"] = {g: c.tolist() for g, c in mon.counts().items()}
        report["parallel_ranks"] = dict(mon.parallel_ranks)
        report["gates"] = [{"name": g.name, "num_experts": g.num_experts, "top_k": g.top_k,
                            "scoring": g.scoring, "notes": g.notes} for g in mon.gates]
        report["errors"] = mon.error_counts()
        report["health"] = str(mon.health())
        report["severity"] = mon.health().severity
        report["monitoring"] = mon.health().monitoring
        frame = mon.windows()
        report["windows"] = [[int(w), int(t)] for w, t in zip(frame["window"], frame["tokens"])]
        report["requests_known"] = bool(frame["requests"].notna().any())
        report["requests"] = _requests_by_window(frame)
    return report


def _tokens_by_request() -> Dict[str, int]:
    """The tokens the model ran for each request (the scheduler's id), over every step."""
    totals: Dict[str, int] = {}
    for step in SCHEDULED:
        for request, count in step.items():
            totals[request] = totals.get(request, 0) + count
    return totals


def _requests_by_window(frame) -> list:
    """Per window: [tokens, moewatch's requests, the requests recounted from the steps the
    scheduler ran], the steps split where the windows' tokens say (a window holds whole steps)."""
    windows = frame.groupby("window").agg(tokens=("tokens", "max"), requests=("requests", "first"))
    steps, out = iter(SCHEDULED), []
    for tokens, requests in zip(windows["tokens"], windows["requests"]):
        per_request: Dict[str, int] = {}
        while sum(per_request.values()) < tokens:
            step = next(steps, None)
            if step is None:
                break
            for request, count in step.items():
                per_request[request] = per_request.get(request, 0) + count
        total, squares = sum(per_request.values()), sum(t * t for t in per_request.values())
        recount = total * total / squares if total == tokens and squares else None  # None: steps do not fit
        out.append([int(tokens), None if requests != requests else float(requests), recount])
    return out


def fault_drill(worker) -> dict:
    """Run in the worker (eager engines): a two-expert collapse on every gate, then removed."""
    from moewatch import faults

    model = worker.model_runner.get_model()
    fault = faults.two_expert_collapse(model, experts=(0, 1), strength=4.0)
    worker._moewatch_drill = fault
    return {"gates": fault.gates}


def end_drill(worker) -> dict:
    fault = worker._moewatch_drill
    fault.remove()
    return {"active": fault.active}


def detach(worker) -> dict:
    """Run in the worker: detach the plugin's monitor; what is left on the routers and gates."""
    from moewatch.engines.vllm import moe_layers, find_gate
    from moewatch.engines.vllm_plugin import monitors

    for mon in monitors():
        mon.detach()
    model = worker.model_runner.get_model()
    left = 0
    for name, layer in moe_layers(model):
        _, gate = find_gate(model, name, layer, int(layer.moe_config.num_logical_experts))
        left += int(layer.router.capture_fn is not None) + len(gate._forward_hooks)
    return {"monitors": len(monitors()), "hooks_left": left + len(model._forward_hooks) +
            len(model._forward_pre_hooks)}


QUIET_WINDOW = 384  # tokens: 16 requests of 24, or one request of 384


def quiet_start(worker) -> bool:
    """Run in the worker: a monitor attached by hand (its engine's steps name their requests)
    that records a baseline from the traffic that follows."""
    from moewatch.engines.vllm import attach

    worker._moewatch_quiet = attach(worker.model_runner.get_model(), window_tokens=QUIET_WINDOW, background=False)
    return True


def quiet_switch(worker) -> dict:
    """Run in the worker: the baseline of the windows so far; a monitor judging against it, and
    what it said of every window it closed."""
    from moewatch.engines.vllm import attach

    recorder = worker._moewatch_quiet
    baseline = recorder.baseline()
    requests = recorder.windows().groupby("window")["requests"].first().tolist()
    recorder.detach()
    mon = attach(worker.model_runner.get_model(), baseline, window_tokens=QUIET_WINDOW, background=False)
    mon.verdicts = []
    mon.add_listener(lambda window, health: mon.verdicts.append(
        [window.index, window.requests, health.severity, health.waiting, health.note]))
    worker._moewatch_quiet = mon
    return {"baseline_requests": requests}


def quiet_report(worker) -> dict:
    mon = worker._moewatch_quiet
    mon.flush()
    verdicts = mon.verdicts
    mon.detach()
    return {"verdicts": verdicts, "errors": mon.error_counts()}


def late_attach(worker) -> dict:
    """Run in the worker of an engine compiled without moewatch: attaching now must warn."""
    import warnings

    from moewatch.engines.vllm import EngineAttachWarning, attach, compiled_already

    model = worker.model_runner.get_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = attach(model, background=False)
    mon.detach()
    return {"compiled": compiled_already(model),
            "warned": [str(w.message) for w in caught if issubclass(w.category, EngineAttachWarning)]}


def padding_seen(worker) -> dict:
    """Run in the worker: the real-token mask moewatch reads from a forward context of vLLM's
    that marks the last 3 of 8 rows as padding (as vLLM does for a batch padded to a captured
    size), and before the plugin armed the monitor (warm-up: nothing is real)."""
    from vllm.forward_context import set_forward_context

    from moewatch.engines.vllm import engine_of

    engine = engine_of(worker.model_runner.get_model())
    padding = torch.tensor([False] * 5 + [True] * 3)
    with set_forward_context(None, worker.vllm_config, num_tokens=8, is_padding=padding):
        armed = engine.real_tokens((), {}).tolist()
    with set_forward_context(None, worker.vllm_config, num_tokens=8, is_padding=torch.zeros(8, dtype=torch.bool)):
        unpadded = engine.real_tokens((), {})  # None: every row real, no mask to apply
    # the same forwards where the worker's step is known: 5 scheduled tokens in 8 rows, then 8 in 8
    step = SimpleNamespace(num_scheduled_tokens={"a": 2, "b": 3}, finished_req_ids=())
    engine.schedule(step)
    with set_forward_context(None, worker.vllm_config, num_tokens=8, is_padding=padding):
        scheduled_armed = engine.real_tokens((), {}).tolist()
    engine.requests()
    engine.schedule(SimpleNamespace(num_scheduled_tokens={"a": 5, "b": 3}, finished_req_ids=()))
    with set_forward_context(None, worker.vllm_config, num_tokens=8, is_padding=torch.zeros(8, dtype=torch.bool)):
        scheduled_unpadded = engine.real_tokens((), {})
    engine.requests()
    with set_forward_context(None, worker.vllm_config, num_tokens=8, is_padding=padding):
        engine.armed = False
        try:
            warm_up = engine.real_tokens((), {}).tolist()
        finally:
            engine.armed = True
    return {"armed": armed, "warm_up": warm_up, "unpadded": unpadded, "scheduled_armed": scheduled_armed,
            "scheduled_unpadded": scheduled_unpadded}
