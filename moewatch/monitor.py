"""``moewatch.attach`` and the :class:`Monitor` it returns."""
from __future__ import annotations

import threading
import time
import warnings
import weakref
from collections import deque
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .accumulators import Snapshot
from .context import MaskTracker, call_running
from .baseline import as_baseline
from .decisions import DecisionRecorder
from .discovery import resolve_gates
from .taps import add_observer
from .dynamo_cache import forget_compiled_code, guard_hooks, release_hooks_guard
from .engines import engine_for
from .engines.env import check_cpu_kernel
from .errors import ErrorLog
from .health import Health
from .hooks import CompanionHook, GateHook
from .hotpath import staged
from .hotpath.banks import Banks
from .hotpath.serial import run_this_thread_serially
from . import forksafety
from .liveness import MonitoringStatus
from .options import Options
from .postmortem import Postmortem
from .routing import GateInfo
from .warmups import watch_warmups
from .windows import Window, close_window, windows_frame

# model -> its monitor; weak, so a monitor never keeps a model alive.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, Monitor]" = weakref.WeakKeyDictionary()
_ATTACH_LOCK = threading.Lock()

# listener(window, health) is called after every closed window, off the model's thread.
Listener = Callable[[Window, Health], None]


def _execution_device(module: nn.Module) -> Optional[torch.device]:
    """Where accelerate runs a module whose weights it offloads or moves at each call (its hook's
    ``execution_device``; the weights wait on the meta device, the CPU or disk), or None."""
    hook = getattr(module, "_hf_hook", None)
    for one in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # SequentialHook or one
        device = getattr(one, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return None


def _device_of(module: nn.Module, fallback: torch.device, ancestors: Sequence[nn.Module] = ()) -> torch.device:
    """The device a module computes on: its accelerate hook's execution device, else its
    parameters' (or buffers'), else the nearest ancestor's hook's, else ``fallback``. Weights on
    the meta device (offloaded) say nothing: the module computes where its hook brings them."""
    device = _execution_device(module)
    if device is not None:
        return device
    for tensor in list(module.parameters(recurse=True)) + list(module.buffers(recurse=True)):
        if tensor.device.type != "meta":
            return tensor.device
    for ancestor in ancestors:  # nearest first
        device = _execution_device(ancestor)
        if device is not None:
            return device
    return fallback


def _ancestors(model: nn.Module) -> Dict[int, List[nn.Module]]:
    """id(module) -> its ancestors in ``model``, nearest first."""
    chains: Dict[int, List[nn.Module]] = {id(model): []}
    for module in model.modules():  # parents before their children
        for child in module.children():
            chains.setdefault(id(child), [module] + chains.get(id(module), []))
    return chains


def _parallel_ranks(engine, errors: ErrorLog) -> Dict[str, int]:
    """The engine's parallel ranks; a failure to read them is counted, never raised."""
    try:
        return dict(engine.parallel_ranks())
    except Exception as error:  # the engine's state is its own: monitoring goes on without it
        errors.record("engine", error, where="parallel ranks")
        return {}


def _separate_encoder(model: nn.Module) -> Optional[nn.Module]:
    """The encoder of a transformers encoder-decoder model (which ``generate()`` calls on its own), or None."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    try:
        encoder = model.get_encoder()
    except Exception:  # a model without one: nothing to add
        return None
    return encoder if isinstance(encoder, nn.Module) and encoder is not model else None


def _release(banks, stop: threading.Event, wake: threading.Event) -> None:
    """What a monitor holds beyond itself: its reader (stopped) and its banks (unregistered)."""
    stop.set()
    wake.set()
    banks.close()


def _root_running_of(monitor_ref) -> Callable[[], bool]:
    """``Monitor._root_running`` without a strong reference to the monitor (its banks keep this)."""
    def root_running() -> bool:
        monitor = monitor_ref()
        return monitor is not None and monitor._root_running()

    return root_running


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    for attr in ("name_or_path", "_name_or_path", "model_type"):
        value = getattr(config, attr, None)
        if isinstance(value, str) and value:
            return value
    return type(model).__name__


class Monitor:
    """Watches the gates of one model. Create it with :func:`moewatch.attach`."""

    def __init__(self, model: nn.Module, baseline=None, **options):
        self.options = Options.from_kwargs(options)
        engine = engine_for(model)  # a serving engine's model (moewatch.engines), or None
        specs = engine.gates(model, self.options) if engine is not None else resolve_gates(
            model, self.options.gates, self.options.top_k, self.options.scoring, self.options.num_experts)
        self.model_name = self.options.model_name or (engine.model_name(model) if engine is not None else None) \
            or _model_name(model)
        # expert placement (moewatch.placement): checked against the gates before anything starts
        self._placement = _resolve_placement(self.options, specs)
        self.errors = ErrorLog()
        self._model = weakref.ref(model)
        # {"tp": 0, "dp": 1, ...}: the process's place in the engine's parallel groups (the
        # parallel_rank_info metric); empty outside an engine that runs it in such groups
        self.parallel_ranks: Dict[str, int] = _parallel_ranks(engine, self.errors) if engine is not None else {}
        self._gates: List[GateInfo] = [s.info for s in specs]
        self._masks = MaskTracker(model, real_tokens=engine.real_tokens if engine is not None else None,
                                  requests=engine.requests if engine is not None else None)
        encoder = _separate_encoder(model) if engine is None else None
        # generate() runs an encoder-decoder model's encoder on its own, before the decoding
        # steps: its calls are forwards too, with the encoder's padding mask
        self._encoder_masks = MaskTracker(encoder) if encoder is not None else None
        self._lock = threading.RLock()  # snapshot + window close
        self._listeners: List[Listener] = []
        self._ring: deque = deque(maxlen=self.options.ring_windows)
        self._next_window = 0
        self._health = Health(note="no window closed yet", monitoring="no_data")
        self._status = MonitoringStatus(self.errors, [g.name for g in self._gates])  # ok / no_data / failing
        devices = self._devices(model, specs)
        self._last = Snapshot.zeros(len(specs), max(s.info.num_experts for s in specs))
        self._force_asked = False  # the reader asked the device banks for a cut (window_seconds)
        self._taking = False  # a take is under way (on the thread that holds the lock)
        self._baseline = as_baseline(baseline)  # loaded once: the detector's, and a dump's metadata
        if self._baseline is not None and engine is not None and engine.holds_part_of_model():
            # a pipeline stage: the whole model's baseline, for the layers this stage holds
            self._baseline = self._baseline.only([spec.info.name for spec in specs])
        self._detector = self._make_detector(self._baseline)
        self._exporters = self._start_exporters()
        # sampled per-token decisions for dumps (None unless sample_decisions > 0)
        self._decisions = DecisionRecorder.create(
            self.options.sample_decisions, self.options.decision_slots, self._gates,
            devices, self.options.ring_windows)
        capacity = [None if s.info.native_capacity else self.options.capacity_factor for s in specs]
        self._banks = Banks(self._gates, devices, capacity, [s.mask_key for s in specs], self.errors,
                            self.options.window_tokens,
                            self._decisions.sampler if self._decisions else (lambda name: None),
                            self.options.backend)
        self._masks.banks = self._banks
        for bank in self._banks.banks:  # gate calls of a forward already under way at attach
            if hasattr(bank, "root_running"):
                bank.root_running = _root_running_of(weakref.ref(self))
        if self._encoder_masks is not None:
            self._encoder_masks.banks = self._banks
        if engine is not None:  # an engine that gathers data-parallel ranks' tokens places ours
            self._banks.set_locate_rows(engine.row_locator())
        self._place_experts()
        self._hooks = self._install(model, specs)
        if engine is not None:  # an engine that marks its steps' forwards itself spares the root hooks
            drive = engine.drive_steps(self._banks)
            if drive is not None:
                self._hooks.append(drive)
                self._masks.steps = engine
        guard_hooks()  # code compiled from now on is not shared with unhooked instances
        forget_compiled_code(model)  # code compiled without the hooks re-traces with them
        self._postmortem = Postmortem(self, self._decisions)  # timeline, automatic dumps
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by a forward (a poll is due early) or by detach
        # the ops' registry holds the banks (accumulators, co-selection, staged calls) until they
        # are closed: by detach(), else when this monitor is collected (its model dropped
        # undetached), when its reader is stopped too
        self._close_banks = weakref.finalize(self, _release, self._banks, self._stop, self._wake)
        self._reader = None
        if self.options.background:
            self._start_reader()
        forksafety.track(self)

    def _place_experts(self) -> None:
        from .placement.balance import home_rank
        from .placement.history import CoselectionHistory

        self._coselection = CoselectionHistory(len(self._gates), max(g.num_experts for g in self._gates),
                                               self.options.ring_windows)
        self._home_rank = None
        if self._placement is not None:
            self._home_rank = home_rank(self.options, self._placement.num_ranks)
            for index, gate in enumerate(self._gates):
                self._banks.set_ranks(index, self._placement.ranks[gate.name])

    def _start_reader(self) -> None:
        self._banks.set_wake(self._wake.set)
        self._reader = threading.Thread(target=_reader_loop, args=(weakref.ref(self), self._stop, self._wake,
                                        self._poll_seconds()), name="moewatch-reader", daemon=True)
        self._reader.start()

    def _after_fork_in_child(self) -> None:
        """In a forked child: new locks everywhere (any could have been held), a new reader."""
        parts = [self, self.errors, self._status, self._banks, self._postmortem, *self._banks.banks,
                 *self._exporters]
        if self._decisions is not None:
            parts += list(self._decisions.rings.values())
        forksafety.renew_locks(parts)
        self._taking = False  # a take that another thread had under way did not come along
        if self._reader is not None and self._hooks:
            self._stop, self._wake = threading.Event(), threading.Event()
            self._start_reader()

    # -- set-up ---------------------------------------------------------------------------
    @staticmethod
    def _devices(model: nn.Module, specs) -> List[torch.device]:
        """The device each gate computes on (``_device_of``), else the model's."""
        default = _device_of(model, torch.device("cpu"))
        chains = _ancestors(model)
        return [_device_of(spec.module, default, chains.get(id(spec.module), ())) for spec in specs]

    def _root_running(self) -> bool:
        """Whether the model (or its encoder, which ``generate()`` calls on its own) is being
        called on this thread: asked of a gate call made outside a monitored forward."""
        model = self._model()
        if model is None:
            return False
        encoder = _separate_encoder(model) if self._encoder_masks is not None else None
        return call_running((model,) if encoder is None else (model, encoder))

    def _install(self, model: nn.Module, specs) -> list:
        handles = [
            model.register_forward_pre_hook(self._masks.pre_hook, with_kwargs=True),
            model.register_forward_hook(self._masks.post_hook, with_kwargs=True, always_call=True),
        ]
        encoder = _separate_encoder(model) if self._encoder_masks is not None else None
        if encoder is not None:  # inside the model's forward, a nested one: the outer mask holds
            handles += [encoder.register_forward_pre_hook(self._encoder_masks.pre_hook, with_kwargs=True),
                        encoder.register_forward_hook(self._encoder_masks.post_hook, with_kwargs=True,
                                                      always_call=True)]
        for spec, (bank, row) in zip(specs, self._banks.rows):
            hook = GateHook(spec, self._banks.banks[bank], row, self.errors)
            for companion in spec.companions:  # before the gate observer: they feed its extract
                helper = CompanionHook(companion.hook, hook)
                if companion.pre:
                    handles.append(companion.module.register_forward_pre_hook(helper, with_kwargs=True))
                else:
                    handles.append(add_observer(companion.module, helper))
            if spec.install is not None:  # an engine's seam (e.g. vLLM's router capture callback)
                handles.append(spec.install(hook))
            else:  # a tap where it can (no hook slow path on every call), else a forward hook
                handles.append(add_observer(spec.module, hook))
        return handles

    # -- seams to the parts that read windows (each lives in a module of its own) ----------
    def _make_detector(self, baseline):
        """The detector for this monitor (moewatch.detector), with or without a baseline.

        A baseline that does not match the model's gates raises ``moewatch.BaselineError`` here.
        """
        from .detector import make_detector

        return make_detector(self, baseline)

    def _start_exporters(self) -> list:
        """Exporters asked for in the options (moewatch.export); each has close(), called on detach."""
        from .export import start_exporters

        return start_exporters(self)

    def _poll_seconds(self) -> float:
        """The reader's pace where every poll takes (a device bank), and after a poll that closed
        an aged window (the device cuts at the next forward end: one poll later, itself)."""
        return min(0.25, self.options.window_seconds / 4)

    # -- reading the accumulators ----------------------------------------------------------
    def _take(self, force: bool, idle: bool = True, hold: bool = False) -> None:
        """Reduce what the forwards left; close a window at every cut the hot path made.

        Windows are cut at forward ends only: when a window holds ``window_tokens`` tokens, or
        with ``force`` (``flush``, ``window_seconds``) after the last forward that ended.
        """
        with self._lock:
            if self._taking:  # a listener reading inside a take: the take under way covers it
                return
            self._taking = True
            try:
                try:
                    self._banks.take(force, self._on_cut, idle, hold)
                except Exception as error:  # a fault of moewatch's own: counted, never raised into
                    # the caller (flush(), counts() and the exporters read through here)
                    self.errors.record("reader", error, where="take")
                    return
                try:
                    self._coselection.collect(self._banks.coselection)
                except Exception as error:  # the windows go on without the co-selection
                    self.errors.record("reader", error, where="coselection")
            finally:
                self._taking = False

    def _on_cut(self, when: float, sums: np.ndarray, counts: np.ndarray, absmax: np.ndarray,
                rows: np.ndarray) -> None:
        self._close(Snapshot(time=when, sums=sums, counts=counts, absmax=absmax, rows=rows))

    def _poll(self) -> float:
        """Reader thread: close the windows that are due (tokens) or too old (window_seconds);
        returns the seconds until the next poll, unless a forward wakes the reader sooner."""
        now = time.time()
        aged = now - self._last.time >= self.options.window_seconds
        if aged or self._banks.due(now):
            # a device bank cuts at the next forward end; one poll later with none, it cuts itself
            # hold: forwards that no window cut needs yet wait for a later poll (one batched reduction)
            self._take(force=aged, idle=aged and self._force_asked, hold=True)
            now = time.time()
        self._force_asked = aged
        return self._next_poll(now)

    def _next_poll(self, now: float) -> float:
        """Seconds until the open window ages out or the host banks' next look, within a bound
        (a clock step, a short window). A wake-up costs the model's cores ~0.1 ms even when it
        finds nothing (2-core machine): the reader sleeps until something can be due."""
        look = self._banks.next_look()
        if look <= 0.0:  # a device bank: every poll takes
            return self._poll_seconds()
        bound = max(self._poll_seconds(), min(staged.LOOK_SECONDS, self.options.window_seconds / 2))
        moments = [t for t in (self._last.time + self.options.window_seconds, look) if t > now]
        return max(0.01, min(min(moments) - now, bound)) if moments else bound

    def _close(self, current: Snapshot) -> Optional[Window]:
        window = close_window(self._next_window, self._last, current)
        self._last = current
        if not (window.tokens > 0).any():
            return None
        self._next_window += 1
        self._ring.append(window)
        self._coselection.on_window(window.index)
        self._health = self._status.on_close(self._judge(window), window)
        for listener in list(self._listeners):
            try:
                listener(window, self._health)
            except Exception as error:
                self.errors.record("listener", error, where=getattr(listener, "__name__", repr(listener)))
        return window

    def _judge(self, window: Window) -> Health:
        try:
            return self._detector.update(window, self._gates)
        except Exception as error:  # a detector bug must not stop the windows
            self.errors.record("detector", error)
            return Health(window=window.index, note=f"detector failed: {type(error).__name__}: {error}")

    # -- public API -----------------------------------------------------------------------
    @property
    def gates(self) -> List[GateInfo]:
        """The monitored gates: name, num_experts, top_k, family, scoring."""
        return list(self._gates)

    def flush(self) -> Health:
        """Close the current window now (if it saw traffic) and return the verdict.

        A sync point: use it in tests, at shutdown, or wherever you need the latest numbers.
        """
        with self._lock:
            self._take(force=True)
            return self._status.current(self._health)

    def counts(self) -> Dict[str, np.ndarray]:
        """{gate name: int64 [num_experts]} token->expert assignments since attach."""
        counts = self._live()[1]
        return {g.name: counts[i, 0, :g.num_experts].copy() for i, g in enumerate(self._gates)}

    def dropped(self) -> Dict[str, int]:
        """{gate name: dropped assignments since attach} (would-be drops with capacity_factor=)."""
        counts = self._live()[1]
        return {g.name: int(counts[i, 1, :g.num_experts].sum()) for i, g in enumerate(self._gates)}

    def _live(self):
        """sums and counts since attach, every ended forward included."""
        with self._lock:
            self._take(force=False)
            return self._banks.live()

    def coselection(self) -> Dict[str, np.ndarray]:
        """{gate name: int64 [E, E]} co-selection since attach: ``[i, j]`` tokens (padding excluded)
        that chose experts i and j together, ``[i, i]`` tokens that chose i (symmetric)."""
        with self._lock:
            self._take(force=False)
            matrices = self._banks.coselection()
        return {g.name: matrices[i, :g.num_experts, :g.num_experts].copy() for i, g in enumerate(self._gates)}

    def coselection_spans(self) -> pd.DataFrame:
        """The co-selection kept for postmortems: one row per (span of windows, gate), columns gate,
        window_first, window (the span's last), coselection (E x E counts, row-major); the windows
        closed since the last span included (see ``moewatch.placement.history``)."""
        with self._lock:
            return self._coselection.frame(self._gates, tail=self._banks.coselection)

    @property
    def placement(self):
        """The expert placement attached with (``moewatch.placement.Placement``), or None."""
        return self._placement

    def expert_parallel(self) -> pd.DataFrame:
        """Expert-parallel balance per (window, gate) under ``expert_placement=`` (empty without one):
        ep_rank_share (share of assignments per rank), ep_load_imbalance (max/mean rank load),
        alltoall_sends (token copies sent to other ranks), alltoall_sends_per_token."""
        from .placement.balance import expert_parallel_frame

        with self._lock:
            ring = list(self._ring)
        return expert_parallel_frame(ring, self._gates, self._placement, self._home_rank)

    def windows(self) -> pd.DataFrame:
        """The ring buffer: one row per (window, gate); see ``docs/api.md`` for the columns.

        Every window that the forwards ended so far filled is in it (the reader may publish a
        window to the exporters up to a couple of seconds after its last forward)."""
        with self._lock:
            self._take(force=False)
            ring = list(self._ring)
        return windows_frame(ring, self._gates)

    def dump(self, path) -> str:
        """Write the windows, the sampled decisions and the metadata to a Parquet file; returns its path.

        ``path`` may be a directory (a new file is named inside it). Written to a temporary name
        and renamed, so a crash never leaves a partial file. Raises ``moewatch.dump.DumpError``
        when the file cannot be written. Read it back with ``moewatch.read_dump``.
        """
        from .dump import write_dump

        return write_dump(self, path)

    def health(self) -> Health:
        """The verdict after the last closed window, with ``.monitoring``: "no_data" before the
        first window closes, "failing" while hooks, the reader or the detector fail."""
        return self._status.current(self._health)

    def baseline(self):
        """A :class:`moewatch.Baseline` of the windows observed so far (those still in the ring).

        Closes the current window first (like ``flush()``). Raises ``moewatch.BaselineError``
        when a gate has fewer than 8 windows with traffic, saying how much traffic is needed.
        """
        from .baseline import Baseline, BaselineError
        from .record import traffic_hint

        self.flush()
        try:
            return Baseline.from_monitor(self)
        except BaselineError as error:
            frame = self.windows()
            tokens = int(frame.groupby("gate")["tokens"].sum().max()) if len(frame) else 0
            windows = int(frame["window"].nunique()) if len(frame) else 0
            raise BaselineError(f"{error}; {traffic_hint(tokens, windows, self.options.window_tokens)}") from None

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(window, health)`` after every closed window (errors are counted)."""
        self._listeners.append(listener)

    def serve_prometheus(self, port: int = 9400, addr: str = "127.0.0.1", registry=None,
                         local_rank: Optional[int] = None) -> int:
        """Serve this monitor's metrics at ``http://addr:port/metrics``; returns the bound port.

        ``port`` is a base: rank ``LOCAL_RANK`` listens on ``port + LOCAL_RANK`` (``local_rank=``
        overrides it, e.g. from a serving engine's worker); ``port=0`` takes any free port.
        ``registry``: a prometheus-client ``CollectorRegistry`` of yours to add the moewatch
        collector to (and serve); a new one by default. Stopped on detach.
        """
        from .export.prometheus import serve

        endpoint = serve(self, port=port, addr=addr, registry=registry, local_rank=local_rank)
        self._exporters.append(endpoint)
        return endpoint.port

    def error_counts(self) -> Dict[str, int]:
        """Internal failures by component (hook, listener, exporters...), never raised."""
        return self.errors.counts()

    def detach(self) -> None:
        """Close the last window and remove every hook; the model is as before. Idempotent."""
        if not self._hooks:
            return
        self._stop.set()
        self._wake.set()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=5)
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        model = self._model()
        if model is not None:
            forget_compiled_code(model)  # compiled code stops calling the gate ops
        release_hooks_guard()
        try:
            self.flush()
        except Exception as error:  # the last window is lost, but detach must finish
            self.errors.record("detach", error)
        self._close_banks()
        self._postmortem.close()  # the shutdown dump, with dump_dir=
        for exporter in self._exporters:
            try:
                exporter.close()
            except Exception as error:
                self.errors.record("exporter", error, where=type(exporter).__name__)
        model = self._model()
        with _ATTACH_LOCK:
            if model is not None and _ATTACHED.get(model) is self:
                del _ATTACHED[model]

    def _pause(self) -> None:
        """Count nothing until ``_resume`` (a serving loop's warm-up: ``moewatch.warmups``)."""
        model = self._model()
        if model is not None:
            self._masks.pause(_device_of(model, torch.device("cpu")))

    def _resume(self) -> None:
        self._masks.resume()

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        return f"<moewatch.Monitor {self.model_name!r}: {len(self._gates)} gates, {len(self._ring)} windows>"


def _resolve_placement(options, specs):
    from .placement.spec import resolve_placement

    return resolve_placement(options.expert_placement, [s.info for s in specs])


def _reader_loop(monitor_ref, stop: threading.Event, wake: threading.Event, interval: float) -> None:
    run_this_thread_serially()  # the reductions never take the model's cores with a thread team
    delay = interval
    while True:
        wake.wait(delay)
        if stop.is_set():
            return
        wake.clear()  # before the poll: a forward that wakes the reader during it is seen next time
        monitor = monitor_ref()
        if monitor is None:
            return
        try:
            delay = monitor._poll()
        except Exception as error:  # keep reading; a bad poll must not end monitoring
            monitor.errors.record("reader", error)
            delay = interval
        del monitor


def _compiled_parts(model: nn.Module) -> List[str]:
    """Names of the modules of ``model`` that ``torch.compile`` already compiled in place."""
    found = []
    for name, module in model.named_modules():
        forward = module.__dict__.get("forward")
        if getattr(module, "_compiled_call_impl", None) is not None or (
                forward is not None and hasattr(forward, "_torchdynamo_orig_callable")):
            found.append(name or type(module).__name__)
    return found


_COMPILED_ADVICE = (
    "Dynamo does not re-trace for hooks added later, so moewatch dropped the compiled code of "
    "the model's modules: the next call recompiles once, with the gate ops in the graph. Code "
    "compiled around the model (torch.compile of your own function) cannot be found from the "
    "model and keeps running without the hooks. Attach before compiling (recommended), or call "
    "torch._dynamo.reset() after attaching.")


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile`` wrapper; warns about any compiled part of the model."""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
        warnings.warn(f"moewatch.attach got a torch.compile'd model. {_COMPILED_ADVICE}", stacklevel=3)
        return inner
    parts = _compiled_parts(model)
    if parts:
        shown = ", ".join(parts[:3]) + (f" and {len(parts) - 3} more" if len(parts) > 3 else "")
        warnings.warn(f"moewatch.attach got a model compiled in place ({shown}). {_COMPILED_ADVICE}",
                      stacklevel=3)
    return model


def attach(model: nn.Module, baseline=None, **options) -> Monitor:
    """Hook every gate of ``model`` and start watching its routing.

    ``baseline``: a :class:`moewatch.Baseline` or a path to one. Options (all optional):
    ``gates=`` (pattern or names, with ``top_k=``/``scoring=`` for your own gate modules),
    ``capacity_factor=``, ``window_tokens=``, ``window_seconds=``, ``ring_windows=``,
    ``sample_decisions=``, ``alertmanager_url=``, ``meter_provider=``, ``dump_dir=``,
    ``model_name=``. The model's outputs are unchanged; ``detach()`` removes every hook.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"moewatch.attach needs a torch.nn.Module, got {type(model).__name__}")
    check_cpu_kernel()  # the process's MOEWATCH_CPU_KERNEL, misspelt: refused, not ignored
    model = _uncompiled(model)
    with _ATTACH_LOCK:
        existing = _ATTACHED.get(model)
        if existing is not None and existing.attached:
            raise RuntimeError(
                f"a moewatch monitor is already attached to this {type(model).__name__}; "
                "use that monitor, or call its detach() before attaching again"
            )
        monitor = Monitor(model, baseline, **options)
        _ATTACHED[model] = monitor
    watch_warmups(_monitors_of)
    return monitor


def _monitors_of(model: nn.Module) -> List[Monitor]:
    """The attached monitors whose model is ``model`` or a module of it (a serving loop warms
    ``model`` up: ``moewatch.warmups``)."""
    with _ATTACH_LOCK:
        attached = [(root, monitor) for root, monitor in _ATTACHED.items() if monitor.attached]
    inside = {id(module) for module in model.modules()} if attached else set()
    return [monitor for root, monitor in attached if id(root) in inside]
