"""The rewrite of one planned activation × activation MatMul (attention's ``Q·Kᵀ`` and ``softmax·V``),
called by :class:`edgecomp.quantize.quantize_static.QuantizeStaticPass`; the plan and the math are in
:mod:`edgecomp.quantize.attention`.

- contrib form: ``MatMulIntegerToFloat(Q(A), Q(B), s_a, c·s_b, z_a, 0)``, quantizing above a chain
  of Transpose/Reshape/Squeeze/Unsqueeze nodes that feed only this MatMul (they then move a quarter
  of the bytes), and folding a following Mul/Div by a constant float scalar ``c`` into B's scale;
- QDQ form: the MatMul reads ``DequantizeLinear(QuantizeLinear(·))`` of each operand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from edgecomp.graph import MS_DOMAIN, const_array, replace_value, single_use

if TYPE_CHECKING:
    from edgecomp.quantize.quantize_static import LayerPlan

__all__ = ["emit_attention"]


def emit_attention(builder, node: ir.Node, lp: LayerPlan, format: str) -> None:
    """Rewrite one planned activation × activation MatMul (see the module docstring); ``builder``
    is the :class:`edgecomp.quantize.quantize_static.QuantizeStaticPass` node emitter."""
    if format == "qdq":
        aq, a_scale, a_zp = builder.quantized_input(node.inputs[0], lp)
        bq, b_scale, b_zp = _quantize_b(builder, node.inputs[1], lp)
        node.replace_input_with(0, builder.add("DequantizeLinear", [aq, a_scale, a_zp], f"{node.name}_a_dq"))
        node.replace_input_with(1, builder.add("DequantizeLinear", [bq, b_scale, b_zp], f"{node.name}_b_dq"))
        return
    a_src, a_moves = _moves_above(node.inputs[0])
    b_src, b_moves = _moves_above(node.inputs[1])
    aq, a_scale, a_zp = builder.quantized_input(a_src, lp)
    bq, b_scale, b_zp = _quantize_b(builder, b_src, lp)
    aq, bq = _retype(a_moves, aq, ir.DataType.UINT8) or aq, _retype(b_moves, bq, ir.DataType.INT8) or bq
    out, dead, c = node.outputs[0], [node], _scalar_after(node)
    if c is not None:
        factor, scaler = c
        out, dead = scaler.outputs[0], [scaler, node]
        b_scale = builder.const(f"{node.name}_out_scale", np.float32(lp.b_scale * factor))
    y = builder.add("MatMulIntegerToFloat", [aq, bq, a_scale, b_scale, a_zp, b_zp], f"{node.name}_int8",
                    domain=MS_DOMAIN)
    replace_value(builder.graph, out, y)
    for n in dead:
        builder.graph.remove(n, safe=True)


def _quantize_b(builder, b: ir.Value, lp: LayerPlan) -> tuple[ir.Value, ir.Value, ir.Value]:
    scale = builder.const(f"{b.name}_scale", np.float32(lp.b_scale))
    zp = builder.const(f"{b.name}_zero_point", np.int8(0))
    builder.quantize_ops += 1
    return builder.add("QuantizeLinear", [b, scale, zp], f"{b.name}_quantize"), scale, zp


#: ops that only move or relabel elements: quantizing before them is the same as after, and
#: they then move a quarter of the bytes
_MOVES = ("Transpose", "Reshape", "Squeeze", "Unsqueeze")


def _moves_above(x: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
    """(the float tensor above a chain of Transpose/Reshape nodes that feed only this chain,
    the chain top-down); ``(x, [])`` when ``x`` is not such a chain's end."""
    chain: list[ir.Node] = []
    v = x
    while True:
        p = v.producer()
        if p is None or p.op_type not in _MOVES or p.domain not in ("", "ai.onnx") or v.is_graph_output():
            break
        if len(list(v.uses())) != 1:
            break
        chain.insert(0, p)
        v = p.inputs[0]
    return (v, chain) if chain else (x, [])


def _retype(chain: list[ir.Node], q: ir.Value, dtype: ir.DataType) -> ir.Value | None:
    """Feed the quantized ``q`` into the top of ``chain`` (whose outputs become ``dtype``), and
    return the chain's end; None without a chain."""
    if not chain:
        return None
    chain[0].replace_input_with(0, q)
    for n in chain:
        out = n.outputs[0]
        out.type = ir.TensorType(dtype)
    return chain[-1].outputs[0]


def _scalar_after(node: ir.Node) -> tuple[float, ir.Node] | None:
    """(c, the node) when the MatMul's only consumer multiplies (or divides) it by a constant
    float scalar c (1/c for Div), which then folds into the output scale."""
    nxt = single_use(node.outputs[0])
    if nxt is None or nxt.op_type not in ("Mul", "Div") or nxt.domain not in ("", "ai.onnx"):
        return None
    if nxt.op_type == "Div" and nxt.inputs[0] is not node.outputs[0]:
        return None
    other = nxt.inputs[1] if nxt.inputs[0] is node.outputs[0] else nxt.inputs[0]
    v = const_array(other)  # not a scale the caller may feed
    if v is None:
        return None
    if v.size != 1 or not np.issubdtype(v.dtype, np.floating) or not np.isfinite(v).all() or float(v.reshape(())) == 0:
        return None
    shape = node.outputs[0].shape
    if v.ndim and (shape is None or v.ndim > len(shape)):
        return None  # broadcasting could raise the rank
    c = float(v.reshape(()))
    return (1.0 / c if nxt.op_type == "Div" else c), nxt
