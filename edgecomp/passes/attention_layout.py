"""SimplifyAttentionLayoutPass: fewer and cheaper Transpose/Reshape nodes around attention's products.

An exported attention splits heads with ``Reshape[B,S,H,d] → Transpose(0,2,1,3)`` on Q, K and V
(K with ``Transpose(0,2,3,1)``, or a head Transpose followed by a ``Transpose(0,1,3,2)``) and
merges them after ``P·V`` with ``Transpose(0,2,1,3) → Reshape[B,S,H·d]``. The float MatMuls absorb
their operands' Transposes at session creation (onnxruntime's ``FusedMatMul`` with transA/transB
and transBatch); onnxruntime's int8 ``MatMulIntegerToFloat`` has no such attributes, so in an int8
graph the Transposes run as copies. Every rewrite below is exact (only element order and, in the
last, the dtype the moves carry change; the float results are bit-identical):

- ``merge_transposes``: ``Transpose(p2)(Transpose(p1)(x)) = Transpose(q)(x)`` with
  ``q[i] = p1[p2[i]]``; when ``q`` is the identity both go.
- ``merge_reshapes``: ``Reshape(Reshape(x, s1), s2) = Reshape(x, s2)`` when ``s2`` is a constant
  without a 0 entry (a 0 would copy a dim of the intermediate shape; -1 is resolved from the
  element count, which both have) or ``allowzero`` is set, and the first Reshape's output has no
  other reader.
- ``fold_constant_transposes``: a Transpose of a constant (a MatMul weight stored transposed)
  becomes the transposed constant.
- ``quantize_before_moves``: a per-tensor ``QuantizeLinear`` (scalar scale and zero point) reading
  the end of a chain of Transpose/Reshape/Squeeze/Unsqueeze nodes, each read only by the next,
  moves above the chain, which then moves uint8 (a quarter of the bytes): quantization is
  element-wise, so ``Q(move(x)) = move(Q(x))``. This is the context merge after a float ``P·V``
  that feeds an int8 output projection. A per-channel Mul between (SmoothQuant's division that
  could not be folded) stops it; the record says so.

What the pass cannot remove: the head-split Transposes feeding ``MatMulIntegerToFloat`` (it needs
its operands in ``[B,H,S,d]``/``[B,H,d,S]`` order) and the merge after an int8 ``P·V``.

Not applied by default (``edgecomp optimize --layout`` applies it): onnxruntime makes every one of these rewrites itself at session creation,
from its basic level on (its TransposeOptimizer merges and cancels Transposes and pushes them
through a per-tensor QuantizeLinear; constant folding folds a transposed weight): on the int8
all-MiniLM-L6-v2 both graphs become the same optimized graph and time the same (BENCHMARKS.md,
"Attention layout and rounding"). The pass is for a consumer that reads the file as written (a
runtime without such an optimizer, or a tool that inspects the graph).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from edgecomp.graph import NameAllocator, add_initializer, attribute, const_array, single_use, sort_graph
from edgecomp.passes.base import EdgecompPass, PassReport, one_line_failures

__all__ = ["SimplifyAttentionLayoutPass"]

_MOVES = ("Transpose", "Reshape", "Squeeze", "Unsqueeze")


def _onnx(node: ir.Node | None, op: str) -> bool:
    return node is not None and node.op_type == op and node.domain in ("", "ai.onnx")


class SimplifyAttentionLayoutPass(EdgecompPass):
    """Merge, fold or cheapen Transposes and Reshapes (see the module docstring); each rewrite has
    its own switch."""

    def __init__(self, *, merge_transposes: bool = True, merge_reshapes: bool = True,
                 fold_constant_transposes: bool = True, quantize_before_moves: bool = True):
        super().__init__()
        self.merge_transposes = merge_transposes
        self.merge_reshapes = merge_reshapes
        self.fold_constant_transposes = fold_constant_transposes
        self.quantize_before_moves = quantize_before_moves

    @one_line_failures
    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        names = NameAllocator(graph)
        rows: list[dict[str, Any]] = []
        for node in list(graph):
            if node.graph is None:  # removed by an earlier rewrite
                continue
            row = None
            if self.fold_constant_transposes and _onnx(node, "Transpose"):
                row = _fold_constant_transpose(graph, names, node)
            if row is None and self.merge_transposes and _onnx(node, "Transpose"):
                row = _merge_transposes(graph, node)
            if row is None and self.merge_reshapes and _onnx(node, "Reshape"):
                row = _merge_reshapes(graph, node)
            if row is None and self.quantize_before_moves and _onnx(node, "QuantizeLinear"):
                row = _quantize_before_moves(graph, node)
            if row is not None:
                rows.append(row)
        done = [r for r in rows if r["rewritten"]]
        if done:
            sort_graph(graph, "SimplifyAttentionLayoutPass")
        summary: dict[str, Any] = {}
        for r in done:
            summary[r["rule"]] = summary.get(r["rule"], 0) + 1
        summary["left"] = len(rows) - len(done)
        return self.report(model, bool(done), summary, rows)


def _perm(node: ir.Node) -> list[int] | None:
    p = attribute(node, "perm")
    if p is not None:
        return [int(i) for i in p]
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    return list(range(rank))[::-1] if rank is not None else None  # no perm: the axes reversed


def _bypass(graph: ir.Graph, node: ir.Node, source: ir.Value) -> None:
    """Every reader of ``node``'s output reads ``source`` instead, and ``node`` goes (the caller
    checked its output is no graph output)."""
    node.outputs[0].replace_all_uses_with(source)
    graph.remove(node, safe=True)


def _remove_if_unused(graph: ir.Graph, node: ir.Node) -> None:
    if not list(node.outputs[0].uses()) and not node.outputs[0].is_graph_output():
        graph.remove(node, safe=True)


def _fold_constant_transpose(graph: ir.Graph, names: NameAllocator, node: ir.Node) -> dict[str, Any] | None:
    a, perm = const_array(node.inputs[0]), _perm(node)
    if a is None or perm is None or node.outputs[0].is_graph_output():
        return None
    folded = add_initializer(graph, names.unique(f"{node.inputs[0].name or node.name}_transposed"),
                             np.ascontiguousarray(np.transpose(a, perm)))
    _bypass(graph, node, folded)
    return {"rule": "constant transposes folded", "node": node.name, "rewritten": True, "detail": f"perm {perm}"}


def _merge_transposes(graph: ir.Graph, node: ir.Node) -> dict[str, Any] | None:
    first = node.inputs[0].producer()
    if not _onnx(first, "Transpose"):
        return None
    p1, p2 = _perm(first), _perm(node)
    if p1 is None or p2 is None or len(p1) != len(p2):
        return {"rule": "transposes merged", "node": node.name, "rewritten": False, "detail": "unknown permutation"}
    q = [p1[i] for i in p2]
    if q == list(range(len(q))):
        if node.outputs[0].is_graph_output():
            return {"rule": "transposes merged", "node": node.name, "rewritten": False,
                    "detail": "identity, but its output is a graph output"}
        _bypass(graph, node, first.inputs[0])
        _remove_if_unused(graph, first)
        return {"rule": "transpose round trips removed", "node": node.name, "rewritten": True,
                "detail": f"{p1} then {p2}"}
    node.replace_input_with(0, first.inputs[0])
    node.attributes["perm"] = ir.AttrInt64s("perm", q)
    _remove_if_unused(graph, first)
    return {"rule": "transposes merged", "node": node.name, "rewritten": True, "detail": f"{p1} then {p2} = {q}"}


def _merge_reshapes(graph: ir.Graph, node: ir.Node) -> dict[str, Any] | None:
    first = node.inputs[0].producer()
    if not _onnx(first, "Reshape"):
        return None
    target = const_array(node.inputs[1])
    why = None
    if single_use(first.outputs[0]) is None:
        why = "the first Reshape's output has other readers"
    elif target is None:
        why = "the second Reshape's target is computed"
    elif (target == 0).any() and not attribute(node, "allowzero", 0):
        why = "the second Reshape's target copies a dim (0)"
    if why:
        return {"rule": "reshapes merged", "node": node.name, "rewritten": False, "detail": why}
    node.replace_input_with(0, first.inputs[0])
    graph.remove(first, safe=True)
    return {"rule": "reshapes merged", "node": node.name, "rewritten": True, "detail": f"target {target.tolist()}"}


def _quantize_before_moves(graph: ir.Graph, q: ir.Node) -> dict[str, Any] | None:
    chain: list[ir.Node] = []
    v = q.inputs[0]
    while True:
        p = v.producer()
        if p is None or p.op_type not in _MOVES or p.domain not in ("", "ai.onnx") or single_use(v) is None:
            break
        chain.insert(0, p)
        v = p.inputs[0]
    if not chain:
        p = v.producer()
        above = p.inputs[0].producer() if _onnx(p, "Mul") else None
        if above is not None and above.op_type in _MOVES:
            return {"rule": "quantized before moves", "node": q.name, "rewritten": False,
                    "detail": "a Mul (a per-channel scaling) sits between the moves and the quantizer"}
        return None
    scale, zp = const_array(q.inputs[1]), const_array(q.inputs[2]) if len(q.inputs) > 2 else None
    out = q.outputs[0]
    if scale is None or scale.size != 1 or (len(q.inputs) > 2 and q.inputs[2] is not None and (zp is None or zp.size != 1)):
        return {"rule": "quantized before moves", "node": q.name, "rewritten": False,
                "detail": "not a per-tensor QuantizeLinear with constant scale and zero point"}
    if out.is_graph_output():
        return {"rule": "quantized before moves", "node": q.name, "rewritten": False,
                "detail": "its output is a graph output"}
    end = chain[-1].outputs[0]
    out.replace_all_uses_with(end)
    q.replace_input_with(0, v)
    chain[0].replace_input_with(0, out)
    # the quantized dtype is the zero point's (uint8 without one)
    qtype = ir.TensorType(ir.DataType.from_numpy(zp.dtype) if zp is not None else ir.DataType.UINT8)
    out.type, out.shape = qtype, v.shape
    for n in chain:
        n.outputs[0].type = qtype
    return {"rule": "quantized before moves", "node": q.name, "rewritten": True,
            "detail": " -> ".join(n.op_type for n in chain) + f" now move {qtype.dtype.name.lower()}"}
