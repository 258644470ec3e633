"""Package ``__init__`` files that stay light: public names loaded from their module on first use.

``import edgecomp.quantize.options`` (what the CLI reads to build its flags) runs the package's
``__init__`` first; a package that re-exports its ``run`` eagerly would import numpy, onnx_ir and
every pass for ``edgecomp --help``. :func:`lazy_exports` gives the package a module-level
``__getattr__`` (PEP 562) that imports the owning module when a name is first read and caches it
in the package's namespace, so ``from edgecomp.quantize import run`` still works unchanged.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``; ``exports`` maps a submodule to the names it provides."""
    home = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = home.get(name)
        if module is None:  # a submodule not yet imported, or a typo: the import system handles both
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(home))

    return __getattr__, __dir__
