"""Dependency analysis: which output channels of which layers must be removed together.

See :mod:`edgecomp.prune` for the propagation rules; attention heads are matched in
:mod:`edgecomp.prune.attention`.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.errors import OptionError
from edgecomp.graph import attribute, const_array, rank_of, single_use, static_dims, subgraphs
from edgecomp.prune.analysis import Analysis, Edit, Layout, NotChannelwise
from edgecomp.prune.attention import find_heads, shape_entries

__all__ = ["lift_constants", "find_groups"]


_UNARY = {"Relu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Celu", "Erf", "Gelu",
          "Softplus", "Softsign", "Identity", "Neg", "Abs", "Sqrt", "Exp", "Log", "Mish", "Reciprocal", "Dropout",
          "ThresholdedRelu", "Clip", "Cast"}



_BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Mean"}



_POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}



_REDUCES = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare"}



PRUNABLE_OPS = ("Conv", "MatMul", "Gemm")



def lift_constants(model: ir.Model) -> int:
    """Make every main-graph weight a plain initializer: ``Constant`` nodes holding a tensor
    (PaddlePaddle and some TorchScript exports) become initializers, and ``Identity`` nodes that
    read a constant (TorchScript's shared, de-duplicated weights) are bypassed. Subgraphs are left
    alone. The parameter count (:func:`edgecomp.graph.count_parameters`) and the outputs are
    unchanged; returns the number of nodes removed."""
    graph = model.graph
    outputs = set(graph.outputs)
    removed = 0
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1 or node.outputs[0] in outputs:
            continue
        out = node.outputs[0]
        if node.op_type == "Constant" and set(node.attributes) == {"value"}:
            t = node.attributes["value"].as_tensor()
            init = ir.Value(name=out.name, shape=t.shape, type=ir.TensorType(t.dtype), const_value=t)
            graph.register_initializer(init)
            out.replace_all_uses_with(init)
        elif node.op_type == "Identity" and node.inputs and node.inputs[0] is not None:
            src = node.inputs[0]
            if src.const_value is None or src.is_graph_input():
                continue
            out.replace_all_uses_with(src)
        else:
            continue
        graph.remove(node, safe=True)
        removed += 1
    return removed



def _inferred_dims(model: ir.Model) -> dict[str, list[int | None]]:
    """Dims of every value by onnx shape inference (exports without value_info leave most
    intermediate shapes unset); empty when inference fails."""
    import onnx

    try:
        proto = onnx.shape_inference.infer_shapes(ir.to_proto(model))
    except Exception:  # contrib ops, an invalid model: analysis goes on with the shapes it has
        return {}
    out = {}
    for vi in [*proto.graph.value_info, *proto.graph.output, *proto.graph.input]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return out



class ChannelAnalyzer:
    """The state of one dependency analysis (:func:`find_groups`): the layout of every value
    reached, the atoms and edits found so far; :mod:`edgecomp.prune.attention` extends it with heads."""

    def __init__(self, model: ir.Model, protect: Sequence[str]):
        self.model = model
        self.protect = [re.compile(p) for p in protect]
        self.a = Analysis({}, {}, {}, {}, {}, [], {}, set())
        self.layout: dict[ir.Value, Layout] = {}
        self.protected_hits: set[str] = set()
        self._inferred: dict[str, list[int | None]] | None = None

    def dims(self, value: ir.Value) -> list[int | None] | None:
        """The value's dims, from its own shape or, where that is missing or symbolic, inference."""
        own = static_dims(value)
        if own is not None and all(d is not None for d in own):
            return own
        if self._inferred is None:
            self._inferred = _inferred_dims(self.model)
        inferred = self._inferred.get(value.name)
        if inferred is None or (own is not None and len(own) != len(inferred)):
            return own
        if own is None:
            return inferred
        return [a if a is not None else b for a, b in zip(own, inferred)]

    # atoms
    def new_atom(self, size: int, kind: str, name: str) -> int:
        i = len(self.a.sizes)
        self.a.sizes[i], self.a.kinds[i], self.a.names[i], self.a.parent[i] = size, kind, name, i
        return i

    def block(self, layout: Layout | None, reason: str) -> None:
        if layout is None:
            return
        for atom in layout.atoms():
            reasons = self.a.blocked.setdefault(atom, [])
            if reason not in reasons:
                reasons.append(reason)

    def union(self, x: Layout, y: Layout) -> bool:
        if x.axis != y.axis or [r for _, r in x.parts] != [r for _, r in y.parts] or \
                [self.a.sizes[a] for a in x.atoms()] != [self.a.sizes[a] for a in y.atoms()]:
            return False
        for (p, _), (q, _) in zip(x.parts, y.parts):
            rp, rq = self.a.root(p), self.a.root(q)
            if rp != rq:
                self.a.parent[rq] = rp
        return True

    def is_protected(self, node: ir.Node) -> bool:
        hit = False
        for p in self.protect:
            if p.search(node.name or ""):
                self.protected_hits.add(p.pattern)
                hit = True
        return hit

    def set_layout(self, value: ir.Value, layout: Layout) -> None:
        self.layout[value] = layout
        self.a.values[value.name] = layout

    # the walk
    def run(self) -> Analysis:
        for node in list(self.model.graph):
            ins = [self.layout.get(v) if v is not None else None for v in node.inputs]
            if subgraphs(node):
                self.subgraph(node)
            try:
                self.visit(node, ins)
            except NotChannelwise as stop:
                for lay in ins:
                    self.block(lay, f"{stop} ({node.name})")
        for out in self.model.graph.outputs:
            self.block(self.layout.get(out), f"graph output {out.name}")
        return self.a

    def subgraph(self, node: ir.Node) -> None:
        """A node with subgraphs (If, Loop, Scan): channels it reads from this graph (as inputs or
        captured inside) stay whole, and its layers get a group each that says why it is kept."""
        where = f"{node.op_type} subgraph ({node.name})"
        for g in subgraphs(node):
            for v in g.outputs:
                self.block(self.layout.get(v), f"read inside {where}")
            for inner in ir.traversal.RecursiveGraphIterator(g):
                for v in inner.inputs:
                    if v is not None:
                        self.block(self.layout.get(v), f"read inside {where}")
                if inner.op_type not in PRUNABLE_OPS or inner.domain not in ("", "ai.onnx") or len(inner.inputs) < 2:
                    continue
                w = const_array(inner.inputs[1])
                if w is None or w.ndim < 2:
                    continue
                trans_b = inner.op_type == "Gemm" and int(attribute(inner, "transB", 0))
                size = w.shape[0] if inner.op_type == "Conv" or trans_b else w.shape[-1]
                atom = self.new_atom(int(size), "channels", inner.name or inner.op_type)
                self.a.blocked[atom] = [f"inside {where}: layers in subgraphs are not pruned"]

    def visit(self, node: ir.Node, ins: list[Layout | None]) -> None:
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        carried = [lay for lay in ins if lay is not None]
        if op in ("Conv", "MatMul", "Gemm"):
            return self.layer(node, op, ins)
        if not carried:
            return None
        if op == "BatchNormalization" or op == "InstanceNormalization":
            lay = ins[0]
            if lay is None or any(x is not None for x in ins[1:]) or not self._is_axis(lay, 1):
                raise NotChannelwise(op)
            if any(v is not None and const_array(v) is None for v in node.inputs[1:]):
                raise NotChannelwise(f"{op} with a parameter that is not a constant")  # e.g. one the caller may feed
            for i in range(1, len(node.inputs)):
                self.a.edits.append(Edit("param", node, i, lay, axis=0))
            return self.set_layout(node.outputs[0], lay)
        if op in _UNARY or op in _BINARY:
            return self.elementwise(node, op, ins)
        if op in _POOLS:
            lay = ins[0]
            if not self._is_axis(lay, 1):
                raise NotChannelwise(op)
            return self.set_layout(node.outputs[0], lay)
        if op in _REDUCES:
            return self.reduce(node, ins[0])
        if op == "Transpose":
            lay = ins[0]
            if lay.rank is None:
                raise NotChannelwise("Transpose of unknown rank")
            perm = list(attribute(node, "perm", list(range(lay.rank))[::-1]))
            pos = perm.index(lay.rank + lay.axis)
            return self.set_layout(node.outputs[0], Layout(pos - lay.rank, lay.parts, lay.rank))
        if op == "Concat":
            return self.concat(node, ins)
        if op in ("Flatten", "Reshape"):
            return self.flatten(node, op, ins)
        if op in ("Squeeze", "Unsqueeze"):
            return self.squeeze(node, op, ins)
        if op in ("Pad", "Slice"):
            return self.off_channel(node, op, ins)
        if op == "Shape" and self._harmless_shape(node, ins[0]):
            return None
        raise NotChannelwise(op)

    def _harmless_shape(self, node: ir.Node, lay: Layout | None) -> bool:
        """A Shape whose reads never see the channel count: Gathers of other dims, or (channels on
        the last axis) a Slice of the last dim feeding the shape of a Reshape of the same value that
        keeps it last (GPT-2's ``x.view(-1, x.size(-1))``), which then follows by itself."""
        if lay is None or lay.rank is None or attribute(node, "start", None) is not None \
                or attribute(node, "end", None) is not None:
            return False
        pos = lay.rank + lay.axis
        for use in node.outputs[0].uses():
            g = use.node
            idx = const_array(g.inputs[1]) if len(g.inputs) > 1 else None
            if g.op_type == "Gather" and idx is not None and idx.size == 1 and int(idx.reshape(-1)[0]) % lay.rank != pos:
                continue
            if g.op_type == "Slice" and lay.axis == -1 and idx is not None and int(idx.reshape(-1)[0]) == -1:
                v = g.outputs[0]
                while (u := single_use(v)) is not None and u.op_type in ("Squeeze", "Unsqueeze", "Cast"):
                    v = u.outputs[0]
                concat = single_use(v)
                if concat is not None and concat.op_type == "Concat" and concat.inputs[-1] is v:
                    readers = [r.node for r in concat.outputs[0].uses()]
                    if readers and all(r.op_type == "Reshape" and r.inputs[0] is node.inputs[0]
                                       and r.inputs[1] is concat.outputs[0] for r in readers):
                        continue
            return False
        return True

    def _axes(self, node: ir.Node, index: int) -> list[int] | None:
        """An op's ``axes``: the attribute (older opsets) or the constant input at ``index``."""
        axes = attribute(node, "axes", None)
        if axes is None and len(node.inputs) > index and node.inputs[index] is not None:
            c = const_array(node.inputs[index])
            if c is None:
                raise NotChannelwise(f"{node.op_type} with computed axes")
            axes = c.reshape(-1).tolist()
        return None if axes is None else [int(a) for a in axes]

    def squeeze(self, node: ir.Node, op: str, ins: list[Layout | None]) -> None:
        lay = ins[0]
        if lay is None or any(x is not None for x in ins[1:]) or lay.rank is None:
            raise NotChannelwise(f"{op} of unknown rank" if lay is not None and lay.rank is None else op)
        axes = self._axes(node, 1)
        pos = lay.rank + lay.axis
        if op == "Squeeze":
            if axes is None:
                dims = self.dims(node.inputs[0])
                if dims is None or any(d is None for d in dims):
                    raise NotChannelwise("Squeeze of unknown input shape")
                axes = [i for i, d in enumerate(dims) if d == 1]
            gone = {a % lay.rank for a in axes}
            if pos in gone:
                raise NotChannelwise("Squeeze of the channel axis")
            rank, pos = lay.rank - len(gone), pos - sum(a < pos for a in gone)
        else:
            if not axes:
                raise NotChannelwise("Unsqueeze without axes")
            rank = lay.rank + len(axes)
            new = {a % rank for a in axes}
            pos = [i for i in range(rank) if i not in new][pos]
        self.set_layout(node.outputs[0], Layout(pos - rank, lay.parts, rank))

    def off_channel(self, node: ir.Node, op: str, ins: list[Layout | None]) -> None:
        """Pad and Slice keep channel positions when they leave the channel axis alone."""
        lay = ins[0]
        if lay is None or any(x is not None for x in ins[1:]) or lay.rank is None:
            raise NotChannelwise(op)
        pos = lay.rank + lay.axis
        if op == "Pad":
            pads = attribute(node, "pads", None)
            if pads is None:
                c = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
                if c is None:
                    raise NotChannelwise("Pad with computed pads")
                pads = c.reshape(-1).tolist()
            if len(node.inputs) > 3 and node.inputs[3] is not None:
                raise NotChannelwise("Pad with axes")
            c = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
            if len(pads) != 2 * lay.rank or pads[pos] or pads[pos + lay.rank] or (c is not None and c.size > 1):
                raise NotChannelwise("Pad of the channel axis")
        else:
            starts = attribute(node, "starts", None)  # opset < 10 keeps them as attributes
            if starts is None and len(node.inputs) > 1 and const_array(node.inputs[1]) is not None:
                starts = const_array(node.inputs[1]).reshape(-1).tolist()
            if starts is None:
                raise NotChannelwise("Slice with computed starts")
            axes = self._axes(node, 3)
            axes = list(range(len(starts))) if axes is None else axes
            if pos in {a % lay.rank for a in axes}:
                raise NotChannelwise("Slice of the channel axis")
        self.set_layout(node.outputs[0], lay)

    @staticmethod
    def _is_axis(lay: Layout | None, pos: int) -> bool:
        return lay is not None and lay.rank is not None and lay.rank + lay.axis == pos

    def layer(self, node: ir.Node, op: str, ins: list[Layout | None]) -> None:
        x = ins[0]
        w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if any(lay is not None for lay in ins[1:]):
            raise NotChannelwise(f"{op} with a computed weight")
        protected = self.is_protected(node)
        if protected:
            self.block(x, f"protected ({node.name})")
        if op == "Conv":
            group = int(attribute(node, "group", 1))
            if w is None:
                raise NotChannelwise("Conv with a computed weight")
            depthwise = group > 1 and w.shape[1] == 1 and w.shape[0] == group
            if depthwise:
                if x is None or x.width(self.a.sizes) != group:
                    return None  # a depthwise conv on an input we do not track: nothing moves
                if protected:
                    return None
                if not self._is_axis(x, 1):
                    raise NotChannelwise("depthwise Conv off the channel axis")
                self.a.edits.append(Edit("param", node, 1, x, axis=0, role="dw"))
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    self.a.edits.append(Edit("param", node, 2, x, axis=0))
                self.a.edits.append(Edit("group", node, 0, x))
                return self.set_layout(node.outputs[0], x)
            if group != 1:
                raise NotChannelwise(f"grouped Conv (group={group})")
            if x is not None:
                if not self._is_axis(x, 1):
                    raise NotChannelwise("Conv input channels off axis 1")
                self.a.edits.append(Edit("param", node, 1, x, axis=1, role="in"))
            self.source(node, w.shape[0], Layout(1 - w.ndim, (), w.ndim), [(1, 0), (2, 0)], protected)
            return None
        if w is None or w.ndim != 2:
            if x is not None:
                raise NotChannelwise(f"{op} with a computed weight")
            return None
        trans_b = op == "Gemm" and int(attribute(node, "transB", 0))
        if op == "Gemm" and int(attribute(node, "transA", 0)):
            raise NotChannelwise("Gemm with transA")
        if x is not None:
            if x.axis != -1:
                raise NotChannelwise(f"{op} input channels off the last axis")
            self.a.edits.append(Edit("param", node, 1, x, axis=1 if trans_b else 0, role="in"))
        n_out = w.shape[0] if trans_b else w.shape[1]
        params = [(1, 0 if trans_b else 1)]
        if op == "Gemm" and len(node.inputs) > 2:
            c = const_array(node.inputs[2])
            if c is None:
                return None  # a computed bias: leave the output whole
            if c.ndim >= 1 and c.shape[-1] == n_out:
                params.append((2, c.ndim - 1))
        rank = rank_of(node.inputs[0]) if op == "MatMul" else 2
        self.source(node, n_out, Layout(-1, (), rank), params, protected)

    def source(self, node: ir.Node, size: int, base: Layout, params: list[tuple[int, int]], protected: bool) -> None:
        atom = self.new_atom(size, "channels", node.name)
        lay = Layout(base.axis, ((atom, 1),), base.rank)
        for idx, axis in params:
            if idx < len(node.inputs) and node.inputs[idx] is not None:
                if const_array(node.inputs[idx]) is None:
                    self.block(lay, f"{node.op_type} with a computed bias ({node.name})")
                    continue
                self.a.edits.append(Edit("param", node, idx, lay, axis=axis, role="out" if idx == 1 else "param"))
        if protected:
            self.block(lay, f"protected ({node.name})")
        self.set_layout(node.outputs[0], lay)

    def elementwise(self, node: ir.Node, op: str, ins: list[Layout | None]) -> None:
        carried = [lay for lay in ins if lay is not None]
        first = carried[0]
        for lay in carried[1:]:
            if not self.union(first, lay):
                raise NotChannelwise(f"{op} of differently laid out channels")
        ranks = []
        for i, v in enumerate(node.inputs):
            if v is None or ins[i] is not None:
                ranks.append(ins[i].rank if ins[i] is not None else 0)
                continue
            c = const_array(v)
            dims = list(c.shape) if c is not None else self.dims(v)
            if dims is None or (len(dims) >= -first.axis and dims[first.axis] is None):
                raise NotChannelwise(f"{op} with an operand of unknown shape")
            ranks.append(len(dims))
            if len(dims) < -first.axis or dims[first.axis] == 1:
                continue  # broadcasts along the channel axis
            if c is None:
                raise NotChannelwise(f"{op} with a computed per-channel operand")
            if dims[first.axis] != first.width(self.a.sizes):
                raise NotChannelwise(f"{op} operand does not match the channels")
            self.a.edits.append(Edit("param", node, i, first, axis=len(dims) + first.axis))
        rank = None if any(r is None for r in ranks) else max(ranks)
        out = Layout(first.axis, first.parts, rank if rank else first.rank)
        self.set_layout(node.outputs[0], out)

    def reduce(self, node: ir.Node, lay: Layout | None) -> None:
        if lay is None or lay.rank is None:
            raise NotChannelwise(f"{node.op_type} of unknown rank")
        axes = attribute(node, "axes", None)
        if axes is None and len(node.inputs) > 1:
            c = const_array(node.inputs[1])
            if c is None:
                raise NotChannelwise(f"{node.op_type} with computed axes")
            axes = c.tolist()
        if not axes:
            raise NotChannelwise(f"{node.op_type} over every axis")
        axes = [a % lay.rank for a in axes]
        pos = lay.rank + lay.axis
        if pos in axes:
            raise NotChannelwise(f"{node.op_type} over the channel axis")
        if int(attribute(node, "keepdims", 1)):
            return self.set_layout(node.outputs[0], lay)
        rank = lay.rank - len(axes)
        pos -= sum(a < pos for a in axes)
        self.set_layout(node.outputs[0], Layout(pos - rank, lay.parts, rank))

    def concat(self, node: ir.Node, ins: list[Layout | None]) -> None:
        carried = [lay for lay in ins if lay is not None]
        first = carried[0]
        if first.rank is None:
            raise NotChannelwise("Concat of unknown rank")
        axis = int(attribute(node, "axis", 0)) % first.rank
        if axis != first.rank + first.axis:
            if len(carried) != len(ins):
                raise NotChannelwise("Concat off the channel axis of untracked values")
            for lay in carried[1:]:
                if not self.union(first, lay):
                    raise NotChannelwise("Concat of differently laid out channels")
            return self.set_layout(node.outputs[0], first)
        parts: list[tuple[int, int]] = []
        for v, lay in zip(node.inputs, ins):
            if lay is not None:
                if lay.axis != first.axis:
                    raise NotChannelwise("Concat of channels on different axes")
                parts += lay.parts
                continue
            dims = self.dims(v) if const_array(v) is None else list(const_array(v).shape)
            if dims is None or len(dims) <= axis or dims[axis] is None:
                raise NotChannelwise("Concat with an untracked input of unknown size")
            fixed = self.new_atom(dims[axis], "channels", v.name)
            self.a.blocked[fixed] = [f"not produced by a prunable layer ({v.name})"]
            parts.append((fixed, 1))
        self.set_layout(node.outputs[0], Layout(first.axis, tuple(parts), first.rank))

    def _keeps_last(self, node: ir.Node, lay: Layout) -> tuple[int, Edit | None] | None:
        """A Reshape that only regroups the leading dims of channels on the last axis
        (``[N, C] → [B, S, C]`` and back around GPT-2's Gemms): its last entry is the channel
        width as a constant (rewritten) or the input's own last dim read through Shape (it follows
        by itself). Its output rank and the edit, or None."""
        if lay.axis != -1 or int(attribute(node, "allowzero", 0)):
            return None
        entries = shape_entries(node)
        if not entries:
            return None
        at, idx, pos, last = entries[-1]
        if last is not None:
            if int(last.reshape(-1)[0]) != lay.width(self.a.sizes):
                return None
            return len(entries), Edit("dim", at, idx, lay, position=pos)
        p = at.inputs[idx].producer()
        while p is not None and p.op_type in ("Unsqueeze", "Squeeze", "Cast"):
            p = p.inputs[0].producer()
        if p is None or p.op_type not in ("Slice", "Gather"):
            return None
        start = const_array(p.inputs[1])
        shape = p.inputs[0].producer()
        own = start is not None and start.size == 1 and int(start.reshape(-1)[0]) == -1 and shape is not None \
            and shape.op_type == "Shape" and shape.inputs[0] is node.inputs[0] \
            and attribute(shape, "start", None) is None and attribute(shape, "end", None) is None \
            and (p.op_type == "Gather" or len(p.inputs) < 4 or const_array(p.inputs[3]) is not None)
        return (len(entries), None) if own else None

    def flatten(self, node: ir.Node, op: str, ins: list[Layout | None]) -> None:
        lay = ins[0]
        if lay is None or any(x is not None for x in ins[1:]):
            raise NotChannelwise(op)
        kept_last = self._keeps_last(node, lay) if op == "Reshape" else None
        if kept_last is not None:
            rank, edit = kept_last
            if edit is not None:
                self.a.edits.append(edit)
            return self.set_layout(node.outputs[0], Layout(-1, lay.parts, rank))
        dims = self.dims(node.inputs[0])
        pos = len(dims) + lay.axis if dims is not None else -1
        if dims is None or pos < 0 or any(d is None for d in dims[pos + 1:]):
            raise NotChannelwise(f"{op} of unknown input shape")
        inner = int(np.prod(dims[pos + 1:])) if pos + 1 < len(dims) else 1
        if op == "Flatten":
            if int(attribute(node, "axis", 1)) % len(dims) != pos:
                raise NotChannelwise("Flatten that splits the channel axis")
        else:
            shape = const_array(node.inputs[1])
            if shape is None or shape.ndim != 1 or len(shape) != pos + 1:
                raise NotChannelwise("Reshape that does not flatten the channels into the last axis")
            if int(attribute(node, "allowzero", 0)) and 0 in shape.tolist()[pos:]:
                raise NotChannelwise("Reshape with allowzero")
            lead = shape.tolist()[:pos]
            # each leading dim copied (0) or equal to the input's; one -1 there is the batch when the
            # flattened width itself is explicit
            free = lead.count(-1) == 1 and shape[pos] != -1
            if any(not (s == 0 or (d is not None and s == d) or (s == -1 and free)) for s, d in zip(lead, dims[:pos])) \
                    or (shape[pos] != -1 and int(shape[pos]) != lay.width(self.a.sizes) * inner):
                raise NotChannelwise("Reshape that moves the channels")
            if shape[pos] != -1:
                self.a.edits.append(Edit("dim", node, 1, lay, position=pos, factor=inner))
        parts = tuple((a, r * inner) for a, r in lay.parts)
        self.set_layout(node.outputs[0], Layout(-1, parts, pos + 1))



def _tie_shared_weights(an: ChannelAnalyzer) -> None:
    """One weight read by several layers (ALBERT calls one layer per depth, TorchScript shares
    equal initializers) is cut the same way for all of them: their atoms along that axis join one
    group. Otherwise each would get its own slice and the model would grow."""
    by_weight: dict[tuple[int, int, tuple], list[Edit]] = {}
    for e in an.a.edits:
        if e.kind == "param" and e.role in ("out", "in", "dw"):
            value = e.node.inputs[e.index]
            key = (id(value), e.axis, tuple(r for _, r in e.layout.parts))
            by_weight.setdefault(key, []).append(e)
    for edits in by_weight.values():
        if len({id(e.node) for e in edits}) > 1:
            for e in edits[1:]:
                if not an.union(edits[0].layout, e.layout):
                    an.block(edits[0].layout, f"weight shared with a layer cut differently ({e.node.name})")
                    an.block(e.layout, f"weight shared with a layer cut differently ({edits[0].node.name})")


def find_groups(model: ir.Model, protect: Sequence[str] = (), heads: bool = True) -> Analysis:
    """Dependency analysis (see the module docstring); a protect regex that matches no node is an error."""
    an = ChannelAnalyzer(model, protect)
    an.run()
    if heads:
        find_heads(model, an)
    _tie_shared_weights(an)
    missing = [p.pattern for p in an.protect if p.pattern not in an.protected_hits]
    if missing:
        raise OptionError("protect", f"{missing[0]!r} matches no prunable layer; check the node names "
                                     "(`edgecomp inspect` lists ops) or drop it")
    return an.a
