"""The vLLM plugin: ``MOEWATCH_PORT=9400 vllm serve MODEL`` watches every MoE layer.

Registered as a ``vllm.general_plugins`` entry point (``moewatch``), which vLLM loads in every
process it starts. Without ``MOEWATCH_PORT`` it does nothing. With it, in each worker:

1. right after the worker loads the model (``Worker.load_model``), before vLLM profiles,
   compiles or captures anything, it attaches a monitor (:func:`moewatch.engines.vllm.attach`)
   with every ``MOEWATCH_<OPTION>`` variable as an option, and serves ``/metrics`` on
   ``MOEWATCH_PORT + local rank`` (``MOEWATCH_ADDR``, default 127.0.0.1), the local rank
   counting every worker of the engine on this host, data-parallel replicas included
   (:func:`port_offset`);
2. vLLM's own profiling and warm-up forwards count no token; once ``compile_or_warm_up_model``
   returns, the monitor counts (``VllmEngine.armed``);
3. each step (``execute_model``) hands the scheduler's output to the engine, so that windows
   count the requests behind their tokens (``VllmEngine.schedule``); on the CPU it also
   begins and ends the step's forward, where the model's root hooks would
   (``VllmEngine.drive_steps``);
4. when the worker shuts down (``shutdown``: the engine is closed or collected), its monitor
   detaches: the last window is closed and the port freed for the next engine of the process.

A model without a MoE layer (a dense model, where ``MOEWATCH_PORT`` is set for every model
served) is served unwatched, with a warning, unless ``MOEWATCH_GATES`` names its gates.
A bad value is an :class:`~moewatch.engines.env.EnvOptionError` naming the variable, raised
when the worker loads the model, so the engine does not start half-watched. vLLM's compile
cache is switched off while the plugin is on (``VLLM_DISABLE_COMPILE_CACHE=1`` unless set): a
graph cached by a run without moewatch would not call its hooks.
"""
from __future__ import annotations

import logging
import os
from typing import Any, List, Optional

from .env import PREFIX, EnvOptionError, options_from_env, port_from_env, unknown_variables

# A child of vLLM's logger, so the messages appear with vLLM's own.
logger = logging.getLogger("vllm.moewatch")

_MONITORS: List[Any] = []  # monitors attached by the plugin in this process
_PATCHED = "_moewatch_patched"


def monitors() -> List[Any]:
    """The monitors the plugin attached in this process (one per worker model)."""
    return [m for m in _MONITORS if m.attached]


def register() -> None:
    """The ``vllm.general_plugins`` entry point: patch the workers when ``MOEWATCH_PORT`` is set."""
    try:
        port = port_from_env()
    except EnvOptionError as error:
        logger.error("moewatch: %s", error)
        port = error  # the worker raises it when it loads the model
    if port is None:
        return
    for name in unknown_variables():
        logger.warning("moewatch: %s is not a moewatch option and is ignored (options: MOEWATCH_<OPTION> "
                       "for each moewatch.attach option, see docs/vllm.md)", name)
    os.environ.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")
    _patch_workers((("load_model", _wrap_load), ("compile_or_warm_up_model", _wrap_warm_up),
                    ("execute_model", _wrap_execute), ("shutdown", _wrap_shutdown)))


def patch_steps() -> None:
    """Hand every worker step's scheduled requests to the engine of its model, where moewatch
    is attached (``moewatch.engines.vllm.attach`` calls this for a monitor attached by hand)."""
    _patch_workers((("execute_model", _wrap_execute),))


def _worker_classes() -> list:
    classes = []
    try:
        from vllm.v1.worker.gpu_worker import Worker

        classes.append(Worker)
    except Exception as error:  # an engine build without it: nothing to patch there
        logger.debug("moewatch: no GPU worker class (%s)", error)
    try:
        from vllm.v1.worker.cpu_worker import CPUWorker

        classes.append(CPUWorker)
    except Exception as error:
        logger.debug("moewatch: no CPU worker class (%s)", error)
    return classes


def _patch_workers(methods) -> None:
    for cls in _worker_classes():
        for method, wrap in methods:
            original = cls.__dict__.get(method)
            if original is None or getattr(original, _PATCHED, False):
                continue  # inherited (the base class's wrapper runs) or already patched
            wrapped = wrap(original)
            setattr(wrapped, _PATCHED, True)
            wrapped.__wrapped__ = original
            wrapped.__doc__ = original.__doc__
            setattr(cls, method, wrapped)


def _wrap_load(original):
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        attach_worker(self)
        return result

    return load_model


def _wrap_warm_up(original):
    def compile_or_warm_up_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        monitor = getattr(self, "_moewatch_monitor", None)
        if monitor is not None:
            from .vllm import engine_of

            engine_of(self.model_runner.get_model()).armed = True  # from now on, forwards count
            logger.info("moewatch: counting from now on (%d MoE layers)", len(monitor.gates))
        return result

    return compile_or_warm_up_model


