"""Optional dependencies (pip extras) imported where a capability needs them, with one line
naming the extra when one is missing.

torch is an extra (``pip install 'edgecomp[torch]'``): every ONNX command (optimize, quantize,
prune, reduce-embeddings, validate, bench, inspect, convert of an ONNX model) runs without it;
export and distill call :func:`require_torch` before any work and refuse in one line.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from edgecomp.errors import MissingExtra

__all__ = ["require", "require_torch"]


def require(module: str, extra: str, what: str) -> ModuleType:
    """``module`` imported, or :class:`MissingExtra` saying ``what`` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name not in (None, module):
            raise  # the module is there but one of its own imports is broken: not a missing extra
        raise MissingExtra(f"{what} needs {module}, which is not installed: pip install 'edgecomp[{extra}]'") from e


def require_torch(what: str) -> ModuleType:
    """torch, or one line: ``{what} needs torch, which is not installed: pip install 'edgecomp[torch]'``."""
    return require("torch", "torch", what)
