"""``attach`` options from the environment: ``MOEWATCH_<OPTION>`` for every option.

Serving engines start moewatch from a plugin, where the only way in is the environment:
``MOEWATCH_WINDOW_TOKENS=4096``, ``MOEWATCH_BASELINE=/srv/baseline.json``,
``MOEWATCH_ALERTMANAGER_URL=http://127.0.0.1:9093``, ``MOEWATCH_GATES=a.*.gate,b.*.gate``...
Values are converted to the option's type; a value that cannot be converted, or that
``attach`` would refuse, raises :class:`EnvOptionError` naming the variable, at start-up.
"""
from __future__ import annotations

import os
from dataclasses import fields
from typing import Any, Dict, Mapping, Optional, Tuple

from ..hotpath.numba_backend import KERNEL_CHOICES
from ..options import Options

PREFIX = "MOEWATCH_"
# Variables read by the engine plugins themselves (not attach options).
ENGINE_VARIABLES = {
    "PORT": "base port of /metrics (the plugin is off without it); each worker serves on PORT + local rank",
    "ADDR": "address /metrics listens on (default 127.0.0.1)",
    "BASELINE": "path of a baseline file (moewatch.attach's baseline=)",
    "CPU_KERNEL": "the CPU reader's reduction: numba (the default where numba is installed) or numpy",
}
# Options that only Python code can pass (objects, not text).
NOT_FROM_ENV = {"meter_provider"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class EnvOptionError(ValueError):
    """A ``MOEWATCH_*`` variable whose value moewatch cannot use; the message names it."""


def check_cpu_kernel(environ: Optional[Mapping[str, str]] = None) -> None:
    """Refuse a ``MOEWATCH_CPU_KERNEL`` that is neither ``numba`` nor ``numpy`` (the process's
    switch, read when moewatch is imported: misspelt, it would leave the kernel on without a
    word). Raises :class:`EnvOptionError`; ``attach`` and the engines' start-up call it."""
    kernel = (os.environ if environ is None else environ).get(PREFIX + "CPU_KERNEL")
    if kernel is not None and kernel.strip().lower() not in KERNEL_CHOICES:
        raise EnvOptionError(f"{PREFIX}CPU_KERNEL={kernel!r} must be one of {', '.join(KERNEL_CHOICES)}")


def variable(option: str) -> str:
    """The environment variable of an ``attach`` option: ``window_tokens`` -> ``MOEWATCH_WINDOW_TOKENS``."""
    return PREFIX + option.upper()


def _kind(annotation: Any) -> Tuple[type, bool]:
    """(base type, optional) of an Options field annotation (strings under postponed annotations)."""
    text = annotation if isinstance(annotation, str) else repr(annotation)
    optional = "Optional" in text or "None" in text
    for name, kind in (("Sequence", list), ("bool", bool), ("int", int), ("float", float), ("str", str)):
        if name in text:
            return kind, optional
    return object, optional


def _convert(name: str, raw: str, annotation: Any) -> Any:
    kind, optional = _kind(annotation)
    text = raw.strip()
    if optional and text.lower() in ("", "none"):
        return None
    if kind is list:  # gates: one pattern, or several separated by commas
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise EnvOptionError(f"{variable(name)}={raw!r}: name at least one module pattern, "
                                 "e.g. 'model.layers.*.mlp.gate' (several separated by commas)")
        return parts[0] if len(parts) == 1 else parts
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise EnvOptionError(f"{variable(name)}={raw!r} must be one of 1/0, true/false, yes/no, on/off")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise EnvOptionError(f"{variable(name)}={raw!r} must be an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise EnvOptionError(f"{variable(name)}={raw!r} must be a number") from None
    return text


def options_from_env(environ: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """The ``attach`` keyword arguments set in ``environ`` (default ``os.environ``), each checked.

    ``MOEWATCH_BASELINE`` comes back as ``baseline`` (a path). Raises :class:`EnvOptionError`
    naming the first variable whose value is not usable.
    """
    environ = os.environ if environ is None else environ
    hints = {f.name: f.type for f in fields(Options)}  # annotations as text (postponed)
    kwargs: Dict[str, Any] = {}
    for field in fields(Options):
        raw = environ.get(variable(field.name))
        if raw is None:
            continue
        if field.name in NOT_FROM_ENV:
            raise EnvOptionError(f"{variable(field.name)} cannot be set from the environment "
                                 "(it takes a Python object): pass it to moewatch.attach in code")
        value = _convert(field.name, raw, hints[field.name])
        try:  # the option alone, every other one at its default: an error can only be this one's
            Options(**{field.name: value}).validate()
        except (TypeError, ValueError) as error:
            raise EnvOptionError(f"{variable(field.name)}={raw!r}: {error}") from None
        kwargs[field.name] = value
    check_cpu_kernel(environ)
    baseline = environ.get(PREFIX + "BASELINE")
    if baseline is not None:
        if not baseline.strip():
            raise EnvOptionError(f"{PREFIX}BASELINE is empty: give the path of a baseline file, or unset it")
        if not os.path.isfile(baseline):
            raise EnvOptionError(f"{PREFIX}BASELINE={baseline!r}: no such file (record one with "
                                 "`moewatch baseline record` or Monitor.baseline().save())")
        kwargs["baseline"] = baseline
    return kwargs


def port_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """``MOEWATCH_PORT`` as a base port, or None when unset (engine plugins then do nothing)."""
    environ = os.environ if environ is None else environ
    raw = environ.get(PREFIX + "PORT")
    if raw is None or not raw.strip():
        return None
    try:
        port = int(raw.strip())
    except ValueError:
        raise EnvOptionError(f"{PREFIX}PORT={raw!r} must be a port number (1-65535)") from None
    if not 1 <= port <= 65535:
        raise EnvOptionError(f"{PREFIX}PORT={raw!r} must be a port number (1-65535)")
    return port


def unknown_variables(environ: Optional[Mapping[str, str]] = None) -> list:
    """``MOEWATCH_*`` names that are neither an option nor an engine variable (likely typos)."""
    environ = os.environ if environ is None else environ
    known = {variable(f.name) for f in fields(Options)} | {PREFIX + k for k in ENGINE_VARIABLES}
    return sorted(k for k in environ if k.startswith(PREFIX) and k not in known
                  and not k.startswith(PREFIX + "FUZZ_"))


__all__ = ["ENGINE_VARIABLES", "EnvOptionError", "options_from_env", "port_from_env", "unknown_variables",
           "variable"]