def _wrap_execute(original):
    from .vllm import watched_engine  # once, not per step: a step of a small model is a millisecond

    def execute_model(self, scheduler_output, *args, **kwargs):
        engine = watched_engine(self)
        begun = False
        if engine is not None:
            try:  # a fault of moewatch's must not fail the step: the hooks take over
                begun = engine.begin_step(scheduler_output)
            except Exception as error:  # noqa: BLE001 (counted in the monitors' errors, said once)
                engine.step_failed(error)
        if not begun:
            return original(self, scheduler_output, *args, **kwargs)
        try:  # the step's forward, begun and ended here (VllmEngine.drive_steps)
            return original(self, scheduler_output, *args, **kwargs)
        finally:
            try:
                engine.end_step()
            except Exception as error:  # noqa: BLE001 (as above)
                engine.step_failed(error)

    return execute_model


def _wrap_shutdown(original):
    def shutdown(self, *args, **kwargs):
        # the engine is going away: its monitor closes its last window (and the shutdown dump)
        # and frees its port, where the next engine made in this process serves its /metrics
        detach_worker(self)
        return original(self, *args, **kwargs)

    return shutdown


def detach_worker(worker) -> None:
    """Detach the monitor the plugin attached to a worker's model (the worker shuts down).
    Never raises: a monitoring failure must not stop the engine's shutdown."""
    monitor = getattr(worker, "_moewatch_monitor", None)
    if monitor is None:
        return
    worker._moewatch_monitor = None
    try:
        monitor.detach()
    except Exception as error:  # noqa: BLE001
        logger.warning("moewatch: detaching at the worker's shutdown failed (%s: %s)", type(error).__name__, error)
    if monitor in _MONITORS:
        _MONITORS.remove(monitor)


def _served_name(worker) -> Optional[str]:
    config = getattr(getattr(worker, "vllm_config", None), "model_config", None)
    for attr in ("served_model_name", "model"):
        value = getattr(config, attr, None)
        if isinstance(value, (list, tuple)) and value:
            value = value[0]
        if isinstance(value, str) and value:
            return value
    return None


def attach_worker(worker) -> Any:
    """Attach a monitor to the model a vLLM worker has just loaded, and serve /metrics."""
    port = port_from_env()  # raises EnvOptionError: the engine does not start
    if port is None:
        return None
    from .vllm import attach, engine_of, moe_layers

    options = options_from_env()
    baseline = options.pop("baseline", None)
    detach_worker(worker)  # a monitor already here: the model was loaded again, watch the new one
    model = worker.model_runner.get_model()
    if not moe_layers(model) and options.get("gates") is None:
        # a dense model, served where MOEWATCH_PORT is set for every model: it serves, unwatched
        logger.warning("moewatch: %s has no MoE layer: nothing to watch, and no /metrics is served "
                       "on MOEWATCH_PORT for it (name gates with MOEWATCH_GATES where its routers "
                       "are of a kind moewatch does not find by itself)", _served_name(worker) or
                       type(model).__name__)
        return None
    engine = engine_of(model)
    engine.armed = False  # vLLM's profiling and warm-up runs are not traffic
    engine.served_name = _served_name(worker)
    monitor = attach(model, baseline, **options)
    local_rank = port_offset(worker)
    addr = os.environ.get(PREFIX + "ADDR", "").strip() or "127.0.0.1"
    try:
        bound = monitor.serve_prometheus(port=port, addr=addr, local_rank=local_rank)
    except (OSError, ValueError) as error:
        monitor.detach()
        raise EnvOptionError(f"{PREFIX}PORT={port} ({PREFIX}ADDR={addr!r}), local rank {local_rank}: {error}") \
            from None
    worker._moewatch_monitor = monitor
    _MONITORS.append(monitor)
    logger.info("moewatch: watching %d MoE layers of %s; /metrics on %s:%d", len(monitor.gates),
                monitor.model_name, addr, bound)
    return monitor


def port_offset(worker) -> int:
    """The worker's index among the engine's workers on this host: its port is MOEWATCH_PORT
    plus it.

    vLLM's ``local_rank`` counts the workers of one data-parallel replica. On CUDA the worker
    adds the replicas before it on the host (``DP local rank x workers per replica``) so that
    each replica takes its own devices; elsewhere (the CPU) every replica's ranks start at 0
    again, and two replicas on one host would ask for the same port. Counted here the same way
    on every platform.
    """
    local_rank = int(getattr(worker, "local_rank", 0) or 0)
    config = getattr(worker, "parallel_config", None)
    if config is None or int(getattr(config, "data_parallel_size", 1) or 1) <= 1:
        return local_rank
    per_replica = 1
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "prefill_context_parallel_size"):
        per_replica *= int(getattr(config, name, 1) or 1)
    if local_rank >= per_replica:  # the platform already counted the replicas before it
        return local_rank
    replica = getattr(config, "data_parallel_rank_local", None)
    if replica is None or int(replica) < 0:
        replica = getattr(config, "data_parallel_index", None)
    return int(replica or 0) * per_replica + local_rank


__all__ = ["attach_worker", "detach_worker", "monitors", "patch_steps", "port_offset", "register"]
