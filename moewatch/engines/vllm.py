"""vLLM: its fused-MoE layers as gates, its own routing decision, its real tokens.

vLLM builds every MoE layer as a ``MoERunner`` (``FusedMoEFactory``) holding a router
(``BaseRouter`` subclasses: top-k, grouped top-k, bias-corrected...) and, beside or inside it,
the gate module that computes the router logits (``GateLinear``, returning ``(logits, None)``).
For each layer this engine reads from the layer itself: the global number of logical experts,
top-k, the scoring function, grouped top-k (groups kept of groups) and whether a score
correction bias is applied. The expert ids counted are the router's own selection, handed
over by its capture seam (``router.set_capture_fn``: logical ids, before any EPLB remapping),
so grouped and biased routing is exact without replaying it; the logits come from a forward
hook on the gate module, held until the router's callback of the same layer.

Real tokens: vLLM pads a batch to a captured size and says which rows are padding in its
forward context (``is_padding``); the root forward's hook reads it at run time. Forwards run
before :attr:`VllmEngine.armed` is set (the engine's own profiling and warm-up runs, when
attached by the plugin) count no token.

Requests: the worker's ``execute_model`` hands the engine its scheduler's output
(``num_scheduled_tokens``: request id -> tokens of this step, and the requests finished since
the last step); the step's root forward takes it (:meth:`VllmEngine.requests`), so windows
count their requests (``Window.requests``) as they do in a transformers batch. Where moewatch
does not see the step (a forward run outside ``execute_model``: a data-parallel dummy batch, a
call of the model by hand) that forward's requests are not known.

Compiled models: on the CPU vLLM calls the MoE layer's Python code inside its compiled
graph, so the capture callback and the gate hook are traced into it as one
``moewatch::stage`` op per layer call. Attach before vLLM compiles (the plugin does); a
monitor attached to an already compiled model would be blind, and :func:`attach` says so.
"""
from __future__ import annotations

import fnmatch
import logging
import threading
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..adapters.base import AdapterError, Companion, GateSpec
from ..routing import SCORINGS, GateInfo, Routing
from ..hotpath.requests import RequestTokens
from .base import Engine

logger = logging.getLogger("moewatch.vllm")


class EngineAttachWarning(UserWarning):
    """moewatch attached where it cannot see the engine's routing (e.g. after compilation)."""


def _moe_runner_class():
    try:
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
    except ImportError:  # older layouts
        from vllm.model_executor.layers.fused_moe.layer import MoERunner  # type: ignore
    return MoERunner


def moe_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, layer) of every vLLM fused-MoE layer in ``model``, in model order."""
    runner = _moe_runner_class()
    return [(name, module) for name, module in model.named_modules() if isinstance(module, runner)]


def _logits_width(module: nn.Module) -> Optional[int]:
    for attr in ("output_size", "out_features"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.numel():
        return int(weight.shape[0])
    return None


def find_gate(model: nn.Module, name: str, layer: nn.Module, num_experts: int) -> Tuple[str, nn.Module]:
    """The module computing ``layer``'s router logits: the layer's own ``gate``, else the
    sibling module named ``gate`` (or the only sibling ``num_experts`` wide)."""
    while name.endswith(".base_layer"):  # wrapped (LoRA serving): the gate sits beside the wrapper
        name = name[: -len(".base_layer")]
        layer = model.get_submodule(name)
    gate = getattr(layer, "gate", None)
    if isinstance(gate, nn.Module):  # held by the layer, often registered under its MoE block too
        return _name_in(model, gate, f"{name}.gate"), gate
    parent_name = name.rsplit(".", 1)[0] if "." in name else ""
    parent = model.get_submodule(parent_name) if parent_name else model
    children = dict(parent.named_children())
    prefix = f"{parent_name}." if parent_name else ""
    if isinstance(children.get("gate"), nn.Module) and children["gate"] is not layer:
        return prefix + "gate", children["gate"]
    wide = [(n, m) for n, m in children.items() if m is not layer and _logits_width(m) == num_experts]
    if len(wide) == 1:
        return prefix + wide[0][0], wide[0][1]
    raise AdapterError(
        f"cannot find the gate (router logits module) of vLLM MoE layer {name!r}: neither the layer "
        f"nor its parent has a 'gate' module, and {len(wide)} siblings are {num_experts} wide")


def _name_in(model: nn.Module, module: nn.Module, default: str) -> str:
    """The name ``model.named_modules()`` gives ``module`` (its first registration)."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return default


