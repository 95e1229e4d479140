"""moewatch: watch the router of a Mixture-of-Experts model while it serves or trains."""
import importlib as _importlib

from . import faults  # moewatch.faults.two_expert_collapse(...) after a plain `import moewatch`
from .adapters.base import AdapterError
from .adapters.registry import supported_families
from .baseline import Baseline, BaselineError
from .dump import DumpError, DumpFormatError, read_dump
from .health import GateHealth, Health
from .monitor import Monitor, attach
from .routing import GateInfo

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "Baseline",
    "BaselineError",
    "DumpError",
    "DumpFormatError",
    "GateHealth",
    "GateInfo",
    "Health",
    "Monitor",
    "__version__",
    "attach",
    "read_dump",
    "supported_families",
]

# Submodules reachable as attributes without importing them first; loaded on first use because
# they need optional packages (integrations: transformers; report: matplotlib for the plots).
_LAZY_SUBMODULES = ("integrations", "report", "pretrained")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
