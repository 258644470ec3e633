"""Multi-head attention as a pruning unit: match Q/K/V projections → head Reshape → scores →
Softmax → context → merge Reshape → output projection, and add one 'heads' atom per block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from edgecomp.graph import attribute, const_array, single_use
from edgecomp.prune.analysis import Edit, Layout

if TYPE_CHECKING:
    from edgecomp.prune.groups import _Analyzer


def _feeds_only(value: ir.Value, node: ir.Node) -> bool:
    """``value`` is read by ``node`` and otherwise only by Shape → Gather of a dim other than the last."""
    if value in value.graph.outputs:
        return False
    entries = _shape_entries(node) if node.op_type == "Reshape" else None
    rank = len(value.shape) if value.shape is not None else (len(entries) - 1 if entries else None)
    for use in value.uses():
        if use.node is node:
            continue
        if use.node.op_type != "Shape" or attribute(use.node, "start", 0) != 0 or rank is None:
            return False
        for g in use.node.outputs[0].uses():
            idx = const_array(g.node.inputs[1]) if g.node.op_type == "Gather" else None
            if idx is None or idx.size != 1 or int(idx.reshape(-1)[0]) % rank == rank - 1:
                return False
    return True



def _back_through(value: ir.Value, ops: set[str]) -> ir.Value:
    """Walk up through ``ops``, following the computed input that leads on (not a mask or scale)."""
    p = value.producer()
    while p is not None and p.op_type in ops:
        computed = [v for v in p.inputs if v is not None and const_array(v) is None]
        if not computed:
            break
        onward = [v for v in computed if v.producer() is not None and v.producer().op_type in ops | {"MatMul"}]
        value = (onward or computed)[0]
        p = value.producer()
    return value



def _projection(value: ir.Value) -> tuple[ir.Node, ir.Node | None, int] | None:
    """(MatMul, bias Add or None, bias input index) producing ``value`` as x @ W (+ b)."""
    p = value.producer()
    add, bias_idx = None, -1
    if p is not None and p.op_type == "Add":
        consts = [i for i, v in enumerate(p.inputs) if const_array(v) is not None]
        if len(consts) != 1:
            return None
        add, bias_idx = p, consts[0]
        p = p.inputs[1 - bias_idx].producer()
    if p is None or p.op_type != "MatMul" or const_array(p.inputs[1]) is None or const_array(p.inputs[1]).ndim != 2:
        return None
    if single_use(p.outputs[0]) is None:
        return None
    return p, add, bias_idx



def _head_split(value: ir.Value) -> tuple[ir.Node, list[ir.Node]] | None:
    """From a Q/K/V per-head value back to (the Reshape to heads, the nodes on the way)."""
    path = []
    p = value.producer()
    while p is not None and p.op_type == "Transpose":
        path.append(p)
        p = p.inputs[0].producer()
    if p is None or p.op_type != "Reshape" or not _feeds_only(p.inputs[0], p):
        return None
    path.append(p)
    return p, path



def _shape_entries(reshape: ir.Node) -> list[tuple[ir.Node, int, int, np.ndarray | None]] | None:
    """Per output dim of a Reshape: (node, input index, position, constant or None) to rewrite."""
    shape = reshape.inputs[1]
    c = const_array(shape)
    if c is not None:
        return [(reshape, 1, i, c.reshape(-1)[i:i + 1]) for i in range(c.size)]
    p = shape.producer()
    if p is None or p.op_type != "Concat":
        return None
    out = []
    for i, v in enumerate(p.inputs):
        cv = const_array(v)
        if cv is not None and cv.size != 1:
            return None
        out.append((p, i, 0, cv))
    return out



def find_heads(model: ir.Model, an: _Analyzer) -> None:
    """Match multi-head attention blocks and add one 'heads' atom per block."""
    for softmax in [n for n in model.graph if n.op_type == "Softmax"]:
        _match_attention(softmax, an)



def _match_attention(softmax: ir.Node, an: _Analyzer) -> None:
    scores = _back_through(softmax.inputs[0], {"Add", "Mul", "Div", "Sub", "Where", "Cast"})
    qk = scores.producer()
    ctx_mm = single_use(softmax.outputs[0])
    if qk is None or qk.op_type != "MatMul" or ctx_mm is None or ctx_mm.op_type != "MatMul":
        return
    branches = {}
    for key, v in (("q", qk.inputs[0]), ("k", qk.inputs[1]), ("v", ctx_mm.inputs[1])):
        v = _back_through(v, {"Mul", "Div"})
        split = _head_split(v)
        if split is None:
            return
        reshape, path = split
        proj = _projection(reshape.inputs[0])
        entries = _shape_entries(reshape)
        if proj is None or entries is None or len(entries) != 4:
            return
        branches[key] = (reshape, proj, entries, path)
    # context: MatMul → Transpose → Reshape → MatMul(W_o)
    t = single_use(ctx_mm.outputs[0])
    merge = single_use(t.outputs[0]) if t is not None and t.op_type == "Transpose" else None
    out_mm = single_use(merge.outputs[0]) if merge is not None and merge.op_type == "Reshape" else None
    if out_mm is None or out_mm.op_type != "MatMul" or const_array(out_mm.inputs[1]) is None:
        return
    merge_entries = _shape_entries(merge)
    if merge_entries is None or len(merge_entries) != 3:
        return
    wq = const_array(branches["q"][1][0].inputs[1])
    hd = wq.shape[1]
    e_heads = branches["q"][2][2][3]
    e_dim = branches["q"][2][3][3]
    if e_dim is not None and int(e_dim.reshape(-1)[0]) > 0:
        d = int(e_dim.reshape(-1)[0])
    elif e_heads is not None and int(e_heads.reshape(-1)[0]) > 0:
        d = hd // int(e_heads.reshape(-1)[0])
    else:
        return
    if hd % d or any(const_array(b[1][0].inputs[1]).shape[1] != hd for b in branches.values()) \
            or const_array(out_mm.inputs[1]).shape[0] != hd:
        return
    heads = hd // d
    name = out_mm.name
    atom = an.new_atom(heads, "heads", name)
    cols = Layout(-1, ((atom, d),), None)
    count = Layout(-1, ((atom, 1),), None)
    edits = an.a.edits
    nodes = [qk, softmax, ctx_mm, t, merge, out_mm]
    for reshape, (mm, add, bias_idx), entries, path in branches.values():
        edits.append(Edit("param", mm, 1, cols, axis=1, role="out"))
        if add is not None:
            edits.append(Edit("param", add, bias_idx, cols, axis=0))
        node, idx, pos, c = entries[2]
        if c is None or int(c.reshape(-1)[0]) != -1:
            edits.append(Edit("dim", node, idx, count, position=pos))
        for n in [mm, add] + path:
            if n is not None:
                nodes.append(n)
                if an.is_protected(n):
                    an.block(cols, f"protected ({n.name})")
    edits.append(Edit("param", out_mm, 1, cols, axis=0, role="in"))
    if an.is_protected(out_mm):
        an.block(cols, f"protected ({out_mm.name})")
    node, idx, pos, c = merge_entries[2]
    if c is None or int(c.reshape(-1)[0]) != -1:
        edits.append(Edit("dim", node, idx, cols, position=pos))
    # every value between the projections and the output projection changes shape
    for n in nodes:
        for o in n.outputs:
            if n is not out_mm:
                an.a.head_values.add(o.name)
    for v in _between(qk.outputs[0], softmax):
        an.a.head_values.add(v)



def _between(start: ir.Value, end: ir.Node) -> list[str]:
    """Names of values on the single-use chain from ``start`` to ``end``."""
    names, v = [start.name], start
    node = single_use(v)
    while node is not None and node is not end:
        v = node.outputs[0]
        names.append(v.name)
        node = single_use(v)
    return names
