"""edgecomp: prepare PyTorch models for mobile and edge CPUs.

Export to ONNX (:mod:`edgecomp.export`), transform the graph with passes
(:mod:`edgecomp.passes`), and check latency and fidelity with onnxruntime
(:mod:`edgecomp.measure.bench`, :mod:`edgecomp.measure.validate`).

The Python API (:mod:`edgecomp.api`): ``edgecomp.quantize(model, data, **options)`` and the other
capabilities, loaded on first use, so ``import edgecomp`` imports no model library. ``export``,
``quantize``, ``prune`` and ``distill`` are also the names of subpackages: those subpackages are
callable (calling one calls the API function), so ``edgecomp.quantize(...)`` works whether or not
``edgecomp.quantize`` was imported as a package before, and ``edgecomp.quantize.options`` still
names the module.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_API = ("export", "optimize", "quantize", "prune", "reduce_embeddings", "distill", "validate", "bench", "convert")
_SUBPACKAGES = ("export", "quantize", "prune", "distill")  # API names that are also modules of this package
__all__ = ["__version__", "export", "optimize", "quantize", "prune", "reduce_embeddings", "distill", "validate",
           "bench", "convert"]


class _CallableModule(types.ModuleType):
    """A capability subpackage that is also its API function (``edgecomp.quantize(model, data)``)."""

    def __call__(self, *args, **kwargs):
        from edgecomp import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    """``edgecomp`` itself: the import system binds each imported subpackage with setattr; the
    subpackages named like API functions are made callable then."""

    def __setattr__(self, name, value):
        if name in _SUBPACKAGES and isinstance(value, types.ModuleType) and not isinstance(value, _CallableModule):
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")  # bound (and made callable) by the import
    if name in _API:
        from edgecomp import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
