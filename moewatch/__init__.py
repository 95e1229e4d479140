"""moewatch: watch the router of a Mixture-of-Experts model while it serves or trains."""
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
