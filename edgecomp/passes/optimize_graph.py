"""OptimizeGraphPass: clean the graph up so that what is quantized or pruned is what runs.

Cases handled:
- constant folding and shape-driven simplification (onnxscript's optimizer: folds Constant
  subgraphs, Shape→Gather chains with static shapes, no-op Casts/Reshapes/Identities);
- BatchNormalization folded into the preceding Conv/ConvTranspose/Gemm:
  ``W' = W * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``;
- optionally onnxruntime's transformer fusions (``fusions="bert"``): LayerNorm, SkipLayerNorm,
  BiasGelu, Attention, EmbedLayerNorm — the same kernels onnxruntime would fuse at load time,
  made explicit so later passes see them.
"""

from __future__ import annotations

import onnx_ir as ir

from edgecomp.errors import ConfigError, PassFailed
from edgecomp.passes.base import EdgecompPass, PassReport, histogram

__all__ = ["OptimizeGraphPass"]


class OptimizeGraphPass(EdgecompPass):
    """Fold constants and BatchNorms; optionally apply onnxruntime's transformer fusions.

    Args:
        fold_constants: run onnxscript's constant folding and default rewrite rules.
        fusions: ``"none"`` or ``"bert"`` (onnxruntime.transformers.optimizer, model_type bert).
        num_heads, hidden_size: for ``fusions="bert"``; 0 lets onnxruntime detect them.
    """

    def __init__(self, *, fold_constants: bool = True, fusions: str = "none", num_heads: int = 0, hidden_size: int = 0):
        if fusions not in ("none", "bert"):
            raise ConfigError(f"unknown fusions {fusions!r}; use none or bert")
        self.fold_constants = fold_constants
        self.fusions = fusions
        self.num_heads = num_heads
        self.hidden_size = hidden_size

    def call(self, model: ir.Model) -> PassReport:
        before, weights_before = histogram(model), _weights(model)
        if self.fold_constants:
            import onnxscript.optimizer

            onnxscript.optimizer.optimize_ir(model)
        if self.fusions == "bert":
            _apply_bert_fusions(model, self.num_heads, self.hidden_size)
        after = histogram(model)
        changed = before != after or weights_before != _weights(model)
        rows = [{"op": op, "before": before.get(op, 0), "after": after.get(op, 0)}
                for op in sorted(set(before) | set(after)) if before.get(op, 0) != after.get(op, 0)]
        return self.report(model, changed, {"nodes_before": sum(before.values()), "nodes_after": sum(after.values())}, rows)


def _weights(model: ir.Model) -> dict[str, tuple]:
    """Initializer names and shapes: folding can change them without changing op counts."""
    return {name: tuple(v.shape) if v.shape is not None else None for name, v in model.graph.initializers.items()}


def _apply_bert_fusions(model: ir.Model, num_heads: int, hidden_size: int) -> None:
    """Replace ``model``'s graph with onnxruntime's fused one (in place on the ir.Model)."""
    import logging

    from onnxruntime.transformers.onnx_model_bert import BertOnnxModel
    from onnxruntime.transformers.fusion_options import FusionOptions

    from edgecomp.io import from_proto, to_proto

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    try:
        bert = BertOnnxModel(to_proto(model), num_heads, hidden_size)
        opts = FusionOptions("bert")
        bert.optimize(opts, add_dynamic_axes=False)
        bert.topological_sort()
        fused = from_proto(bert.model)
    except Exception as e:
        raise PassFailed(f"onnxruntime's bert fusions failed: {type(e).__name__}: {e}") from e
    _replace_graph(model, fused)


def _replace_graph(model: ir.Model, other: ir.Model) -> None:
    model.graph = other.graph  # a model's opset_imports are its graph's: they come along
