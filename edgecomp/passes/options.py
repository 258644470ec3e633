"""The options of the optimize step (:mod:`edgecomp.passes.optimize_graph`), declared once for
the CLI's flags, recipes and the Python API; kept apart so reading them imports no graph code."""

from __future__ import annotations

from edgecomp.options import Option

__all__ = ["OPTIONS"]

OPTIONS = (
    Option("fusions", str, "none", "also apply onnxruntime's transformer fusions (Attention, SkipLayerNorm, BiasGelu)",
           choices=("none", "bert")),
    Option("fold_constants", bool, True, "constant and BatchNorm folding", flag="--fold/--no-fold"),
    Option("layout", bool, False, "merge/fold Transpose and Reshape chains in the file (onnxruntime makes the same "
           "rewrites at session load; for runtimes or tools that read the file as written)", flag="--layout/--no-layout"),
)