class _LogitsStash:
    """A layer's router logits, from the gate's observer (in its tap) to the router's capture callback."""

    __slots__ = ("logits",)

    def __init__(self) -> None:
        self.logits: Optional[torch.Tensor] = None

    def gate_observer(self, module, args, kwargs, output) -> None:
        self.logits = output[0] if isinstance(output, (tuple, list)) else output  # [T, E]

    def take(self) -> Optional[torch.Tensor]:
        logits, self.logits = self.logits, None
        return logits


class _CaptureHandle:
    """Takes moewatch's callback off a router, putting back what was there before."""

    def __init__(self, router, capture, previous) -> None:
        self._router, self._capture, self._previous = router, capture, previous

    def remove(self) -> None:
        router = self._router
        if router is not None and router.capture_fn is self._capture:
            router.set_capture_fn(self._previous)
        self._router = None


def _route_notes(router) -> str:
    parts = [f"vLLM {type(router).__name__}: counts are the engine's selected logical expert ids"]
    groups, kept = getattr(router, "num_expert_group", None), getattr(router, "topk_group", None)
    grouped = getattr(router, "use_grouped_topk", None)
    if groups and kept and (grouped is None or grouped) and int(groups) > 1:
        parts.append(f"grouped top-k ({int(kept)} of {int(groups)} groups)")
    if getattr(router, "e_score_correction_bias", None) is not None:
        parts.append("score correction bias (selection only)")
    return "; ".join(parts)


# How vLLM's routers score the logits where they do not say it themselves: its routing methods
# (``RoutingMethodType`` names), and its models' custom routing functions (module, qualname),
# which replace the router's own ``scoring_func`` (the CPU router keeps its default there)
_SIGMOID_METHODS = frozenset({"DeepSeekV3", "Llama4", "Sigmoid", "SigmoidRenorm", "MiniMax2"})
_SOFTMAX_METHODS = frozenset({"Default", "Renormalize", "RenormalizeNaive"})
_SIGMOID_FUNCTIONS = frozenset({("vllm.model_executor.models.llama4", "Llama4MoE.custom_routing_function"),
                                ("vllm.model_executor.models.cohere2_moe", "token_choice_with_bias")})


def _routing_method(router) -> Optional[str]:
    try:
        return router.routing_method_type.name
    except Exception:  # noqa: BLE001 (a router of another layout)
        return None


def router_scoring(router) -> Tuple[str, str]:
    """(scoring function, a note for the gate's notes) of a vLLM router: its ``scoring_func``,
    unless a custom routing function replaces it; a known one's scoring, or what the router's
    routing method says; a routing function that says neither is summarised as softmax, and
    the note says so."""
    function = getattr(router, "custom_routing_function", None)
    scoring = getattr(router, "scoring_func", None)
    if function is None and isinstance(scoring, str):
        return scoring, ""
    method = _routing_method(router)
    name = getattr(function, "__qualname__", None)
    if (getattr(function, "__module__", None), name) in _SIGMOID_FUNCTIONS or method in _SIGMOID_METHODS:
        return "sigmoid", f"; sigmoid scoring (vLLM's {name or method})"
    if function is None and method in _SOFTMAX_METHODS:
        return "softmax", ""
    what = name or method or type(router).__name__
    return "softmax", f"; routing function {what}: its scoring is not known, the logits are summarised as softmax"


