"""Which nodes static quantization can make int8 (MatMul, Gemm, Conv, residual Add), and why the
others stay float (constant weights, supported ranks, subgraphs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import onnx_ir as ir

from edgecomp.graph import attribute, single_use, subgraphs
from edgecomp.passes.specialize_inputs import mode_hint

__all__ = ["Layer", "family_of", "find_layers"]


@dataclasses.dataclass
class Layer:
    node: str
    op: str
    family: str
    act: str
    out_after: str | None = None  # conv: the Relu/Clip whose output gets the output Q
    out_value: str | None = None  # conv: the value the output Q quantizes
    act_b: str | None = None  # attention: the second activation (the MatMul's B input)



LAYER_OPS = ("MatMul", "Gemm", "Conv")



SUBGRAPH_REASON = ("inside {article} {op} subgraph: not quantized (calibration cannot observe values inside "
                   "subgraphs)")



#: An initializer that is also a graph input is a default the caller may feed (IR >= 4): quantizing
#: it would freeze the default and ignore what is fed.
OVERRIDABLE_REASON = "{what} is a graph input (a default the caller may feed): kept float"


def find_layers(model: ir.Model) -> tuple[list[Layer], list[dict[str, Any]]]:
    """Quantizable layers, and rows for layers of quantizable ops that must stay float (with why),
    including those inside If/Loop/Scan subgraphs."""
    layers, skipped = [], []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in LAYER_OPS:
            continue
        if node.op_type == "MatMul" and all(v is not None and v.const_value is None and v.dtype in (None, ir.DataType.FLOAT)
                                            for v in node.inputs[:2]):
            # Q·Kᵀ and softmax·V: both operands are activations, quantized per tensor (edgecomp.quantize.attention)
            layers.append(Layer(node.name, "MatMul", "attention", node.inputs[0].name, act_b=node.inputs[1].name))
            continue
        reason = _unsupported(node)
        if reason:
            skipped.append({"layer": node.name, "op": node.op_type, "decision": "float", "reason": reason})
            continue
        if node.op_type == "Conv":
            w = node.inputs[1].const_value.shape.numpy()
            group = attribute(node, "group", 1)
            family = "conv-depthwise" if group > 1 and group == w[0] and w[1] == 1 else "conv"
            tail = _activation_after(node)
            out = (tail or node).outputs[0]
            layers.append(Layer(node.name, "Conv", family, node.inputs[0].name, tail.name if tail else None, out.name))
        else:
            layers.append(Layer(node.name, node.op_type, "matmul", node.inputs[0].name))
    layers += _residual_adds(model, layers)
    skipped += _subgraph_layers(model)
    return layers, skipped



def _subgraph_layers(model: ir.Model) -> list[dict[str, Any]]:
    """A row per MatMul/Gemm/Conv inside a subgraph (If branches, Loop/Scan bodies)."""
    rows = []
    for owner in model.graph:
        for g in subgraphs(owner):
                for node in ir.traversal.RecursiveGraphIterator(g):
                    if node.domain in ("", "ai.onnx") and node.op_type in LAYER_OPS:
                        rows.append({"layer": node.name, "op": node.op_type, "decision": "float",
                                     "reason": SUBGRAPH_REASON.format(op=owner.op_type, article="an" if owner.op_type[:1] in "AEIOU" else "a"),
                                     "subgraph": owner.op_type})
    return rows



def _residual_adds(model: ir.Model, layers: Sequence[Layer]) -> list[Layer]:
    """Adds of two conv-branch tensors (residuals): with their output quantized, onnxruntime runs
    DequantizeLinear → Add → QuantizeLinear as one QLinearAdd instead of dequantize + float add.

    A conv-branch tensor is the output of a quantizable Conv (or of the Relu/Clip after it) or of
    such an Add; Adds elsewhere (a transformer's residuals, a MatMul's bias) are not layers."""
    branch = {l.out_value for l in layers if l.op == "Conv" and l.out_value}
    found = []
    for node in model.graph:  # topological: an Add's inputs are classified before it
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        if all(v is not None and v.name in branch for v in node.inputs):
            found.append(Layer(node.name, "Add", "conv", node.outputs[0].name))
            branch.add(node.outputs[0].name)
    return found



def _unsupported(node: ir.Node) -> str | None:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is not None and w.is_graph_input():
        return OVERRIDABLE_REASON.format(what="weight")
    if w is None or w.const_value is None:
        return "weight is not a constant initializer (of products of two activations, only MatMul is handled)"
    rank = len(w.const_value.shape)
    if node.op_type == "Conv":
        if rank not in (3, 4):
            return f"{rank - 2}-D convolution (1-D and 2-D are handled)"
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].is_graph_input():
            return OVERRIDABLE_REASON.format(what="bias")
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].const_value is None:
            return "bias is not a constant"
        return None
    if rank != 2:
        return f"weight has rank {rank} (batched MatMul)"
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0 or attribute(node, "beta", 1.0) != 1.0:
            return "Gemm with transA or alpha/beta != 1"
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].is_graph_input():
            return OVERRIDABLE_REASON.format(what="Gemm bias")
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].const_value is None:
            return "Gemm bias is not a constant"
    return None



def _activation_after(conv: ir.Node) -> ir.Node | None:
    nxt = single_use(conv.outputs[0])
    if nxt is not None and nxt.op_type in ("Relu", "Clip") and nxt.domain in ("", "ai.onnx"):
        return nxt
    return None



def no_layer_message(model: ir.Model, skipped: Sequence[Mapping[str, Any]], excluded: Sequence[Layer]) -> str:
    """One line: which ops the model has and why each quantizable op family was skipped."""
    ops: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        ops[key] = ops.get(key, 0) + 1
    listing = ", ".join(f"{op} x{n}" if n > 1 else op for op, n in sorted(ops.items(), key=lambda kv: -kv[1])[:12])
    if len(ops) > 12:
        listing += f", ... ({len(ops)} op types)"
    why: dict[tuple[str, str], int] = {}
    for row in skipped:
        why[(row["op"], row["reason"])] = why.get((row["op"], row["reason"]), 0) + 1
    for layer in excluded:
        why[(layer.op, "matches --exclude")] = why.get((layer.op, "matches --exclude"), 0) + 1
    parts = [f"{op} x{n}: {reason}" if n > 1 else f"{op}: {reason}" for (op, reason), n in why.items()]
    if not parts:
        parts = ["the model has no MatMul, Gemm or Conv"]
    hint = mode_hint(model) if any(r.get("subgraph") == "If" for r in skipped) else ""
    return (f"no quantizable layer (MatMul/Gemm with constant weights, 1-D/2-D Conv): {'; '.join(parts)}{hint} "
            f"(the model's ops: {listing})")


def family_of(layers: Sequence[Layer], node: str) -> str:
    """The op family of the layer ``node`` (a scan of ``layers``: build a dict for many lookups)."""
    return next(l.family for l in layers if l.node == node)
