"""PruneChannelsPass: physically remove channels, neurons and heads chosen by a pruning plan.

The plan (:func:`edgecomp.prune.importance.plan_pruning`) lists, per atom of channels, the indices kept;
every edit the dependency analysis recorded is applied with those indices. Cases handled:

- a layer's weight along its output axis (Conv axis 0, MatMul axis 1, Gemm axis 0 with
  ``transB``) and input axis (Conv axis 1, MatMul axis 0, Gemm axis 1 with ``transB``);
- per-channel parameters: biases, BatchNorm scale/bias/mean/var, per-channel constants of
  Add/Mul/Clip/PRelu, a depthwise Conv's weight and its ``group`` attribute;
- shapes: the flattened width of a Reshape into a Linear, and the head count and merged width
  of the Reshapes around attention (a constant or a Concat piece, left alone where it is -1),
  the q/k/v sizes of a fused projection's Split (input or attribute) or Slice bounds;
- attention score terms with a heads axis that are computed (T5/MPNet position bias): read
  through a Gather of the kept heads (after an Expand where that axis may broadcast);
- value shapes: the channel dim of every value on a changed path is set to its new width, and
  the shapes inside attention blocks are cleared (onnxruntime infers them again); the kept
  positions of each narrowed value are recorded in the model metadata (``KEPT_POSITIONS_KEY``).

The plan comes from an analysis of the model, perhaps of another copy of it (the tolerance search
cuts many clones of one analysed model): its edits name their nodes, and the pass applies each
to the node of that name in the model it is given. :meth:`PruneChannelsPass.requires` refuses a
model where a planned node is missing, has another op, or shares its name with another node.

Sliced parameters become new initializers (a shared original stays intact for other users, and
two layers that cut one shared parameter the same way share the result); the unused originals
are removed. Graph inputs and outputs are untouched.
"""

from __future__ import annotations

import collections
import json
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (not imported by onnx_ir itself)

from edgecomp.errors import PassFailed
from edgecomp.graph import NameAllocator, add_initializer, const_array
from edgecomp.passes.base import EdgecompPass, PassReport
from edgecomp.prune.importance import PrunePlan

__all__ = ["PruneChannelsPass", "new_initializer", "KEPT_POSITIONS_KEY"]

#: Model metadata: JSON ``{value name: [axis, [kept positions]]}`` for each value a prune narrowed.
KEPT_POSITIONS_KEY = "edgecomp.prune.kept_positions"


def new_initializer(graph: ir.Graph, base: str, array: np.ndarray, names: NameAllocator | None = None) -> ir.Value:
    """Register ``array`` (contiguous) as an initializer named ``{base}_pruned``, or
    ``{base}_pruned_1``, ... : the first name not yet used. A caller adding many passes its own
    ``names`` (one index of the graph's names, not one whole-graph scan per initializer)."""
    names = NameAllocator(graph) if names is None else names
    return add_initializer(graph, names.unique(f"{base}_pruned"), np.ascontiguousarray(array))