def layer_spec(model: nn.Module, name: str, layer: nn.Module) -> GateSpec:
    """The GateSpec of one vLLM MoE layer (see the module docstring)."""
    router = getattr(layer, "router", None)
    if router is None or not callable(getattr(router, "set_capture_fn", None)):
        raise AdapterError(f"vLLM MoE layer {name!r} has a router ({type(router).__name__}) without a "
                           "capture seam (set_capture_fn): moewatch cannot see its routing")
    if getattr(layer, "is_monolithic", False):
        raise AdapterError(f"vLLM MoE layer {name!r} routes inside a monolithic kernel, which does not "
                           "call the router's capture seam: moewatch cannot see its routing")
    config = getattr(layer, "moe_config", None)
    num_experts = int(getattr(config, "num_logical_experts", 0) or router.global_num_experts)
    top_k = int(router.top_k)
    scoring, scoring_note = router_scoring(router)
    notes = _route_notes(router) + scoring_note
    if scoring not in SCORINGS:
        notes += f"; scoring {scoring!r} is summarised as softmax"
        scoring = "softmax"
    gate_name, gate = find_gate(model, name, layer, num_experts)
    stash = _LogitsStash()

    def extract(module, args, kwargs, topk_ids) -> Routing:
        logits = stash.take()
        if logits is None:
            raise AdapterError(f"the gate {gate_name!r} did not run before the router of {name!r} "
                               "(fused gate weights?): no logits to go with its decision")
        # the ids as the engine made them (int32 from its top-k kernels): every backend reads
        # any integer dtype, and a cast here would be one more kernel in the graph per call
        return Routing(logits=logits, indices=topk_ids)  # [T, E], [T, k]

    def install(hook: Callable[..., None]) -> _CaptureHandle:
        previous = router.capture_fn  # another capturer (vLLM's routed-experts replay) keeps working

        def capture(topk_ids: torch.Tensor) -> None:  # topk_ids [T, k] logical expert ids
            if previous is not None:
                previous(topk_ids)
            hook(layer, (), {}, topk_ids)

        router.set_capture_fn(capture)
        return _CaptureHandle(router, capture, previous)

    info = GateInfo(name=gate_name, num_experts=num_experts, top_k=top_k, family="vllm", scoring=scoring,
                    notes=notes)
    return GateSpec(info=info, module=gate, extract=extract, companions=(Companion(gate, stash.gate_observer),),
                    install=install)


def _parallel_group(name: str) -> Optional[Tuple[int, int]]:
    """(rank, world size) in vLLM's parallel group ``name`` (``_TP``, ``_PP``, ``_DP``, ``_EP``);
    None where vLLM is absent or has not set that group up."""
    try:
        from vllm.distributed import parallel_state
    except ImportError:
        return None
    group = getattr(parallel_state, name, None)
    rank, world = getattr(group, "rank_in_group", None), getattr(group, "world_size", None)
    if isinstance(rank, int) and not isinstance(rank, bool) and isinstance(world, int) and world > 0:
        return rank, world
    return None


def _gather_groups() -> List[Tuple[int, int]]:
    """(rank, world size) in vLLM's data and expert parallel groups, those of more than one rank."""
    groups = (_parallel_group(name) for name in ("_DP", "_EP"))
    return [group for group in groups if group is not None and group[1] > 1]


def _data_parallel_ranks() -> int:
    """The ranks of vLLM's data-parallel group (1 where there is none)."""
    group = _parallel_group("_DP")
    return group[1] if group is not None else 1


