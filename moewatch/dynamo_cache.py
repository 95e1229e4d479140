"""Make code that ``torch.compile`` compiled before attach (or detach) trace the hooks anew.

Dynamo does not guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards`` is on
by default): code it compiled for a module *class* runs for every instance of that class, with
whatever hooks existed when it traced. So a model compiled once without moewatch -- or another
instance of the same class, compiled earlier in the process -- would keep running a graph with
no gate op after ``attach``: outputs right, monitor blind. After ``detach`` a graph traced with
the hooks would keep calling the gate ops.

While a monitor is attached, Dynamo guards on module hooks (the option is turned back to its
previous value when the last monitor detaches): code compiled meanwhile for an instance without
hooks is not reused for a monitored one, nor the other way round. Attach and detach also drop
Dynamo's cached code for the ``forward`` of every module class
in the model (and ``Module._call_impl`` where a part was compiled in place with
``module.compile()``): the next call of those classes re-traces, once, with the hooks as they are
now. Other compiled code in the process is left alone. Code a user compiled around the model
(``torch.compile(step_fn)``) cannot be found from the model: attach before compiling it.
"""
from __future__ import annotations

import logging
import threading
from types import CodeType
from typing import List, Set

from torch import nn

log = logging.getLogger("moewatch")


def _compiled_in_place(model: nn.Module) -> bool:
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def model_code(model: nn.Module) -> List[CodeType]:
    """The code objects Dynamo may have compiled for this model's modules."""
    seen: Set[CodeType] = set()
    codes: List[CodeType] = []
    for module in model.modules():
        code = getattr(getattr(type(module), "forward", None), "__code__", None)
        if code is not None and code not in seen:
            seen.add(code)
            codes.append(code)
        # a forward compiled in place on the instance (module.forward = torch.compile(...))
        own = module.__dict__.get("forward")
        inner = getattr(own, "_torchdynamo_orig_callable", None)
        code = getattr(getattr(inner, "__func__", inner), "__code__", None)
        if code is not None and code not in seen:
            seen.add(code)
            codes.append(code)
    if _compiled_in_place(model):  # module.compile() compiles Module._call_impl itself
        code = nn.Module._call_impl.__code__
        if code not in seen:
            codes.append(code)
    return codes


def forget_compiled_code(model: nn.Module) -> int:
    """Drop Dynamo's cache entries for the model's code; returns how many code objects were reset.

    Never raises: without Dynamo (or with a torch that lacks the entry point) nothing was
    compiled through it, or nothing can be done; either way the model runs as before.
    """
    try:
        from torch._dynamo.eval_frame import remove_from_cache
    except Exception:  # no Dynamo in this torch
        return 0
    reset = 0
    for code in model_code(model):
        try:
            remove_from_cache(code)
            reset += 1
        except Exception as error:  # pragma: no cover - depends on torch internals
            log.debug("moewatch: could not reset compiled code %s: %s", code.co_name, error)
    return reset


_GUARD_LOCK = threading.Lock()
_guarding = {"monitors": 0, "previous": None}


def guard_hooks() -> None:
    """Make Dynamo guard on module hooks while at least one monitor is attached."""
    try:
        from torch._dynamo import config
    except Exception:  # no Dynamo in this torch
        return
    with _GUARD_LOCK:
        if _guarding["monitors"] == 0:
            _guarding["previous"] = config.skip_nnmodule_hook_guards
        _guarding["monitors"] += 1
        config.skip_nnmodule_hook_guards = False


def release_hooks_guard() -> None:
    """The counterpart of :func:`guard_hooks`, at detach."""
    try:
        from torch._dynamo import config
    except Exception:
        return
    with _GUARD_LOCK:
        if _guarding["monitors"] == 0:
            return
        _guarding["monitors"] -= 1
        if _guarding["monitors"] == 0 and _guarding["previous"] is not None:
            config.skip_nnmodule_hook_guards = _guarding["previous"]
