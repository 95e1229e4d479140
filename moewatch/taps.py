"""Gate taps: where moewatch sees (and fire drills rewrite) what a gate module returns.

A tap is the gate module's ``forward``, wrapped: an instance attribute that calls the forward
the module had, then the fault transforms in the order they were added (each may return a new
output, which the model then receives), then the observers (the monitor's gate hook), and
returns the output. Faults therefore always come before the monitor, whichever was added first.

Why not a forward hook: a module with any forward hook takes ``nn.Module.__call__``'s slow path
(hook tables walked, sets built, always-called hooks checked), which on a CPU costs a decode
step's gate call more than moewatch's own work there: measured inside a forward on this
project's 2-core machine, 5-7 µs per call for a hook that does nothing, against about 0.5 µs
for a tap that does nothing (``benchmarks/hotpath.py`` measures the whole path). With a tap,
``__call__`` keeps its fast path. Dynamo inlines a patched ``forward`` and guards on it, so
compiled code is traced with the tap as it is.

A module that already has forward hooks (someone else's hook may rewrite the output, and the
model consumes what the hooks return: a hook registered after them sees that, a tap would not;
the slow path is taken anyway), or whose ``forward`` is already patched by someone else (an
accelerate hook, a forward compiled in place), is not tapped: :func:`tap_of` returns None and
the caller uses a forward hook there, as before taps. Removing the last user of a tap puts the module's own
``forward`` back; if something wrapped the tap meanwhile, the tap stays as a plain pass-through.
"""
from __future__ import annotations

from typing import Callable, List, Optional

from torch import nn
from torch.nn.modules.module import _global_forward_hooks

# transform(module, args, output) -> the new output, or None to keep it (a forward hook's contract)
Transform = Callable[[nn.Module, tuple, object], object]
# observer(module, args, kwargs, output) -> None (a forward hook with kwargs' contract)
Observer = Callable[[nn.Module, tuple, dict, object], None]


class Tap:
    """A module's forward with transforms and observers after it (see the module docstring)."""

    def __init__(self, module: nn.Module, inner: Callable):
        self.module = module
        self.inner = inner  # the forward the module had: its class's, bound
        self.__wrapped__ = inner  # inspect.signature(module.forward) reads the real signature
        self.transforms: List[Transform] = []
        self.observers: List[Observer] = []

    def __call__(self, *args, **kwargs):
        output = self.inner(*args, **kwargs)
        for transform in self.transforms:
            changed = transform(self.module, args, output)
            if changed is not None:
                output = changed
        for observe in self.observers:
            observe(self.module, args, kwargs, output)
        return output

    def __reduce__(self):
        # A copy of the model (deepcopy, pickling) gets the module's own forward, without the
        # observers and fault transforms: they belong to the original's monitor and drills.
        return (getattr, (self.module, self.inner.__name__))

    def __repr__(self) -> str:
        return (f"<moewatch tap on {type(self.module).__name__}.forward: {len(self.transforms)} transform(s), "
                f"{len(self.observers)} observer(s)>")


class TapHandle:
    """Removes one transform or observer from a tap (a hook handle's ``remove()``). Idempotent."""

    def __init__(self, tap: Tap, members: list, member):
        self.tap = tap
        self._members = members
        self._member = member

    def remove(self) -> None:
        if self._member is None:
            return
        try:
            self._members.remove(self._member)
        except ValueError:
            pass
        self._member = None
        tap = self.tap
        if not tap.transforms and not tap.observers and tap.module.__dict__.get("forward") is tap:
            del tap.module.__dict__["forward"]  # the class's forward again


def tapped(module: nn.Module) -> bool:
    """Whether ``module``'s forward is a moewatch tap."""
    return isinstance(module.__dict__.get("forward"), Tap)


def _is_own_forward(module: nn.Module, forward) -> bool:
    """Whether an instance's ``forward`` is its class's, bound to it: what a copy of a tapped
    module holds (``Tap.__reduce__``), as good as no patch at all."""
    return (getattr(forward, "__self__", None) is module
            and getattr(forward, "__func__", None) is getattr(type(module), "forward", None))


def tap_of(module: nn.Module) -> Optional[Tap]:
    """The module's tap, installed now if it has none; None where a forward hook must be used
    instead: the module has forward hooks already, or its forward is someone else's."""
    own = module.__dict__.get("forward")
    if isinstance(own, Tap):
        return own
    if own is not None and not _is_own_forward(module, own):
        return None  # patched by another library, or compiled in place: leave it be
    if module._forward_hooks or _global_forward_hooks:  # they may rewrite what the model receives
        return None
    tap = Tap(module, module.forward)
    module.__dict__["forward"] = tap
    return tap


def add_observer(module: nn.Module, observer: Observer):
    """Call ``observer(module, args, kwargs, output)`` after every forward of ``module``.

    Returns a handle with ``remove()``: a tap's, or a forward hook's where the module cannot be
    tapped (the observer then sees the output after the module's other forward hooks).
    """
    tap = tap_of(module)
    if tap is None:
        return module.register_forward_hook(observer, with_kwargs=True)
    tap.observers.append(observer)
    return TapHandle(tap, tap.observers, observer)


def add_transform(module: nn.Module, transform: Transform):
    """Rewrite ``module``'s output with ``transform(module, args, output)`` before any observer.

    Returns a handle with ``remove()``. Where the module cannot be tapped, a forward hook
    registered first (``prepend``) does it: observers that are hooks then see the new output.
    """
    tap = tap_of(module)
    if tap is None:
        return module.register_forward_hook(transform, prepend=True)
    tap.transforms.append(transform)
    return TapHandle(tap, tap.transforms, transform)