def _matches(names: Tuple[str, ...], patterns) -> bool:
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    return any(n == p or fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


class VllmEngine(Engine):
    """vLLM's view of one model (one per model; see :func:`engine_of`)."""

    name = "vllm"

    def __init__(self) -> None:
        # On a device, the real tokens of a forward go into a buffer of fixed address (see
        # _graph_safe_real), and whether the engine is armed into a device flag beside it
        self._real_buffer: Optional[torch.Tensor] = None  # bool [max tokens]
        self._armed_flag: Optional[torch.Tensor] = None  # bool [1]
        self.armed = True  # False: forwards count no token (the plugin, until warm-up is over)
        self.served_name: Optional[str] = None
        try:  # read at every root forward: imported once, not per call
            from vllm.forward_context import get_forward_context, is_forward_context_available
        except ImportError:
            get_forward_context = is_forward_context_available = None
        self._get_context, self._has_context = get_forward_context, is_forward_context_available
        self._scheduled: Optional[RequestTokens] = None  # the step about to run (see schedule)
        # whether a forward's rows are its whole step (see _whole_steps; read once)
        self._whole_steps_here: Optional[bool] = None
        self._gather_groups: Optional[List[Tuple[int, int]]] = None  # see local_rows (read once)
        self._driven: List[object] = []  # the monitors' Banks whose forwards each step marks (drive_steps)
        self.stepping_thread: Optional[int] = None  # see Engine.stepping_thread

    def schedule(self, scheduler_output) -> None:
        """The worker is about to run a step (``Worker.execute_model``): keep which requests its
        tokens belong to for the step's root forward. Never raises: an output of another shape
        leaves the step's requests unknown."""
        try:
            scheduled = scheduler_output.num_scheduled_tokens  # {request id: tokens this step}
            finished = tuple(getattr(scheduler_output, "finished_req_ids", None) or ())
            if self._scheduled is not None:  # a step without a forward: its ends still count
                finished += self._scheduled.finished
            self._scheduled = RequestTokens.of_step(scheduled, finished)
        except Exception as error:  # noqa: BLE001 (a vLLM of another layout: not counted, said once)
            self._scheduled = None
            if not getattr(self, "_schedule_warned", False):
                self._schedule_warned = True
                logger.warning("moewatch: cannot read vLLM's scheduled requests (%s: %s); windows will "
                               "not count their requests", type(error).__name__, error)

    def drive_steps(self, banks) -> Optional["_StepDrive"]:
        """On vLLM's CPU platform, where a step's forward has no padding row (one data-parallel
        rank: vLLM pads the ranks' batches to one size; the step's tokens whole on this rank)
        and the gates are on the CPU: the worker's
        step (``Worker.execute_model``, wrapped by the plugin) begins and ends the forward on
        ``banks``, so the root module's hooks do nothing at a step. A decode step of a small
        model is a millisecond or two, and those hooks (the forward context read for padding,
        the forward begun and ended from inside the model's call) cost it about 2%. Elsewhere
        (a GPU's graphs need the hooks' mask, padding may be added): None."""
        if not banks.steppable() or _data_parallel_ranks() != 1 or not self._whole_steps():
            return None
        try:
            from vllm.platforms import current_platform

            if not current_platform.is_cpu():
                return None
        except Exception:  # noqa: BLE001 (another vLLM: the hooks mark the forwards, as they can)
            return None
        self._driven.append(banks)
        return _StepDrive(self, banks)

    def begin_step(self, scheduler_output) -> bool:
        """The worker is about to run a step: keep its requests (``schedule``) and, once armed,
        begin a forward on every driven monitor's banks (``drive_steps``). True: the step's
        forward was begun, and ``end_step`` must follow. What a bank raises reaches the caller,
        the plugin's wrapper, which hands it to ``step_failed``."""
        self.schedule(scheduler_output)
        driven = self._driven
        if not driven or not self._armed:
            return False
        requests = self.requests()
        for banks in driven:
            banks.begin_step(requests)
        self.stepping_thread = threading.get_ident()
        return True

    def end_step(self) -> None:
        """The step begun by ``begin_step`` has run (or raised): end its forward (faults as
        ``begin_step``'s)."""
        self.stepping_thread = None
        for banks in self._driven:
            banks.end_step()

    def step_failed(self, error: Exception) -> None:
        """A driven step's begin or end failed (the plugin's wrapper calls this): the forward
        begun on any driven monitor's banks is ended (what its gates staged is counted; a bank
        not begun ends nothing), the failure is counted in each monitor's errors (``hook``, in
        "vLLM step"), and the root hooks mark the forwards from now on. Never raises."""
        driven, self._driven = self._driven, []
        self.stepping_thread = None
        for banks in driven:
            try:
                banks.errors.record("hook", error, where="vLLM step")
                banks.end_step()
            except Exception:  # noqa: BLE001 (a bank that cannot end: its next forward starts anew)
                pass
        logger.warning("moewatch: marking vLLM's steps failed (%s: %s); the model's forwards are "
                       "marked by its hooks from now on", type(error).__name__, error)

    @property
    def armed(self) -> bool:
        """Whether forwards count (False while vLLM profiles and warms the model up)."""
        return self._armed

    @armed.setter
    def armed(self, value: bool) -> None:
        self._armed = bool(value)
        if self._armed_flag is not None:  # set outside any graph capture: the plugin's, between steps
            self._armed_flag.fill_(self._armed)

    def requests(self) -> Optional[RequestTokens]:
        """The requests of the step whose root forward is starting (once: a second forward of the
        same step, or one outside a step, is not known); None before the engine is armed."""
        scheduled, self._scheduled = self._scheduled, None
        return scheduled if self.armed else None  # warm-up tokens are not counted

    def gates(self, model: nn.Module, options) -> List[GateSpec]:
        specs = []
        for name, layer in moe_layers(model):
            spec = layer_spec(model, name, layer)
            if options.gates is None or _matches((name, spec.info.name), options.gates):
                specs.append(spec)
        if not specs:
            raise AdapterError(
                f"found no vLLM MoE layer in {type(model).__name__}" +
                (f" matching gates={options.gates!r} (patterns match the layer's or its gate's name, "
                 "e.g. 'model.layers.*.mlp.gate')" if options.gates is not None else ""))
        return specs

    def real_tokens(self, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        """[1, T] bool (True = a real token) from vLLM's forward context; None: all real."""
        padding = None
        if self._has_context is not None and self._has_context():
            padding = self._get_context().is_padding  # [T] bool, True = padding, or None
        if padding is not None and padding.device.type != "cpu":
            return self._graph_safe_real(padding)
        if not self.armed:
            rows = padding.shape[0] if padding is not None else _token_rows(args, kwargs)
            device = padding.device if padding is not None else None
            return torch.zeros(1, rows, dtype=torch.bool, device=device) if rows is not None else None
        if padding is None:
            return None
        step = self._scheduled  # the step this forward runs (requests() takes it after this)
        if step is not None and padding.shape[0] == sum(step.tokens) and self._whole_steps():
            # as many rows as the step has tokens: vLLM pads a batch by adding rows, so none is
            # padding (no tensor read: on a GPU no kernel, on a CPU ~20 us a step saved)
            return None
        if padding.device.type == "cpu" and not padding.numpy().any():
            # no padding row (a host tensor: no device sync; numpy: no op dispatched): every
            # token is real, and calls without a mask are counted from their shape alone
            return None
        return torch.logical_not(padding).view(1, -1)  # [1, T]

    def _graph_safe_real(self, padding: torch.Tensor) -> torch.Tensor:
        """[1, T] bool, True = a real token of an armed engine: one kernel into a buffer whose
        address never changes, computed from vLLM's ``is_padding`` (a view of the runner's
        persistent buffer, filled before each step) and the armed flag (on the device).

        vLLM captures CUDA graphs by default (``FULL_AND_PIECEWISE``): the gate kernels replay
        with the mask's address of the capture, and in a full graph this hook's work replays as
        captured, without its Python. So no branch here depends on the step, and the mask is
        never a tensor made for one step: a replay reads this step's real tokens. On the CPU
        there are no graphs, and ``real_tokens`` spares steps without padding any op."""
        rows = padding.shape[0]
        buffer = self._real_buffer
        if buffer is None or buffer.device != padding.device or buffer.shape[0] < rows:
            # sized once, at the first forward (vLLM's profiling run, before any capture), to
            # the whole buffer that ``is_padding`` is a view of
            size = max(rows, padding.untyped_storage().nbytes() // padding.element_size())
            buffer = self._real_buffer = torch.empty(size, dtype=torch.bool, device=padding.device)
            self._armed_flag = torch.full((1,), self._armed, dtype=torch.bool, device=padding.device)
        real = buffer[:rows]  # [T]
        torch.gt(self._armed_flag, padding, out=real)  # armed and not padding: True > False only
        return real.view(1, -1)

    def _whole_steps(self) -> bool:
        """Whether a root forward's rows are its step's scheduled tokens and padding (not where
        prefill or decode context parallelism splits a step's tokens across ranks)."""
        if self._whole_steps_here is None:
            split = False
            try:
                from vllm.distributed import parallel_state

                for getter in ("get_pcp_group", "get_dcp_group"):
                    try:
                        split = split or getattr(parallel_state, getter)().world_size > 1
                    except (AttributeError, AssertionError):  # no such group here
                        pass
            except ImportError:
                split = True  # unknown: read the mask
            self._whole_steps_here = not split
        return self._whole_steps_here

    def holds_part_of_model(self) -> bool:
        """Whether this worker is one of several pipeline stages (each holds some layers)."""
        try:
            from vllm.distributed import parallel_state

            return parallel_state.get_pp_group().world_size > 1
        except (ImportError, AttributeError, AssertionError):  # no pipeline group here
            return False

    def parallel_ranks(self) -> Dict[str, int]:
        """The worker's rank in vLLM's tensor, pipeline, data and expert parallel groups (those
        vLLM has set up: its parallel state is ready before the model loads)."""
        ranks = {}
        for label, group_name in (("tp", "_TP"), ("pp", "_PP"), ("dp", "_DP"), ("ep", "_EP")):
            group = _parallel_group(group_name)
            if group is not None:
                ranks[label] = group[0]
        return ranks

    def row_locator(self):
        """:meth:`local_rows` where this worker is one of several data (or expert) parallel
        ranks, whose dispatch may gather their tokens before routing; None otherwise."""
        if self._gather_groups is None:
            self._gather_groups = _gather_groups()
        return self.local_rows if self._gather_groups else None

    def local_rows(self, local: int, gathered: int) -> Optional[int]:
        """This rank's first row among the tokens vLLM's naive data-parallel dispatch gathered
        before routing (``AgRsAll2AllManager``: every DP rank's rows, in rank order, as many from
        each as its forward context's ``dp_metadata`` says). Runs at run time, in the gate op."""
        context = self._get_context() if self._has_context is not None and self._has_context() else None
        metadata = getattr(context, "dp_metadata", None)
        sizes = getattr(metadata, "local_sizes", None)  # set inside the MoE layer's forward
        if sizes is None and metadata is not None:  # outside it (the op of compiled code): per DP rank
            sizes = metadata.num_tokens_across_dp_cpu.tolist()  # a host tensor [DP]
        # the DP group (the EP group under sequence parallel): (rank, world size) of each
        for rank, world in self._gather_groups or ():
            if sizes is not None and len(sizes) == world:
                if sum(sizes) == gathered and sizes[rank] == local:
                    return int(sum(sizes[:rank]))
            elif sizes is None and gathered == local * world:  # padded alike on every rank
                return rank * local
        return None

    def model_name(self, model: nn.Module) -> Optional[str]:
        if self.served_name:
            return self.served_name
        config = getattr(model, "config", None)
        value = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
        return value if isinstance(value, str) and value else None


class _StepDrive:
    """A monitor's banks driven by an engine's steps (``VllmEngine.drive_steps``)."""

    def __init__(self, engine: VllmEngine, banks) -> None:
        self._engine, self._banks = engine, banks

    def remove(self) -> None:
        engine, banks = self._engine, self._banks
        if engine is not None:
            self._engine = None
            engine._driven = [driven for driven in engine._driven if driven is not banks]


def _token_rows(args: tuple, kwargs: dict) -> Optional[int]:
    """T of a vLLM root forward: input_ids [T] or positions [T] / [3, T]."""
    for key, pos in (("input_ids", 0), ("positions", 1)):
        value = kwargs.get(key, args[pos] if len(args) > pos else None)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[-1])
    return None


_ENGINES: "weakref.WeakKeyDictionary[nn.Module, VllmEngine]" = weakref.WeakKeyDictionary()


def engine_of(model: nn.Module) -> VllmEngine:
    """The :class:`VllmEngine` of ``model`` (one per model, kept as long as the model)."""
    engine = _ENGINES.get(model)
    if engine is None:
        engine = _ENGINES[model] = VllmEngine()
    return engine


def watched_engine(worker) -> Optional[VllmEngine]:
    """The engine of the model a vLLM worker runs, if moewatch made one for it; else None."""
    try:
        model = worker.model_runner.get_model()
        return _ENGINES.get(model)
    except Exception:  # noqa: BLE001 (no model loaded yet, or another layout: nothing watched)
        return None


def compiled_already(model: nn.Module) -> bool:
    """True when vLLM has already compiled a part of ``model`` (``@support_torch_compile``
    sets ``compiled`` after its first compiled call): hooks added now are not in its graph."""
    return any(getattr(module, "compiled", None) is True or getattr(module, "aot_compiled_fn", None) is not None
               for module in model.modules())


def attach(model: nn.Module, baseline=None, **options) -> Any:
    """``moewatch.attach`` for a model run by vLLM (the plugin calls this; so may you, in the
    worker, e.g. through ``LLM.apply_model``). Warns with :class:`EngineAttachWarning` when
    vLLM has compiled the model already: the compiled graph does not call moewatch."""
    import moewatch

    late = compiled_already(model)
    if late:
        message = ("moewatch attached to a vLLM model that is already compiled: the compiled graph "
                   "does not call moewatch's hooks, so its counts stay at zero. Attach before vLLM "
                   "compiles: set MOEWATCH_PORT and let the vLLM plugin attach, or run with "
                   "enforce_eager=True")
        logger.warning(message)
        warnings.warn(message, EngineAttachWarning, stacklevel=2)
    from .vllm_plugin import patch_steps

    patch_steps()  # the requests of each step, from the worker's scheduler output
    return moewatch.attach(model, baseline, **options)


__all__ = ["EngineAttachWarning", "VllmEngine", "attach", "compiled_already", "engine_of", "find_gate",
           "layer_spec", "moe_layers", "router_scoring", "watched_engine"]
