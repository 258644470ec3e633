"""KeepLayerNormPass: write a residual ``Add → LayerNormalization`` in a form onnxruntime leaves alone.

At session creation onnxruntime's ``SkipLayerNormFusion`` (default level, on by default) rewrites
``Add(a, b) → LayerNormalization`` into the contrib ``SkipLayerNormalization`` whenever both Add
inputs are 3-D with static, equal dimensions — a model whose inputs were specialized to one shape,
or a dynamo export with concrete sizes. On CPU that kernel is slower than the LayerNormalization it
replaces (a scalar loop against MLAS's vectorized LayerNorm, onnxruntime PR 31973): the static-shape
int8 all-MiniLM-L6-v2 ran 1.26x slower with it than with the fusion disabled (BENCHMARKS.md,
quantize-forms). The fusion matches the op type ``Add`` only, so the residual Add is written as
``Sum(a, b)`` — the same function for two inputs (multidirectional broadcasting, opset 8+) — which
onnxruntime runs with its ordinary element-wise kernel and no fusion. The alternative for a caller
who controls the session: ``disabled_optimizers=["SkipLayerNormFusion"]``.

Cases handled: a two-input float ``Add`` in the main graph whose only reader is a
``LayerNormalization`` (its first input) and which is not a graph output. Anything else is left.
Only for onnxruntime's CPU form: a mobile execution provider may support Add and not Sum, so the QDQ
form keeps its Adds.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from edgecomp.graph import single_use
from edgecomp.passes.base import EdgecompPass, PassReport

__all__ = ["KeepLayerNormPass"]


class KeepLayerNormPass(EdgecompPass):
    """Rewrite each residual ``Add`` read only by a LayerNormalization as ``Sum`` (see the module
    docstring). No options."""

    def call(self, model: ir.Model) -> PassReport:
        rows: list[dict[str, Any]] = []
        for node in model.graph:
            if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
                continue
            reader = single_use(node.outputs[0])
            if reader is None or reader.op_type != "LayerNormalization" or reader.inputs[0] is not node.outputs[0]:
                continue
            if node.outputs[0].dtype not in (None, ir.DataType.FLOAT):
                continue
            node.op_type = "Sum"
            rows.append({"node": node.name, "layernorm": reader.name})
        return self.report(model, bool(rows), {"residual adds written as Sum": len(rows)}, rows)
