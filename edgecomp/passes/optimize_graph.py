"""OptimizeGraphPass: clean the graph up so that what is quantized or pruned is what runs.

Cases handled:
- constant folding and shape-driven simplification (onnxscript's optimizer: folds Constant
  subgraphs, Shape→Gather chains with static shapes, no-op Casts/Reshapes/Identities);
- weights reached through ``Constant`` nodes or ``Identity`` (PaddlePaddle exports): Constants are
  lifted to initializers and Identities bypassed, so a MatMul/Conv/Gemm sees its constant weight;
- a dim stored as a negative number (``dim_value: -1``) becomes an unnamed symbolic dim before
  folding (folding would otherwise take -1 for a size); the model still loads with any batch;
- everything written stays valid at the model's declared opset: an attribute the rewriter adds
  that the opset lacks (``Reshape allowzero`` before 14) is dropped where it changes nothing,
  otherwise the pass fails with the node named;
- BatchNormalization folded into the preceding Conv/ConvTranspose/Gemm:
  ``W' = W * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``;
- optionally onnxruntime's transformer fusions (``fusions="bert"``): LayerNorm, SkipLayerNorm,
  BiasGelu, Attention, EmbedLayerNorm — the same kernels onnxruntime would fuse at load time,
  made explicit so later passes see them.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (not imported by onnx_ir itself)

from edgecomp.errors import ConfigError, EdgecompError, PassFailed
from edgecomp.graph import histogram
from edgecomp.options import Option
from edgecomp.passes.base import EdgecompPass, PassReport
from edgecomp.passes.upgrade_opset import drop_unsupported_defaults, new_violations, opset_violations

__all__ = ["OptimizeGraphPass", "OPTIONS"]

OPTIONS = (
    Option("fusions", str, "none", "also apply onnxruntime's transformer fusions (Attention, SkipLayerNorm, BiasGelu)",
           choices=("none", "bert")),
    Option("fold_constants", bool, True, "constant and BatchNorm folding", flag="--fold/--no-fold"),
)


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
        invalid_before = opset_violations(model)
        negative = _negative_dims_unknown(model)
        if self.fold_constants:
            import onnxscript.optimizer

            try:
                onnxscript.optimizer.optimize_ir(model)
            except EdgecompError:
                raise
            except Exception as e:
                from edgecomp.io import first_line

                raise PassFailed(f"graph cleanup (onnxscript's optimizer) failed on this model: "
                                 f"{type(e).__name__}: {first_line(e)}") from e
        _expose_constant_weights(model)
        if self.fusions == "bert":
            _apply_bert_fusions(model, self.num_heads, self.hidden_size)
        dropped = drop_unsupported_defaults(model)
        invalid = new_violations(model, invalid_before)
        if invalid:
            raise PassFailed(f"graph cleanup wrote a node the model's opset does not allow: {invalid[0]}")
        after = histogram(model)
        changed = before != after or weights_before != _weights(model)
        rows = [{"op": op, "before": before.get(op, 0), "after": after.get(op, 0)}
                for op in sorted(set(before) | set(after)) if before.get(op, 0) != after.get(op, 0)]
        summary = {"nodes_before": sum(before.values()), "nodes_after": sum(after.values())}
        if negative:
            summary["negative dims made symbolic"] = negative
        if dropped:
            summary["attributes dropped"] = len(dropped)
        return self.report(model, changed or bool(dropped) or bool(negative), summary, rows)


def _negative_dims_unknown(model: ir.Model) -> int:
    """Dims stored as a negative number (``dim_value: -1``, some converters' "any batch") become
    unnamed symbolic dims: constant folding would otherwise take -1 for a real size (a folded
    ``Shape`` then feeds -1 to Expand/Reshape). Returns how many dims were changed."""
    count = 0
    graphs = [model.graph] + [g for node in ir.traversal.RecursiveGraphIterator(model.graph)
                              for a in node.attributes.values()
                              for g in ([a.value] if a.type == ir.AttributeType.GRAPH else
                                        list(a.value) if a.type == ir.AttributeType.GRAPHS else [])]
    for g in graphs:
        values = [*g.inputs, *g.outputs, *(o for n in g for o in n.outputs)]
        for v in values:
            if v is None or v.shape is None or not any(isinstance(d, int) and d < 0 for d in v.shape):
                continue
            v.shape = ir.Shape([ir.SymbolicDim(None) if isinstance(d, int) and d < 0 else d for d in v.shape])
            count += 1
    return count


def _expose_constant_weights(model: ir.Model) -> None:
    """Constant nodes become initializers, and ``Identity(initializer)`` whose output is not a graph
    output is bypassed, so a weight fed either way is a constant input. (Identities of other values
    stay: in a subgraph, bypassing one would rename an outer-scope value.)"""
    ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
            continue
        x, y = node.inputs[0], node.outputs[0]
        if x is None or x.const_value is None or not x.is_initializer() or y.is_graph_output():
            continue
        if x.graph is not node.graph:
            continue  # an outer graph's initializer read in a subgraph: leave the scoping alone
        y.replace_all_uses_with(x)
        node.graph.remove(node, safe=True)


def _weights(model: ir.Model) -> dict[str, tuple]:
    """Initializer names and shapes: folding can change them without changing op counts."""
    return {name: tuple(v.shape) if v.shape is not None else None for name, v in model.graph.initializers.items()}


def _apply_bert_fusions(model: ir.Model, num_heads: int, hidden_size: int) -> None:
    """Replace ``model``'s graph with onnxruntime's fused one (in place on the ir.Model)."""
    import logging

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.onnx_model_bert import BertOnnxModel

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
