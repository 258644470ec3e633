"""Graph passes on ``onnx_ir.Model``.

Each pass is a class in its own module, named ``<Verb><Object>Pass``, built on onnx-ir's pass
infrastructure: options are constructor arguments, ``pass_(model)`` runs ``requires`` → ``call`` →
``ensures`` and returns a :class:`~edgecomp.passes.base.PassReport` — the model, whether it
changed, and a structured record (summary counts and a per-layer table) for reports. Passes
never print.
"""

from typing import TYPE_CHECKING

from edgecomp.lazy import lazy_exports

if TYPE_CHECKING:
    from edgecomp.passes.base import EdgecompPass, PassReport, run_pass

__all__ = ["EdgecompPass", "PassReport", "run_pass"]

# light, so reading the optimize step's options (edgecomp.passes.options) imports no graph code
__getattr__, __dir__ = lazy_exports(__name__, {"base": __all__})