class PruneChannelsPass(EdgecompPass):
    """Apply a structured pruning plan.

    Args:
        plan: the kept channels per atom and the edits they imply.
    """

    def __init__(self, *, plan: PrunePlan):
        self.plan = plan

    def options(self) -> dict[str, Any]:
        return {"groups pruned": sum(r["status"] == "pruned" for r in self.plan.rows)}

    def _planned(self) -> list:
        """The edits of the plan that cut something."""
        kept = self.plan.kept
        return [e for e in self.plan.analysis.edits if any(a in kept for a in e.layout.atoms())]

    def requires(self, model: ir.Model) -> None:
        """Every planned node is in ``model``: one node of its name, with its op."""
        found = _nodes_by_name(model)
        for e in self._planned():
            name = e.node.name
            got = found.get(name)
            if not got:
                raise ir.passes.PreconditionError(f"the plan edits node {name!r}, which this model does not have "
                                                  "(a plan from another model's analysis)")
            if len(got) > 1:
                raise ir.passes.PreconditionError(f"{len(got)} nodes of this model are named {name!r}: the plan "
                                                  "cannot tell which one it edits (name the nodes first)")
            if got[0].op_type != e.node.op_type:
                raise ir.passes.PreconditionError(f"the plan edits {e.node.op_type} {name!r}, but this model's node "
                                                  f"of that name is a {got[0].op_type}")

    def call(self, model: ir.Model) -> PassReport:
        an, kept = self.plan.analysis, self.plan.kept
        graph = model.graph
        names = NameAllocator(graph)
        changed = 0
        here = {name: nodes[0] for name, nodes in _nodes_by_name(model).items()}
        by_input: dict[tuple[ir.Node, int], list] = collections.defaultdict(list)
        for e in self._planned():
            by_input[(here[e.node.name], e.index)].append(e)
        sliced: dict[tuple, ir.Value] = {}  # a shared parameter cut the same way for two layers stays shared
        for (node, index), edits in by_input.items():
            if index < 0:  # an ints attribute (a Split's sizes, a Slice's bounds before opset 10)
                for e in edits:
                    ints = list(node.attributes[e.attr].as_ints())
                    ints[e.position] = len(e.layout.indices(kept, an.sizes)) * e.factor
                    node.attributes[e.attr] = ir.AttrInt64s(e.attr, ints)
                changed += 1
                continue
            for e in edits:
                if e.kind == "take":
                    self._take(graph, node, index, e.axis, e.layout.indices(kept, an.sizes), e.expand, names)
                    changed += 1
            value = node.inputs[index]
            params = [e for e in edits if e.kind == "param"]
            dims = [e for e in edits if e.kind == "dim"]
            if params:
                arr = const_array(value)
                if arr is None:
                    raise PassFailed(f"input {index} of {node.op_type} {node.name!r} ({value.name if value else None}) "
                                     "is not a constant; nothing was written (please report this)")
                key: tuple = (id(value),)
                for e in params:
                    idx = e.layout.indices(kept, an.sizes)
                    if len(idx) != arr.shape[e.axis]:
                        arr = np.take(arr, idx, axis=e.axis)
                        key += (e.axis, idx.tobytes())
                if key not in sliced:
                    sliced[key] = new_initializer(graph, value.name or node.name, arr, names)
                node.replace_input_with(index, sliced[key])
                changed += 1
            if dims:
                arr = const_array(value) if value is not None else None
                arr = np.array([0], np.int64) if arr is None else arr.astype(np.int64).copy()
                flat = arr.reshape(-1)
                for e in dims:
                    flat[e.position] = len(e.layout.indices(kept, an.sizes)) * e.factor
                node.replace_input_with(index, new_initializer(graph, value.name or node.name, flat.reshape(arr.shape), names))
                changed += 1
            for e in edits:
                if e.kind == "group":
                    width = len(e.layout.indices(kept, an.sizes))
                    node.attributes["group"] = ir.AttrInt64("group", width)
        self._update_shapes(model)
        if changed:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        pruned = [r for r in self.plan.rows if r["status"] == "pruned"]
        summary = {"groups pruned": len(pruned), "groups kept whole": len(self.plan.rows) - len(pruned),
                   "channels removed": sum(r["before"] - r["after"] for r in pruned if r["kind"] == "channels"),
                   "heads removed": sum(r["before"] - r["after"] for r in pruned if r["kind"] == "heads")}
        return self.report(model, bool(changed), summary, self.plan.rows)

    @staticmethod
    def _take(graph: ir.Graph, node: ir.Node, index: int, axis: int, idx: np.ndarray,
              expand: tuple[int, ...] | None, names: NameAllocator) -> None:
        """Read ``node.inputs[index]`` through Gather(idx, axis), after an Expand to ``expand``."""
        src = node.inputs[index]
        if expand is not None:
            shape = new_initializer(graph, f"{src.name}_expand_shape", np.array(expand, np.int64), names)
            ex = ir.node("Expand", [src, shape], name=names.unique(f"{node.name}/heads_expand"))
            graph.insert_before(node, ex)
            src = ex.outputs[0]
            src.name = names.unique(f"{node.name}/heads_expand_output")
        g = ir.node("Gather", [src, new_initializer(graph, f"{node.name}_heads_kept", idx, names)], {"axis": axis},
                    name=names.unique(f"{node.name}/heads_gather"))
        graph.insert_before(node, g)
        g.outputs[0].name = names.unique(f"{node.name}/heads_gather_output")
        node.replace_input_with(index, g.outputs[0])

    def _update_shapes(self, model: ir.Model) -> None:
        an, kept = self.plan.analysis, self.plan.kept
        outputs = set(model.graph.outputs)
        values = {o.name: o for n in model.graph for o in n.outputs}
        widths: dict[str, list] = {}
        for name, layout in an.values.items():
            v = values.get(name)
            if v is None or v in outputs or not any(a in kept for a in layout.atoms()):
                continue
            widths[name] = [int(layout.axis), layout.indices(kept, an.sizes).tolist()]
            if v.shape is None or layout.rank is None or len(v.shape) != layout.rank:
                v.shape = None
                continue
            dims = list(v.shape)
            dims[layout.axis] = len(layout.indices(kept, an.sizes))
            v.shape = ir.Shape(dims)
        # Which positions of the input model's value each cut value keeps: block-wise healing
        # (edgecomp.distill.blockwise) feeds a student block the teacher's value through them.
        model.metadata_props[KEPT_POSITIONS_KEY] = json.dumps(widths, separators=(",", ":"))
        head_atoms = [a for a, k in an.kinds.items() if k == "heads" and a in kept]
        if head_atoms:
            for name in an.head_values:
                v = values.get(name)
                if v is not None and v not in outputs:
                    v.shape = None


def _nodes_by_name(model: ir.Model) -> dict[str, list[ir.Node]]:
    """The nodes of every name, subgraphs included."""
    out: dict[str, list[ir.Node]] = collections.defaultdict(list)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        out[node.name].append(node)
    return out
