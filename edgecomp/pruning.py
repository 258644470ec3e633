"""Structured pruning: which channels move together, which to cut, and how to repair the cut.

The steps, each a plain function so tests and scripts can drive them one at a time:

1. :func:`find_groups` — dependency analysis. Every Conv (group 1), MatMul or Gemm with a
   constant weight starts an *atom* of output channels. Channel positions are propagated forward
   in graph order through ops that keep them (BatchNorm, activations, per-channel constants,
   pooling, spatial reductions, Transpose, depthwise Conv, Flatten/Reshape into a Linear), and
   stop at *consumers* that reduce over them (Conv, MatMul, Gemm input channels). A residual
   Add/Mul ties its inputs' atoms into one group; a Concat along the channel axis lays several
   atoms side by side. An op not known to keep channel positions (LayerNormalization, a
   head-splitting Reshape, Shape, ...) or a graph output leaves every atom reaching it whole,
   and the report names that op. Attention heads are matched as a pattern (Q/K/V MatMul → Reshape
   to heads → scores → Softmax → context → Reshape → output MatMul) and form one atom per block
   whose unit is a head: ``d`` columns of Q, K and V, ``d`` rows of the output projection, and the
   head count in the Reshape shapes.
2. :func:`channel_stats` — with calibration data, per consumer input feature ``E[x_c²]``
   (streamed, one sample at a time).
3. :func:`plan_pruning` — importance per channel of a group, summed over its layers:
   magnitude ``‖W_c‖₁`` or ``‖W_c‖₂`` of every weight slice the channel owns, or activation-based
   ``sqrt(E[x_c²]) · ‖W_consumer[c, :]‖₂`` (the channel's contribution to each consumer's output);
   per-layer scope removes ``sparsity`` of each group, global scope ranks scores normalized by
   each group's mean across all groups; ``round_to`` keeps channel counts multiples of N.
4. :class:`~edgecomp.passes.prune_channels.PruneChannelsPass` applies the plan.
5. :func:`repair` — ridge least squares re-fit of every consumer whose input channels were
   removed, so its outputs on calibration samples match the unpruned model's. With ``X`` the
   unpruned consumer input (plus a ones column for the bias) and ``X̃`` the pruned model's input
   on the kept channels, streaming over samples::

       A = Σ X̃ᵀX̃,  B = Σ X̃ᵀX,  C = Σ XᵀX
       W' = (A + λI')⁻¹ B W         (λ = ridge · tr(A_K) / K over the K kept features, ridge 1e-3
                                     by default; I' leaves the bias unshrunk)
       err(V) = tr(VᵀAV) − 2 tr(VᵀBW) + tr(WᵀCW),   reported as err / tr(WᵀCW)

   Every 5th sample of the data is held out (once there are 5): importance and the fit use the
   rest. A fit is refused when its rows (positions N·H·W for a conv, tokens for a MatMul) are
   fewer than its unknowns per output (``dim A``), and applied only when it lowers the error on
   the held-out samples; otherwise the layer stays as cut and the report says why.
   Memory is three ``(K+1)²`` matrices per consumer input, whatever the number of samples.
   Conv consumers are repaired only for 1x1 kernels without padding (im2col rows would make ``K``
   grow by the kernel area); larger kernels are left as cut and the report says so.
6. :func:`held_out_fidelity` — with data, the outputs of the result against the unpruned model's
   on the held-out samples (mean cosine; top-1 agreement for logits).

Before the analysis, :func:`lift_constants` turns Constant-node weights into initializers and
bypasses Identity nodes of constants. Convs of any rank (1-D ``[N, C, L]`` as 2-D) are followed;
layers inside If/Loop/Scan subgraphs are kept whole, and so is every channel a subgraph reads.
When no group can be cut, :class:`NothingToPrune` says why and nothing is written.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (not imported by onnx_ir itself)

from edgecomp.data import Dataset, input_specs
from edgecomp.errors import ConfigError, PassFailed
from edgecomp.passes.base import rank_of

__all__ = ["PruneOptions", "Layout", "Edit", "Analysis", "PrunePlan", "PruneResult", "NothingToPrune", "const_array",
           "lift_constants", "find_groups", "channel_stats", "plan_pruning", "repair", "held_out_fidelity", "prune_model",
           "verify_pruned", "IMPORTANCES", "HOLD_OUT_EVERY", "FIDELITY_WARN"]

IMPORTANCES = ("auto", "l1", "l2", "activation", "obs")
KINDS = ("channels", "heads")

_UNARY = {"Relu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Celu", "Erf", "Gelu",
          "Softplus", "Softsign", "Identity", "Neg", "Abs", "Sqrt", "Exp", "Log", "Mish", "Reciprocal", "Dropout",
          "ThresholdedRelu", "Clip", "Cast"}
_BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Mean"}
_POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
_REDUCES = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare"}
_LAYERS = ("Conv", "MatMul", "Gemm")
HOLD_OUT_EVERY = 5  # with --data, every 5th sample is held out: it checks repairs and the result, never fits them
FIDELITY_WARN = 0.95  # warn when the held-out mean cosine or top-1 agreement falls below this


class NothingToPrune(PassFailed):
    """No channel group (structured) or no weight (unstructured) can be pruned: nothing is written."""


def lift_constants(model: ir.Model) -> int:
    """Make every main-graph weight a plain initializer: ``Constant`` nodes holding a tensor
    (PaddlePaddle and some TorchScript exports) become initializers, and ``Identity`` nodes that
    read a constant (TorchScript's shared, de-duplicated weights) are bypassed. Subgraphs are left
    alone. The parameter count (:func:`edgecomp.inspection.count_parameters`) and the outputs are
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


# --- layouts and atoms -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a value's channels sit: ``axis`` (negative, from the end) and the atoms laid side by
    side along it, each as ``(atom, repeat)`` — a channel of the atom spans ``repeat`` consecutive
    positions (a flattened ``H·W`` block, or a head's ``d`` columns)."""

    axis: int
    parts: tuple[tuple[int, int], ...]
    rank: int | None = None

    def atoms(self) -> list[int]:
        return [a for a, _ in self.parts]

    def indices(self, kept: Mapping[int, np.ndarray], sizes: Mapping[int, int]) -> np.ndarray:
        """Positions along the axis that survive when atom ``a`` keeps channels ``kept[a]``."""
        out, offset = [], 0
        for atom, rep in self.parts:
            k = kept.get(atom, np.arange(sizes[atom]))
            out.append((offset + (k[:, None] * rep + np.arange(rep)[None, :])).reshape(-1))
            offset += sizes[atom] * rep
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    def width(self, sizes: Mapping[int, int]) -> int:
        return sum(sizes[a] * r for a, r in self.parts)


@dataclasses.dataclass
class Edit:
    """One change a cut implies.

    kind ``param``: take ``indices(layout)`` of ``node.inputs[index]`` along ``axis`` (``role``
    says whether it is a layer's weight as producer ``out`` or consumer ``in``, or another
    parameter); ``group``: set a depthwise Conv's ``group`` to the kept width; ``dim``: set element
    ``position`` of the constant at ``node.inputs[index]`` to ``factor ·`` the kept width (left
    alone where it is -1 or 0, which Reshape infers or copies).
    """

    kind: str
    node: ir.Node
    index: int
    layout: Layout
    axis: int = 0
    role: str = "param"
    position: int = 0
    factor: int = 1


@dataclasses.dataclass
class Analysis:
    """The result of :func:`find_groups`."""

    sizes: dict[int, int]
    kinds: dict[int, str]
    names: dict[int, str]
    parent: dict[int, int]
    blocked: dict[int, list[str]]
    edits: list[Edit]
    values: dict[str, Layout]  # every value whose shape changes, with its layout
    head_values: set[str]  # values inside attention blocks whose shapes are cleared

    def root(self, atom: int) -> int:
        while self.parent[atom] != atom:
            self.parent[atom] = self.parent[self.parent[atom]]
            atom = self.parent[atom]
        return atom

    def groups(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for a in self.sizes:
            out.setdefault(self.root(a), []).append(a)
        return out

    def group_blocked(self, root: int) -> list[str]:
        reasons = []
        for a in self.groups()[root]:
            reasons += [r for r in self.blocked.get(a, []) if r not in reasons]
        return reasons


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """A value's constant array: an initializer or a Constant node's output (not an initializer
    that is also a graph input: the caller may feed another value)."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    p = value.producer()
    if p is not None and p.op_type == "Constant" and p.domain in ("", "ai.onnx") and "value" in p.attributes:
        return p.attributes["value"].as_tensor().numpy()
    return None


def _subgraphs(node: ir.Node) -> list[ir.Graph]:
    graphs: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs.extend(attr.value)
    return graphs


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _dims(value: ir.Value) -> list[int | None] | None:
    """A value's dims (None for a symbolic one), or None when its rank is unknown."""
    if value.shape is None:
        return None
    return [int(d) if isinstance(d, int) else None for d in value.shape]


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


class _Analyzer:
    def __init__(self, model: ir.Model, protect: Sequence[str]):
        self.model = model
        self.protect = [re.compile(p) for p in protect]
        self.a = Analysis({}, {}, {}, {}, {}, [], {}, set())
        self.layout: dict[ir.Value, Layout] = {}
        self.protected_hits: set[str] = set()
        self._inferred: dict[str, list[int | None]] | None = None

    def dims(self, value: ir.Value) -> list[int | None] | None:
        """The value's dims, from its own shape or, where that is missing or symbolic, inference."""
        own = _dims(value)
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
            if _subgraphs(node):
                self.subgraph(node)
            try:
                self.visit(node, ins)
            except _Stop as stop:
                for lay in ins:
                    self.block(lay, f"{stop} ({node.name})")
        for out in self.model.graph.outputs:
            self.block(self.layout.get(out), f"graph output {out.name}")
        return self.a

    def subgraph(self, node: ir.Node) -> None:
        """A node with subgraphs (If, Loop, Scan): channels it reads from this graph (as inputs or
        captured inside) stay whole, and its layers get a group each that says why it is kept."""
        where = f"{node.op_type} subgraph ({node.name})"
        for g in _subgraphs(node):
            for v in g.outputs:
                self.block(self.layout.get(v), f"read inside {where}")
            for inner in ir.traversal.RecursiveGraphIterator(g):
                for v in inner.inputs:
                    if v is not None:
                        self.block(self.layout.get(v), f"read inside {where}")
                if inner.op_type not in _LAYERS or inner.domain not in ("", "ai.onnx") or len(inner.inputs) < 2:
                    continue
                w = const_array(inner.inputs[1])
                if w is None or w.ndim < 2:
                    continue
                trans_b = inner.op_type == "Gemm" and int(_attr(inner, "transB", 0))
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
                raise _Stop(op)
            for i in range(1, len(node.inputs)):
                self.a.edits.append(Edit("param", node, i, lay, axis=0))
            return self.set_layout(node.outputs[0], lay)
        if op in _UNARY or op in _BINARY:
            return self.elementwise(node, op, ins)
        if op in _POOLS:
            lay = ins[0]
            if not self._is_axis(lay, 1):
                raise _Stop(op)
            return self.set_layout(node.outputs[0], lay)
        if op in _REDUCES:
            return self.reduce(node, ins[0])
        if op == "Transpose":
            lay = ins[0]
            if lay.rank is None:
                raise _Stop("Transpose of unknown rank")
            perm = list(_attr(node, "perm", list(range(lay.rank))[::-1]))
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
        raise _Stop(op)

    def _axes(self, node: ir.Node, index: int) -> list[int] | None:
        """An op's ``axes``: the attribute (older opsets) or the constant input at ``index``."""
        axes = _attr(node, "axes", None)
        if axes is None and len(node.inputs) > index and node.inputs[index] is not None:
            c = const_array(node.inputs[index])
            if c is None:
                raise _Stop(f"{node.op_type} with computed axes")
            axes = c.reshape(-1).tolist()
        return None if axes is None else [int(a) for a in axes]

    def squeeze(self, node: ir.Node, op: str, ins: list[Layout | None]) -> None:
        lay = ins[0]
        if lay is None or any(x is not None for x in ins[1:]) or lay.rank is None:
            raise _Stop(f"{op} of unknown rank" if lay is not None and lay.rank is None else op)
        axes = self._axes(node, 1)
        pos = lay.rank + lay.axis
        if op == "Squeeze":
            if axes is None:
                dims = self.dims(node.inputs[0])
                if dims is None or any(d is None for d in dims):
                    raise _Stop("Squeeze of unknown input shape")
                axes = [i for i, d in enumerate(dims) if d == 1]
            gone = {a % lay.rank for a in axes}
            if pos in gone:
                raise _Stop("Squeeze of the channel axis")
            rank, pos = lay.rank - len(gone), pos - sum(a < pos for a in gone)
        else:
            if not axes:
                raise _Stop("Unsqueeze without axes")
            rank = lay.rank + len(axes)
            new = {a % rank for a in axes}
            pos = [i for i in range(rank) if i not in new][pos]
        self.set_layout(node.outputs[0], Layout(pos - rank, lay.parts, rank))

    def off_channel(self, node: ir.Node, op: str, ins: list[Layout | None]) -> None:
        """Pad and Slice keep channel positions when they leave the channel axis alone."""
        lay = ins[0]
        if lay is None or any(x is not None for x in ins[1:]) or lay.rank is None:
            raise _Stop(op)
        pos = lay.rank + lay.axis
        if op == "Pad":
            pads = _attr(node, "pads", None)
            if pads is None:
                c = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
                if c is None:
                    raise _Stop("Pad with computed pads")
                pads = c.reshape(-1).tolist()
            if len(node.inputs) > 3 and node.inputs[3] is not None:
                raise _Stop("Pad with axes")
            c = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
            if len(pads) != 2 * lay.rank or pads[pos] or pads[pos + lay.rank] or (c is not None and c.size > 1):
                raise _Stop("Pad of the channel axis")
        else:
            starts = _attr(node, "starts", None)  # opset < 10 keeps them as attributes
            if starts is None and len(node.inputs) > 1 and const_array(node.inputs[1]) is not None:
                starts = const_array(node.inputs[1]).reshape(-1).tolist()
            if starts is None:
                raise _Stop("Slice with computed starts")
            axes = self._axes(node, 3)
            axes = list(range(len(starts))) if axes is None else axes
            if pos in {a % lay.rank for a in axes}:
                raise _Stop("Slice of the channel axis")
        self.set_layout(node.outputs[0], lay)

    @staticmethod
    def _is_axis(lay: Layout | None, pos: int) -> bool:
        return lay is not None and lay.rank is not None and lay.rank + lay.axis == pos

    def layer(self, node: ir.Node, op: str, ins: list[Layout | None]) -> None:
        x = ins[0]
        w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if any(lay is not None for lay in ins[1:]):
            raise _Stop(f"{op} with a computed weight")
        protected = self.is_protected(node)
        if protected:
            self.block(x, f"protected ({node.name})")
        if op == "Conv":
            group = int(_attr(node, "group", 1))
            if w is None:
                raise _Stop("Conv with a computed weight")
            depthwise = group > 1 and w.shape[1] == 1 and w.shape[0] == group
            if depthwise:
                if x is None or x.width(self.a.sizes) != group:
                    return None  # a depthwise conv on an input we do not track: nothing moves
                if protected:
                    return None
                if not self._is_axis(x, 1):
                    raise _Stop("depthwise Conv off the channel axis")
                self.a.edits.append(Edit("param", node, 1, x, axis=0, role="dw"))
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    self.a.edits.append(Edit("param", node, 2, x, axis=0))
                self.a.edits.append(Edit("group", node, 0, x))
                return self.set_layout(node.outputs[0], x)
            if group != 1:
                raise _Stop(f"grouped Conv (group={group})")
            if x is not None:
                if not self._is_axis(x, 1):
                    raise _Stop("Conv input channels off axis 1")
                self.a.edits.append(Edit("param", node, 1, x, axis=1, role="in"))
            self.source(node, w.shape[0], Layout(1 - w.ndim, (), w.ndim), [(1, 0), (2, 0)], protected)
            return None
        if w is None or w.ndim != 2:
            if x is not None:
                raise _Stop(f"{op} with a computed weight")
            return None
        trans_b = op == "Gemm" and int(_attr(node, "transB", 0))
        if op == "Gemm" and int(_attr(node, "transA", 0)):
            raise _Stop("Gemm with transA")
        if x is not None:
            if x.axis != -1:
                raise _Stop(f"{op} input channels off the last axis")
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
                raise _Stop(f"{op} of differently laid out channels")
        ranks = []
        for i, v in enumerate(node.inputs):
            if v is None or ins[i] is not None:
                ranks.append(ins[i].rank if ins[i] is not None else 0)
                continue
            c = const_array(v)
            dims = list(c.shape) if c is not None else self.dims(v)
            if dims is None or (len(dims) >= -first.axis and dims[first.axis] is None):
                raise _Stop(f"{op} with an operand of unknown shape")
            ranks.append(len(dims))
            if len(dims) < -first.axis or dims[first.axis] == 1:
                continue  # broadcasts along the channel axis
            if c is None:
                raise _Stop(f"{op} with a computed per-channel operand")
            if dims[first.axis] != first.width(self.a.sizes):
                raise _Stop(f"{op} operand does not match the channels")
            self.a.edits.append(Edit("param", node, i, first, axis=len(dims) + first.axis))
        rank = None if any(r is None for r in ranks) else max(ranks)
        out = Layout(first.axis, first.parts, rank if rank else first.rank)
        self.set_layout(node.outputs[0], out)

    def reduce(self, node: ir.Node, lay: Layout | None) -> None:
        if lay is None or lay.rank is None:
            raise _Stop(f"{node.op_type} of unknown rank")
        axes = _attr(node, "axes", None)
        if axes is None and len(node.inputs) > 1:
            c = const_array(node.inputs[1])
            if c is None:
                raise _Stop(f"{node.op_type} with computed axes")
            axes = c.tolist()
        if not axes:
            raise _Stop(f"{node.op_type} over every axis")
        axes = [a % lay.rank for a in axes]
        pos = lay.rank + lay.axis
        if pos in axes:
            raise _Stop(f"{node.op_type} over the channel axis")
        if int(_attr(node, "keepdims", 1)):
            return self.set_layout(node.outputs[0], lay)
        rank = lay.rank - len(axes)
        pos -= sum(a < pos for a in axes)
        self.set_layout(node.outputs[0], Layout(pos - rank, lay.parts, rank))

    def concat(self, node: ir.Node, ins: list[Layout | None]) -> None:
        carried = [lay for lay in ins if lay is not None]
        first = carried[0]
        if first.rank is None:
            raise _Stop("Concat of unknown rank")
        axis = int(_attr(node, "axis", 0)) % first.rank
        if axis != first.rank + first.axis:
            if len(carried) != len(ins):
                raise _Stop("Concat off the channel axis of untracked values")
            for lay in carried[1:]:
                if not self.union(first, lay):
                    raise _Stop("Concat of differently laid out channels")
            return self.set_layout(node.outputs[0], first)
        parts: list[tuple[int, int]] = []
        for v, lay in zip(node.inputs, ins):
            if lay is not None:
                if lay.axis != first.axis:
                    raise _Stop("Concat of channels on different axes")
                parts += lay.parts
                continue
            dims = self.dims(v) if const_array(v) is None else list(const_array(v).shape)
            if dims is None or len(dims) <= axis or dims[axis] is None:
                raise _Stop("Concat with an untracked input of unknown size")
            fixed = self.new_atom(dims[axis], "channels", v.name)
            self.a.blocked[fixed] = [f"not produced by a prunable layer ({v.name})"]
            parts.append((fixed, 1))
        self.set_layout(node.outputs[0], Layout(first.axis, tuple(parts), first.rank))

    def flatten(self, node: ir.Node, op: str, ins: list[Layout | None]) -> None:
        lay = ins[0]
        if lay is None or any(x is not None for x in ins[1:]):
            raise _Stop(op)
        dims = self.dims(node.inputs[0])
        pos = len(dims) + lay.axis if dims is not None else -1
        if dims is None or pos < 0 or any(d is None for d in dims[pos + 1:]):
            raise _Stop(f"{op} of unknown input shape")
        inner = int(np.prod(dims[pos + 1:])) if pos + 1 < len(dims) else 1
        if op == "Flatten":
            if int(_attr(node, "axis", 1)) % len(dims) != pos:
                raise _Stop("Flatten that splits the channel axis")
        else:
            shape = const_array(node.inputs[1])
            if shape is None or shape.ndim != 1 or len(shape) != pos + 1:
                raise _Stop("Reshape that does not flatten the channels into the last axis")
            if int(_attr(node, "allowzero", 0)) and 0 in shape.tolist()[pos:]:
                raise _Stop("Reshape with allowzero")
            lead = shape.tolist()[:pos]
            # each leading dim copied (0) or equal to the input's; one -1 there is the batch when the
            # flattened width itself is explicit
            free = lead.count(-1) == 1 and shape[pos] != -1
            if any(not (s == 0 or (d is not None and s == d) or (s == -1 and free)) for s, d in zip(lead, dims[:pos])) \
                    or (shape[pos] != -1 and int(shape[pos]) != lay.width(self.a.sizes) * inner):
                raise _Stop("Reshape that moves the channels")
            if shape[pos] != -1:
                self.a.edits.append(Edit("dim", node, 1, lay, position=pos, factor=inner))
        parts = tuple((a, r * inner) for a, r in lay.parts)
        self.set_layout(node.outputs[0], Layout(-1, parts, pos + 1))


class _Stop(Exception):
    """An op that does not keep channel positions; the message names it."""


# --- attention heads -------------------------------------------------------------------------

def _single_use(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 and value not in value.graph.outputs else None


def _feeds_only(value: ir.Value, node: ir.Node) -> bool:
    """``value`` is read by ``node`` and otherwise only by Shape → Gather of a dim other than the last."""
    if value in value.graph.outputs:
        return False
    entries = _shape_entries(node) if node.op_type == "Reshape" else None
    rank = len(value.shape) if value.shape is not None else (len(entries) - 1 if entries else None)
    for use in value.uses():
        if use.node is node:
            continue
        if use.node.op_type != "Shape" or _attr(use.node, "start", 0) != 0 or rank is None:
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
    if _single_use(p.outputs[0]) is None:
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


def _find_heads(model: ir.Model, an: _Analyzer) -> None:
    """Match multi-head attention blocks and add one 'heads' atom per block."""
    for softmax in [n for n in model.graph if n.op_type == "Softmax"]:
        _match_attention(softmax, an)


def _match_attention(softmax: ir.Node, an: _Analyzer) -> None:
    scores = _back_through(softmax.inputs[0], {"Add", "Mul", "Div", "Sub", "Where", "Cast"})
    qk = scores.producer()
    ctx_mm = _single_use(softmax.outputs[0])
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
    t = _single_use(ctx_mm.outputs[0])
    merge = _single_use(t.outputs[0]) if t is not None and t.op_type == "Transpose" else None
    out_mm = _single_use(merge.outputs[0]) if merge is not None and merge.op_type == "Reshape" else None
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
    node = _single_use(v)
    while node is not None and node is not end:
        v = node.outputs[0]
        names.append(v.name)
        node = _single_use(v)
    return names


def find_groups(model: ir.Model, protect: Sequence[str] = (), heads: bool = True) -> Analysis:
    """Dependency analysis (see the module docstring); a protect regex that matches no node is an error."""
    an = _Analyzer(model, protect)
    an.run()
    if heads:
        _find_heads(model, an)
    missing = [p.pattern for p in an.protect if p.pattern not in an.protected_hits]
    if missing:
        raise ConfigError(f"--protect {missing[0]!r} matches no prunable layer; check the node names "
                          "(`edgecomp inspect` lists ops) or drop the option")
    return an.a


# --- importance and the plan -----------------------------------------------------------------

@dataclasses.dataclass
class PruneOptions:
    """Every option of structured pruning, with its default."""

    sparsity: float = 0.5  # fraction of each group's channels (or heads) removed
    importance: str = "auto"  # auto (activation with data, else l2) | l1 | l2 | activation | obs
    scope: str = "per-layer"  # per-layer | global
    protect: tuple[str, ...] = ()  # regexes on node names: layers kept whole
    # Kept channel counts are multiples of this; 0 = auto: 8 for groups of >= 32 channels, else 1
    # (odd counts made the pruned digits MobileNetV2 1.6-2x slower in onnxruntime 1.32).
    round_to: int = 0
    kinds: tuple[str, ...] = KINDS  # channels (incl. FFN neurons) and/or heads
    repair: bool = True  # least squares re-fit of consumers (needs data)
    ridge: float = 1e-3  # λ = ridge · tr(A_K) / K (the kept features' Gram) in the repair fit
    max_samples: int | None = None
    threads: int = 1

    def validate(self) -> None:
        if not 0.0 < self.sparsity < 1.0:
            raise ConfigError(f"--sparsity must be strictly between 0 and 1, got {self.sparsity}")
        if self.importance not in IMPORTANCES:
            raise ConfigError(f"--importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")
        if self.scope not in ("per-layer", "global"):
            raise ConfigError(f"--scope must be global or per-layer, got {self.scope!r}")
        if self.round_to < 0:
            raise ConfigError(f"--round-to must be >= 1 (or 0 for auto), got {self.round_to}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ConfigError(f"--kinds takes a comma list of {', '.join(KINDS)}, got {','.join(self.kinds)!r}")
        for p in self.protect:
            try:
                re.compile(p)
            except re.error as e:
                raise ConfigError(f"--protect {p!r} is not a valid regular expression ({e})") from None


@dataclasses.dataclass
class PrunePlan:
    """What to cut: kept channel indices per atom (atoms absent are kept whole)."""

    analysis: Analysis
    kept: dict[int, np.ndarray]
    rows: list[dict[str, Any]]
    importance: str


def _positions(layout: Layout, atom: int, sizes: Mapping[int, int]) -> np.ndarray:
    """[size, repeat] positions of ``atom``'s channels along the layout's axis."""
    offset = 0
    for a, rep in layout.parts:
        if a == atom:
            return offset + np.arange(sizes[a])[:, None] * rep + np.arange(rep)[None, :]
        offset += sizes[a] * rep
    raise KeyError(atom)


def _slice_norms(w: np.ndarray, axis: int, p: int) -> np.ndarray:
    flat = np.moveaxis(w.astype(np.float64), axis, 0).reshape(w.shape[axis], -1)
    return np.abs(flat).sum(1) if p == 1 else (flat ** 2).sum(1)


def _group_scores(an: Analysis, how: str, stats: Mapping[str, np.ndarray] | None,
                  sparsity: float = 1.0) -> dict[int, np.ndarray]:
    """Importance per channel of every group (root atom → scores)."""
    p = 1 if how == "l1" else 2
    mag: dict[int, np.ndarray] = {}
    act: dict[int, np.ndarray] = {}
    for e in an.edits:
        if e.kind != "param" or e.role not in ("out", "in", "dw"):
            continue
        w = const_array(e.node.inputs[e.index])
        if w is None:
            continue
        norms = _slice_norms(w, e.axis, p)
        x2 = stats.get(e.node.inputs[0].name) if (stats and e.role == "in") else None
        if x2 is not None and len(x2) == len(norms):
            contrib = np.sqrt(x2) * np.sqrt(_slice_norms(w, e.axis, 2))
        else:
            contrib = None
        for atom in e.layout.atoms():
            pos = _positions(e.layout, atom, an.sizes)
            if pos.max() >= len(norms):
                continue
            root = an.root(atom)
            mag.setdefault(root, np.zeros(an.sizes[atom]))
            mag[root] += norms[pos].sum(1)
            if contrib is not None:
                act.setdefault(root, np.zeros(an.sizes[atom]))
                act[root] += contrib[pos].sum(1)
    if p == 2:
        mag = {k: np.sqrt(v) for k, v in mag.items()}
    if how == "obs":
        act.update(_obs_scores(an, stats, sparsity))
    if how in ("activation", "obs"):
        return {k: act.get(k, v) for k, v in mag.items()}
    return mag


def _obs_scores(an: Analysis, stats: Mapping[str, np.ndarray], sparsity: float) -> dict[int, np.ndarray]:
    """Optimal Brain Surgeon order for groups read by exactly one MatMul/Gemm (e.g. FFN neurons).

    With ``H = E[x xᵀ]`` of the consumer's input and its weight rows ``W_j``, removing input ``j``
    and re-fitting the rest costs ``ΔE_j = ‖W_j‖² / [H⁻¹]_jj``. Inputs are removed greedily, the
    cheapest first, updating ``W`` and ``H⁻¹`` after each removal (the compensation that repair
    later re-fits exactly); a channel's score is the step at which it would be removed (those
    still in place after a little more than ``sparsity`` of the inputs are gone score highest).
    """
    readers: dict[int, list[Edit]] = {}
    for e in an.edits:
        if e.kind == "param" and e.role == "in":
            for atom in e.layout.atoms():
                readers.setdefault(an.root(atom), []).append(e)
    out = {}
    for root, edits in readers.items():
        if len(edits) != 1 or edits[0].node.op_type not in ("MatMul", "Gemm") or len(edits[0].layout.parts) != 1:
            continue
        e = edits[0]
        gram = stats.get("gram:" + e.node.inputs[0].name)
        w = const_array(e.node.inputs[e.index])
        atom, rep = e.layout.parts[0]
        if gram is None or w is None or rep != 1 or e.axis != 0 or w.shape[0] != an.sizes[atom] or gram.shape[0] != w.shape[0]:
            continue
        out[root] = _obs_order(gram, w.astype(np.float64), min(w.shape[0], int(w.shape[0] * sparsity) + 8))
    return out


def _obs_order(gram: np.ndarray, w: np.ndarray, steps: int) -> np.ndarray:
    k = gram.shape[0]
    hinv = np.linalg.inv(gram + np.eye(k) * max(1e-2 * float(np.mean(np.diag(gram))), 1e-12))
    w = w.copy()
    alive = np.ones(k, bool)
    score = np.full(k, float(k))
    for step in range(steps):
        d = np.diag(hinv)
        cost = np.where(alive, (w ** 2).sum(1) / np.maximum(d, 1e-30), np.inf)
        j = int(np.argmin(cost))
        score[j] = step
        alive[j] = False
        col = hinv[:, j].copy()
        w -= np.outer(col / hinv[j, j], w[j])
        hinv -= np.outer(col, hinv[j]) / hinv[j, j]
        hinv[j, :] = hinv[:, j] = 0.0
        hinv[j, j] = 1.0
        w[j] = 0.0
    return score


def _round_keep(keep: int, size: int, round_to: int) -> int:
    step = round_to or (8 if size >= 32 else 1)
    return max(1, min(size, int(np.ceil(keep / step) * step)))


def _n_keep(size: int, sparsity: float, round_to: int) -> int:
    return _round_keep(size - int(np.floor(size * sparsity + 1e-9)), size, round_to)


def plan_pruning(an: Analysis, opts: PruneOptions, stats: Mapping[str, np.ndarray] | None = None) -> PrunePlan:
    """Choose the channels to keep in every prunable group (see the module docstring)."""
    how = opts.importance
    if how == "auto":
        how = "activation" if stats else "l2"
    if how in ("activation", "obs") and not stats:
        raise ConfigError(f"--importance {how} needs calibration samples; give --data DATA")
    scores = _group_scores(an, how, stats, opts.sparsity)
    groups = an.groups()
    rows, prunable = [], []
    for root, atoms in groups.items():
        kind = an.kinds[root]
        name = " + ".join(dict.fromkeys(an.names[a] for a in atoms[:3])) + (" …" if len(atoms) > 3 else "")
        row = {"group": name, "kind": kind, "layers": len(atoms), "before": an.sizes[root], "after": an.sizes[root],
               "threshold": None, "status": "kept whole"}
        rows.append(row)
        reasons = an.group_blocked(root)
        if kind not in opts.kinds:
            row["status"] = f"kept whole: {kind} not selected (--kinds)"
        elif reasons:
            row["status"] = "kept whole: " + "; ".join(reasons[:2]) + (" …" if len(reasons) > 2 else "")
        elif root not in scores or an.sizes[root] < 2:
            row["status"] = "kept whole: no weights to rank"
        else:
            prunable.append((root, row))
    kept: dict[int, np.ndarray] = {}
    if opts.scope == "global":
        normed = {r: scores[r] / max(scores[r].mean(), 1e-30) for r, _ in prunable}
        allv = np.concatenate(list(normed.values())) if normed else np.zeros(0)
        cut = np.quantile(allv, opts.sparsity) if len(allv) else 0.0
    for root, row in prunable:
        s, size = scores[root], an.sizes[root]
        order = np.argsort(-s, kind="stable")
        if opts.scope == "global":
            keep = max(1, int((normed[root] > cut).sum()))
            keep = _round_keep(keep, size, opts.round_to)
        else:
            keep = _n_keep(size, opts.sparsity, opts.round_to)
        row["after"] = keep
        row["threshold"] = float(s[order[keep - 1]]) if keep < size else None
        row["status"] = "pruned" if keep < size else "kept whole: nothing below the threshold"
        if keep < size:
            idx = np.sort(order[:keep])
            for a in groups[root]:
                kept[a] = idx
    return PrunePlan(an, kept, rows, how)


# --- calibration statistics and repair -------------------------------------------------------

def _n_used(data: Dataset, limit: int | None) -> int:
    return len(data) if limit is None else min(len(data), limit)


def _is_held(i: int, n: int) -> bool:
    """Sample ``i`` of ``n`` is held out (every 5th, once there are at least 5)."""
    return n >= HOLD_OUT_EVERY and i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1


def _feeds(data: Dataset, model: ir.Model, limit: int | None, part: str = "all") -> Iterable[dict[str, np.ndarray]]:
    """Feeds of DATA: ``all``, the ``fit`` part (not held out) or the ``held`` part."""
    specs = input_specs(model)
    data.check_against(specs)
    n = _n_used(data, limit)
    for i, feed in enumerate(data.feeds_for(specs, limit)):
        if part == "all" or (part == "held") == _is_held(i, n):
            yield feed


def _rows(x: np.ndarray, node: ir.Node, subsample: bool) -> np.ndarray:
    """A consumer's input as rows of features: channels last, one row per position."""
    if node.op_type == "Conv":
        if subsample:
            strides = list(_attr(node, "strides", [1] * (x.ndim - 2)))
            x = x[(slice(None), slice(None), *(slice(None, None, s) for s in strides))]
        return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def channel_stats(model: ir.Model, an: Analysis, data: Dataset, max_samples: int | None = None,
                  threads: int = 1, grams: bool = False, part: str = "all") -> dict[str, np.ndarray]:
    """``E[x_c²]`` per input feature of every consumer the analysis found, streamed over samples
    (``part`` as in :func:`_feeds`); with ``grams``, also ``E[x xᵀ]`` (under ``"gram:" + name``)
    for MatMul/Gemm consumers of up to 4096 features, which OBS importance needs."""
    from edgecomp.runtime import make_session, run_feed

    consumers = {e.node.inputs[0].name: e.node for e in an.edits if e.kind == "param" and e.role == "in"}
    if not consumers:
        return {}
    names = list(consumers)
    session = make_session(model, threads=threads, optimization="basic", extra_outputs=names)
    sums: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(names, 0)
    for feed in _feeds(data, model, max_samples, part):
        for name, x in zip(names, run_feed(session, feed, names)):
            rows = _rows(np.asarray(x, np.float64), consumers[name], False)
            sums[name] = sums.get(name, 0) + (rows ** 2).sum(0)
            if grams and consumers[name].op_type in ("MatMul", "Gemm") and rows.shape[1] <= 4096:
                sums["gram:" + name] = sums.get("gram:" + name, 0) + rows.T @ rows
            counts[name] += rows.shape[0]
    return {k: v / max(counts[k.removeprefix("gram:")], 1) for k, v in sums.items()}


def _layer_weight(node: ir.Node) -> np.ndarray:
    """The layer's weight as [K, N] (input features × outputs)."""
    w = const_array(node.inputs[1])
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], w.shape[1]).T
    if node.op_type == "Gemm" and int(_attr(node, "transB", 0)):
        return w.T
    return w


def _bias_slot(node: ir.Node) -> tuple[ir.Node, int] | None:
    """Where the layer's bias lives (node, input index): Conv/Gemm input 2, or a MatMul's Add."""
    if node.op_type in ("Conv", "Gemm"):
        return node, 2
    uses = list(node.outputs[0].uses())
    if len(uses) == 1 and uses[0].node.op_type == "Add":
        add = uses[0].node
        other = 1 - uses[0].idx
        c = const_array(add.inputs[other])
        if c is not None and c.ndim == 1 and c.shape[0] == const_array(node.inputs[1]).shape[1]:
            return add, other
    return None


def _repairable(node: ir.Node) -> str | None:
    """Why a consumer cannot be re-fitted (None if it can)."""
    if node.op_type == "Conv":
        w = const_array(node.inputs[1])
        if any(k != 1 for k in w.shape[2:]):
            return f"{'x'.join(map(str, w.shape[2:]))} kernel (repair covers 1x1 convs and Linear layers)"
        if any(_attr(node, "pads", [0]) ) or int(_attr(node, "group", 1)) != 1:
            return "padded or grouped conv"
        if str(_attr(node, "auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
            return "auto_pad"
    if node.op_type == "Gemm" and (int(_attr(node, "transA", 0)) or float(_attr(node, "alpha", 1.0)) != 1.0
                                   or float(_attr(node, "beta", 1.0)) != 1.0):
        return "Gemm with transA/alpha/beta"
    return None


def repair(original: ir.Model, pruned: ir.Model, plan: PrunePlan, data: Dataset, max_samples: int | None = None,
           ridge: float = 1e-3, threads: int = 1) -> list[dict[str, Any]]:
    """Re-fit, by ridge least squares, every layer whose input channels were removed (module docstring).

    ``pruned`` is ``plan`` applied (changed in place). The fit uses the samples not held out;
    it is refused when they give fewer rows than unknowns per output, and applied only when it
    lowers the reconstruction error on the held-out samples (every 5th). A row per layer says
    ``applied`` or ``skipped: why``, with the relative error on the fitted samples and on the
    held-out ones, before and after.
    """
    an, kept = plan.analysis, plan.kept
    orig_nodes = {n.name: n for n in original.graph if n.op_type in _LAYERS}
    outs = {e.node.name: e.layout.indices(kept, an.sizes) for e in an.edits
            if e.kind == "param" and e.role == "out" and any(a in kept for a in e.layout.atoms())}
    rows, targets = [], []
    for e in an.edits:
        if e.kind != "param" or e.role != "in" or not any(a in kept for a in e.layout.atoms()):
            continue
        node, ref = e.node, orig_nodes.get(e.node.name)
        why = _repairable(node)
        if why is not None or ref is None:
            rows.append({"layer": node.name, "repair": f"skipped: {why or 'layer renamed'}"})
            continue
        n_out = _layer_weight(ref).shape[1]
        targets.append((node, ref, e.layout.indices(kept, an.sizes), outs.get(node.name, np.arange(n_out))))
    if not targets:
        return rows
    # one layer at a time, in graph order: each fit sees the inputs its repaired predecessors give it
    for node, ref, in_idx, out_idx in targets:
        fit, held = _grams(original, pruned, node, data, max_samples, threads)
        rows.append(_refit(pruned, node, ref, in_idx, out_idx, fit, held, ridge))
    ir.passes.common.RemoveUnusedNodesPass()(pruned)
    return rows


_Grams = tuple  # (A, B, C, rows) with A = Σ X̃ᵀX̃, B = Σ X̃ᵀX, C = Σ XᵀX


def _grams(original: ir.Model, pruned: ir.Model, node: ir.Node, data: Dataset, max_samples: int | None,
           threads: int) -> tuple[_Grams, _Grams]:
    """(A, B, C, rows) for ``node``'s input (ones column appended), on the fitted and on the
    held-out samples."""
    from edgecomp.runtime import make_session, run_feed

    name = node.inputs[0].name
    s_orig = make_session(original, threads=threads, optimization="basic", extra_outputs=[name])
    s_new = make_session(pruned, threads=threads, optimization="basic", extra_outputs=[name])
    acc = {False: [0.0, 0.0, 0.0, 0], True: [0.0, 0.0, 0.0, 0]}
    n = _n_used(data, max_samples)
    for i, feed in enumerate(_feeds(data, original, max_samples)):
        x = _rows(np.asarray(run_feed(s_orig, feed, [name])[0], np.float64), node, True)
        y = _rows(np.asarray(run_feed(s_new, feed, [name])[0], np.float64), node, True)
        x = np.hstack([x, np.ones((len(x), 1))])
        y = np.hstack([y, np.ones((len(y), 1))])
        g = acc[_is_held(i, n)]
        g[0], g[1], g[2], g[3] = g[0] + y.T @ y, g[1] + y.T @ x, g[2] + x.T @ x, g[3] + len(x)
    return tuple(acc[False]), tuple(acc[True])


def _bias_of(node: ir.Node, n_out: int) -> np.ndarray:
    slot = _bias_slot(node)
    if slot is None or slot[1] >= len(slot[0].inputs) or slot[0].inputs[slot[1]] is None:
        return np.zeros(n_out)
    return np.broadcast_to(const_array(slot[0].inputs[slot[1]]).reshape(-1), (n_out,)).astype(np.float64)


def _rel_err(m: np.ndarray, target: np.ndarray, g: _Grams, with_bias: bool) -> float | None:
    """‖X̃V − XW‖² / ‖XW‖² from the Gram matrices (None without rows)."""
    a, b, c, n = g
    if not n:
        return None
    if not with_bias:
        a, b = a[:-1, :-1], b[:-1]
    energy = float(np.einsum("ij,ik,kj->", target, c, target))
    e = np.einsum("ij,ik,kj->", m, a, m) - 2 * np.einsum("ij,ik,kj->", m, b, target) + energy
    return float(max(e, 0.0) / max(energy, 1e-30))


def _refit(pruned: ir.Model, node: ir.Node, ref: ir.Node, in_idx: np.ndarray, out_idx: np.ndarray,
           fit: _Grams, held: _Grams, ridge: float) -> dict[str, Any]:
    w_old = _layer_weight(ref).astype(np.float64)
    target = np.vstack([w_old, _bias_of(ref, w_old.shape[1])[None, :]])[:, out_idx]
    keep_rows = np.append(in_idx, w_old.shape[0])  # the bias row stays
    fit_bias = _bias_slot(node) is not None
    a, b, _, n = fit
    if not fit_bias:  # nowhere to write a bias: fit without the ones column
        a, b, keep_rows = a[:-1, :-1], b[:-1], in_idx
    v0 = target[keep_rows]
    before, held_before = _rel_err(v0, target, fit, fit_bias), _rel_err(v0, target, held, fit_bias)
    row = {"layer": node.name, "repair": "", "rel err before": before, "rel err after": before,
           "held-out err before": held_before, "held-out err after": held_before}
    unknowns = a.shape[0]
    if n < unknowns:
        row["repair"] = (f"skipped: {n} calibration rows < {unknowns} unknowns per output, the fit would "
                         "overfit (give more --data)")
        return row
    if not held[3]:
        row["repair"] = f"skipped: no held-out samples to check the fit (--data has fewer than {HOLD_OUT_EVERY})"
        return row
    # λ from the features' own scale: the ones column (a count of rows) would swamp small
    # activations, and the bias is not shrunk
    k = len(in_idx)
    reg = np.zeros(a.shape[0])
    reg[:k] = ridge * np.trace(a[:k, :k]) / max(k, 1)
    v = np.linalg.solve(a + np.diag(reg), b @ target)
    after, held_after = _rel_err(v, target, fit, fit_bias), _rel_err(v, target, held, fit_bias)
    if held_after >= held_before:
        row["repair"] = f"skipped: the fit raised the held-out error ({held_before:.3g} → {held_after:.3g})"
        return row
    if after >= before:
        row["repair"] = "skipped: the fit did not lower the error"
        return row
    row.update({"repair": "applied", "rel err after": after, "held-out err after": held_after})
    _write_layer(pruned, node, v[:-1] if fit_bias else v, v[-1] if fit_bias else None)
    return row


def _write_layer(model: ir.Model, node: ir.Node, w: np.ndarray, bias: np.ndarray | None) -> None:
    """Store a [K, N] weight (and bias) back in the layer's own layout."""
    from edgecomp.passes.prune_channels import new_initializer

    old = const_array(node.inputs[1])
    if node.op_type == "Conv":
        arr = w.T.reshape(old.shape)
    elif node.op_type == "Gemm" and int(_attr(node, "transB", 0)):
        arr = w.T
    else:
        arr = w
    node.replace_input_with(1, new_initializer(model.graph, node.inputs[1].name, arr.astype(old.dtype)))
    if bias is None:
        return
    slot, idx = _bias_slot(node)
    if idx >= len(slot.inputs):
        slot.resize_inputs(idx + 1)
    current = slot.inputs[idx]
    shape = const_array(current).shape if current is not None else (len(bias),)
    if current is not None and int(np.prod(shape)) != len(bias):
        shape = (len(bias),)
    slot.replace_input_with(idx, new_initializer(model.graph, (current.name if current is not None else node.name + "_bias"),
                                                 bias.reshape(shape).astype(old.dtype)))


# --- fidelity of the result --------------------------------------------------------------------

def held_out_fidelity(original: ir.Model, pruned: ir.Model, data: Dataset, max_samples: int | None = None,
                      threads: int = 1) -> dict[str, Any]:
    """Outputs of ``pruned`` vs ``original`` on the held-out samples (all samples when there are
    fewer than 5): per output the mean cosine and, for logits, top-1 agreement; overall the
    worst of each."""
    from edgecomp.runtime import make_session, run_feed
    from edgecomp.validate import compare_outputs

    n = _n_used(data, max_samples)
    part = "held" if n >= HOLD_OUT_EVERY else "all"
    s0 = make_session(original, threads=threads, optimization="basic")
    s1 = make_session(pruned, threads=threads, optimization="basic")
    names = [o.name for o in s0.get_outputs()]
    ref: list[list[np.ndarray]] = [[] for _ in names]
    cand: list[list[np.ndarray]] = [[] for _ in names]
    count = 0
    for feed in _feeds(data, original, max_samples, part):
        for store, sess in ((ref, s0), (cand, s1)):
            for j, arr in enumerate(run_feed(sess, feed)):
                store[j].append(np.asarray(arr))
        count += 1
    outs = [compare_outputs(name, r, c) for name, r, c in zip(names, ref, cand)
            if r and np.issubdtype(r[0].dtype, np.floating)]
    top1 = [o.top1_agreement for o in outs if o.top1_agreement is not None]
    return {"samples": count, "held out": part == "held",
            "cosine": min((o.cosine_mean for o in outs), default=None),
            "top-1 agreement": min(top1) if top1 else None,
            "outputs": [dataclasses.asdict(o) for o in outs]}


def _fidelity_text(fid: dict[str, Any]) -> str:
    parts = []
    if fid["cosine"] is not None:
        parts.append(f"mean cosine {fid['cosine']:.4f}")
    if fid["top-1 agreement"] is not None:
        parts.append(f"top-1 agreement {fid['top-1 agreement']:.1%}")
    where = (f"{fid['samples']} held-out samples" if fid["held out"]
             else f"all {fid['samples']} samples (fewer than {HOLD_OUT_EVERY}: none held out)")
    return f"{', '.join(parts) or 'no float outputs to compare'} on {where}"


def _fidelity_warning(fid: dict[str, Any]) -> str | None:
    low = []
    if fid["cosine"] is not None and fid["cosine"] < FIDELITY_WARN:
        low.append(f"mean cosine {fid['cosine']:.3f} < {FIDELITY_WARN}")
    if fid["top-1 agreement"] is not None and fid["top-1 agreement"] < FIDELITY_WARN:
        low.append(f"top-1 agreement {fid['top-1 agreement']:.1%} < {FIDELITY_WARN:.0%}")
    if not low:
        return None
    where = "held-out samples" if fid["held out"] else "samples (none held out)"
    return (f"the pruned model departs from the original on {fid['samples']} {where} ({'; '.join(low)}); "
            "lower --sparsity, --protect the sensitive layers or give more --data")


# --- orchestration ---------------------------------------------------------------------------

@dataclasses.dataclass
class PruneResult:
    model: ir.Model
    groups: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    summary: dict[str, Any]
    fidelity: dict[str, Any] | None = None  # with data: held_out_fidelity of the result
    warnings: list[str] = dataclasses.field(default_factory=list)  # one line each, for stderr


def _copy(model: ir.Model) -> ir.Model:
    return model.clone()


def _probe(model: ir.Model, feed: Mapping[str, np.ndarray] | None) -> dict[str, list[int]] | None:
    from edgecomp.data import synthesize_feed
    from edgecomp.inspection import probe_shapes

    try:
        feed = dict(feed) if feed is not None else synthesize_feed(input_specs(model))
        shapes = probe_shapes(model, feed)
    except Exception:  # MACs are informative only: a model we cannot probe (symbolic dims, no data) has none
        return None
    shapes.update({k: list(v.shape) for k, v in feed.items()})
    return shapes


def _layer_table(before: ir.Model, after: ir.Model, sb, sa, repaired: list[dict[str, Any]],
                 unrepaired: str = "no data") -> list[dict[str, Any]]:
    from edgecomp.inspection import node_macs

    old = {n.name: n for n in before.graph if n.op_type in _LAYERS}
    fits = {r["layer"]: r for r in repaired}
    rows = []
    for node in after.graph:
        ref = old.get(node.name)
        if ref is None or const_array(ref.inputs[1]) is None or const_array(node.inputs[1]) is None:
            continue
        w0, w1 = const_array(ref.inputs[1]), const_array(node.inputs[1])
        if w0.shape == w1.shape and node.name not in fits:
            continue
        k0, n0 = _layer_weight(ref).shape if ref.op_type != "Conv" else (w0.shape[1], w0.shape[0])
        k1, n1 = _layer_weight(node).shape if node.op_type != "Conv" else (w1.shape[1], w1.shape[0])
        b0, b1 = _bias_of(ref, n0), _bias_of(node, n1)
        fit = fits.get(node.name, {})
        rows.append({"layer": node.name, "op": node.op_type, "in": f"{k0}→{k1}", "out": f"{n0}→{n1}",
                     "params before": int(w0.size + np.count_nonzero(b0)), "params after": int(w1.size + np.count_nonzero(b1)),
                     "MACs before": node_macs(ref, sb) if sb else None, "MACs after": node_macs(node, sa) if sa else None,
                     "repair": fit.get("repair", "-" if k0 == k1 else unrepaired),
                     "rel err before": fit.get("rel err before"), "rel err after": fit.get("rel err after"),
                     "held-out err before": fit.get("held-out err before"),
                     "held-out err after": fit.get("held-out err after")})
    return rows


def verify_pruned(model: ir.Model, reference: ir.Model) -> None:
    """onnx.checker, onnxruntime load, and the graph's inputs and outputs unchanged — or PassFailed."""
    from edgecomp.io import check_model
    from edgecomp.runtime import make_session

    def io(m: ir.Model):
        return [(v.name, v.dtype, None if v.shape is None else tuple(str(d) for d in v.shape))
                for v in [*m.graph.inputs, *m.graph.outputs]]

    if io(model) != io(reference):
        raise PassFailed("pruning changed the graph's inputs or outputs; nothing was written (please report this)")
    try:
        check_model(model)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PassFailed(f"the pruned model fails onnx.checker ({first}); nothing was written") from e
    try:
        make_session(model, optimization="disable")
    except Exception as e:
        raise PassFailed(f"onnxruntime cannot load the pruned model ({e}); nothing was written") from e


def _reason_key(status: str) -> str:
    """'kept whole: LSTM (lstm_1); graph output y' → 'LSTM' (the first reason, node names dropped)."""
    first = status.removeprefix("kept whole: ").split("; ")[0].rstrip(" …")
    return re.sub(r" \([^()]*\)", "", first).strip() or "kept whole"


def nothing_to_prune_message(rows: Sequence[Mapping[str, Any]], opts: PruneOptions, computed: int = 0) -> str:
    """One line naming the commonest reasons every group was kept whole (``computed``: layers
    whose weight is computed, e.g. a Transpose of an initializer)."""
    counts: dict[str, int] = {}
    for r in rows:
        key = _reason_key(str(r["status"]))
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        why = (f" ({computed} layer{'s' if computed > 1 else ''} compute their weights from constants: "
               "`edgecomp optimize` folds them)" if computed else "")
        return f"nothing to prune: no Conv, MatMul or Gemm layer with a constant weight was found{why}; nothing was written"
    top = sorted(counts.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{k}: {n} group{'s' if n > 1 else ''}" for k, n in top[:3])
    if len(top) > 3:
        text += f", {len(top) - 3} more reason{'s' if len(top) > 4 else ''}"
    hint = ""
    if "nothing below the threshold" in counts:
        hint = f"; at --sparsity {opts.sparsity} the rounded channel counts keep every channel (raise it or --round-to 1)"
    return f"nothing to prune: every channel group is kept whole ({text}){hint}; nothing was written"


def prune_model(model: ir.Model, opts: PruneOptions, data: Dataset | None = None) -> PruneResult:
    """Analyse, rank, cut, repair and check (see the module docstring). ``model`` is changed in place.

    Raises :class:`NothingToPrune` when every group is kept whole, and ``PassFailed`` when the
    result fails the checks or would hold more parameters than the input. With ``data``, every 5th
    sample is held out: importance and repair use the rest, and the result's fidelity on the
    held-out samples is reported (with a warning below 0.95 mean cosine or top-1 agreement).
    """
    from edgecomp.inspection import count_macs, count_parameters
    from edgecomp.passes.base import run_pass
    from edgecomp.passes.prune_channels import PruneChannelsPass

    opts.validate()
    t0 = time.perf_counter()
    params0 = count_parameters(model)
    lift_constants(model)
    original = _copy(model)
    an = find_groups(model, opts.protect, heads="heads" in opts.kinds)
    want_act = opts.importance in ("activation", "obs") or (opts.importance == "auto" and data is not None)
    stats = (channel_stats(model, an, data, opts.max_samples, opts.threads, grams=opts.importance == "obs", part="fit")
             if (want_act and data is not None) else None)
    plan = plan_pruning(an, opts, stats)
    if not plan.kept:
        computed = sum(n.op_type in _LAYERS and len(n.inputs) > 1 and const_array(n.inputs[1]) is None
                       and n.inputs[1] is not None and n.inputs[1].producer() is not None
                       and all(const_array(v) is not None for v in n.inputs[1].producer().inputs if v is not None)
                       for n in model.graph)
        raise NothingToPrune(nothing_to_prune_message(plan.rows, opts, computed))
    feed = next(iter(_feeds(data, model, 1))) if data is not None else None
    shapes_before = _probe(original, feed)
    result = run_pass(PruneChannelsPass(plan=plan), model)
    repaired = []
    if opts.repair and data is not None and result.modified:
        repaired = repair(original, model, plan, data, opts.max_samples, opts.ridge, opts.threads)
    verify_pruned(model, original)
    params1 = count_parameters(model)
    if params1 > params0:
        raise PassFailed(f"pruning would raise the parameter count ({params0:,} → {params1:,}); nothing was written "
                         "(please report this)")
    shapes_after = _probe(model, feed)
    layers = _layer_table(original, model, shapes_before, shapes_after, repaired,
                          "off (--no-repair)" if data is not None and not opts.repair else "no data")
    macs0 = count_macs(original, shapes_before)[0] if shapes_before else None
    macs1 = count_macs(model, shapes_after)[0] if shapes_after else None
    fidelity = held_out_fidelity(original, model, data, opts.max_samples, opts.threads) if data is not None else None
    warnings = [w for w in [_fidelity_warning(fidelity) if fidelity else None] if w]
    summary = dict(result.summary)
    summary.update({"importance": plan.importance, "scope": opts.scope,
                    "parameters": f"{params0:,} → {params1:,}",
                    "MACs": f"{macs0:,} → {macs1:,}" if macs0 and macs1 else None,
                    "layers repaired": sum(r.get("repair") == "applied" for r in repaired),
                    "repairs skipped": sum(str(r.get("repair")).startswith("skipped") for r in repaired) or None,
                    "fidelity": _fidelity_text(fidelity) if fidelity else None,
                    "seconds": round(time.perf_counter() - t0, 1)})
    return PruneResult(model, plan.rows, layers, summary, fidelity, warnings)
