"""One vLLM engine run for the engine tests, in the vLLM venv (``tests/test_vllm.py`` starts it).

Usage: ``python vllm_child.py CONFIG_JSON``. The config names the checkpoint, compile or eager,
in-process or worker processes, whether moewatch is on (``MOEWATCH_PORT``) and the prompts.

Independently of moewatch, every router's own routing is recorded here: each router's
``_compute_routing`` is wrapped (before vLLM compiles) to hand its expert ids to a test op,
``moewatch_test::record``, whose implementation keeps them at run time with vLLM's padding
mask. Warm-up forwards are left out (recording starts after ``compile_or_warm_up_model``).

It prints one JSON line: greedy outputs, the recorded counts per layer, moewatch's counts
(``mon.counts()``), its gates, and after an optional fault drill (eager runs) the verdicts.
With moewatch on it then keeps serving /metrics until stdin closes.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, List

import torch

RECORDED: Dict[int, List[torch.Tensor]] = {}
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
        padding = get_forward_context().is_padding
        if padding is not None:
            rows = ids[torch.logical_not(padding[: ids.shape[0]])]
    RECORDED.setdefault(layer, []).append(rows.to(torch.int64).clone())


_LIB.impl("record", _record_impl, "CompositeExplicitAutograd")
torch.library.register_fake("moewatch_test::record", lambda ids, tick, layer: None, lib=_LIB)


def _wrap_router(router, layer: int) -> None:
    compute = router._compute_routing

    def compute_routing(*args, **kwargs):
        weights, ids = compute(*args, **kwargs)
        torch.ops.moewatch_test.record(ids, _TICK, layer)
        return weights, ids

    router._compute_routing = compute_routing


def _install_recorder() -> None:
    from vllm.v1.worker.gpu_worker import Worker
    from vllm.v1.worker.cpu_worker import CPUWorker

    load = Worker.load_model

    def load_model(self, *args, **kwargs):
        out = load(self, *args, **kwargs)
        from moewatch.engines.vllm import moe_layers

        for index, (name, layer) in enumerate(moe_layers(self.model_runner.get_model())):
            _wrap_router(layer.router, index)
        return out

    Worker.load_model = load_model
    warm = CPUWorker.compile_or_warm_up_model

    def compile_or_warm_up_model(self, *args, **kwargs):
        out = warm(self, *args, **kwargs)
        STATE["armed"] = True
        return out

    CPUWorker.compile_or_warm_up_model = compile_or_warm_up_model


def worker_report(worker) -> dict:
    """Run in the worker: recorded counts, moewatch's counts, its verdict and gates."""
    from moewatch.engines.vllm_plugin import monitors

    model = worker.model_runner.get_model()
    from moewatch.engines.vllm import moe_layers

    layers = moe_layers(model)
    experts = [int(layer.moe_config.num_logical_experts) for _, layer in layers]
    recorded = {}
    for index, (name, _) in enumerate(layers):
        ids = RECORDED.get(index, [])
        flat = torch.cat(ids).reshape(-1) if ids else torch.zeros(0, dtype=torch.int64)
        recorded[name] = torch.bincount(flat, minlength=experts[index]).tolist()
    report = {"recorded": recorded, "rank": int(getattr(worker, "rank", 0)),
              "local_rank": int(getattr(worker, "local_rank", 0))}
    mons = monitors()
    if mons:
        mon = mons[0]
        mon.flush()
        report["counts"] = {g: c.tolist() for g, c in mon.counts().items()}
        report["gates"] = [{"name": g.name, "num_experts": g.num_experts, "top_k": g.top_k,
                            "scoring": g.scoring, "notes": g.notes} for g in mon.gates]
        report["errors"] = mon.error_counts()
        report["health"] = str(mon.health())
        report["severity"] = mon.health().severity
        report["monitoring"] = mon.health().monitoring
    return report


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


def main() -> None:
    config = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    if config["moewatch"]:
        os.environ["MOEWATCH_PORT"] = str(config["port"])
        for key, value in config.get("options", {}).items():
            os.environ[key] = str(value)
    else:
        os.environ.pop("MOEWATCH_PORT", None)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if config["multiprocess"] else "0"
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "fork")  # workers inherit the recorder
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with this file's functions
    _install_recorder()
    from vllm import LLM, SamplingParams

    started = time.time()
    llm = LLM(model=config["model"], skip_tokenizer_init=True, enforce_eager=config["eager"], dtype="float32",
              max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256, seed=0,
              kv_cache_memory_bytes=64 * 2**20, enable_prefix_caching=False)
    startup = time.time() - started
    params = SamplingParams(max_tokens=config["max_tokens"], temperature=0.0, detokenize=False)
    prompts = [{"prompt_token_ids": ids} for ids in config["prompts"]]
    outputs = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    result = {"outputs": outputs, "startup_s": startup, "prompt_tokens": sum(len(p) for p in config["prompts"])}
    result["workers"] = llm.collective_rpc(worker_report)
    if config.get("drill"):
        result["drill"] = llm.collective_rpc(fault_drill)
        drill_prompts = [{"prompt_token_ids": ids} for ids in config["drill"]]
        result["drill_outputs"] = [list(o.outputs[0].token_ids)
                                   for o in llm.generate(drill_prompts, params, use_tqdm=False)]
        result["drill_workers"] = llm.collective_rpc(worker_report)
        result["drill_end"] = llm.collective_rpc(end_drill)
    print("RESULT " + json.dumps(result), flush=True)
    if config["moewatch"] and config.get("serve_until_stdin_closes"):
        sys.stdin.read()


if __name__ == "__main__":
    main()
