"""Graph helpers shared by every capability: constants, attributes, subgraphs, uses, fresh names,
a layer's weight and bias, op counts, name patterns, the default opset, a value's static dims,
rewiring a value's uses, and a topological sort that names a cycle.

One copy of each: a second one is a bug waiting to diverge.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from edgecomp.errors import PassFailed

__all__ = [
    "INT8_OPS",
    "MS_DOMAIN",
    "NameAllocator",
    "add_initializer",
    "attribute",
    "bias_add",
    "bias_slot",
    "const_array",
    "default_opset",
    "initializer_inputs_as_constants",
    "count_parameters",
    "histogram",
    "layer_bias",
    "layer_weight",
    "param_tensors",
    "rank_of",
    "replace_value",
    "single_use",
    "sort_graph",
    "static_dims",
    "subgraphs",
    "unique_name",
    "used_names",
]

MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops

#: ops that compute in int8 (onnxruntime's integer kernels), whatever form they come from
INT8_OPS = frozenset({"ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat",
                      "DynamicQuantizeMatMul", "QAttention", "QGemm"})


def const_array(value: ir.Value | None, *, graph_inputs: bool = False) -> np.ndarray | None:
    """A value's constant array: an initializer or a Constant node's output (not an initializer
    that is also a graph input, the caller may feed another value; with ``graph_inputs``, such an
    initializer gives its stored default too)."""
    if value is None or (value.is_graph_input() and not graph_inputs):
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    p = value.producer()
    if p is not None and p.op_type == "Constant" and p.domain in ("", "ai.onnx") and "value" in p.attributes:
        return p.attributes["value"].as_tensor().numpy()
    return None



def initializer_inputs_as_constants(model: ir.Model) -> int:
    """Before IR 4 every initializer had to be listed as a graph input, and onnxruntime treats
    them as constants (only from IR 4 on is such an input a default the caller may feed). Here
    they leave ``model.graph.inputs`` and the IR version becomes 4 (the same model: IR 4 lets an
    initializer stand alone), so no pass mistakes an old export's weights for overridable ones.
    Returns how many inputs were removed (0 for IR >= 4)."""
    if model.ir_version is None or model.ir_version >= 4:
        return 0
    kept = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    removed = len(model.graph.inputs) - len(kept)
    model.graph.inputs[:] = kept
    model.ir_version = 4
    return removed


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    graphs: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs.extend(attr.value)
    return graphs



def attribute(node: ir.Node, name: str, default: Any = None) -> Any:
    """The value of ``node``'s attribute ``name`` (an int, float, str, tuple of them, tensor or
    graph, as the attribute's type says), or ``default`` when the node does not set it."""
    a = node.attributes.get(name)
    return default if a is None else a.value



def single_use(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 and value not in value.graph.outputs else None



def used_names(graph: ir.Graph) -> set[str]:
    """Every name in use in ``graph`` and its subgraphs: values (inputs, initializers, node
    outputs) and nodes."""
    names = set(graph.initializers) | {v.name for v in graph.inputs if v.name}
    for node in graph.all_nodes():
        if node.name:
            names.add(node.name)
        names.update(o.name for o in node.outputs if o.name)
    return names


class NameAllocator:
    """Fresh names for one graph: not in use there (:func:`used_names`) and not handed out before.

    Value and node names are drawn from one pool, so a name given to a node is never given to a
    value too; the names an emitter reserves stay reserved across its calls."""

    def __init__(self, graph: ir.Graph):
        self._taken = used_names(graph)

    def __contains__(self, name: str) -> bool:
        return name in self._taken

    def claim(self, name: str) -> bool:
        """Reserve ``name`` if it is free; whether it was."""
        if name in self._taken:
            return False
        self._taken.add(name)
        return True

    def unique(self, base: str) -> str:
        """``base`` if free, else the first free of ``base_1``, ``base_2``, ...; reserved."""
        name, i = base, 0
        while not self.claim(name):
            i += 1
            name = f"{base}_{i}"
        return name


def unique_name(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first name not yet used in ``graph``."""
    return NameAllocator(graph).unique(base)


def add_initializer(graph: ir.Graph, name: str, array: Any, metadata: dict[str, str] | None = None) -> ir.Value:
    """Register ``array`` as an initializer named ``name`` (the caller picks a free name)."""
    # ir.tensor would first test the array against its runtime-checkable protocols (~0.4 ms a call,
    # 10 s of quantizing 5 k nodes); an ndarray ends up in this same constructor.
    t = ir.Tensor(array, name=name) if isinstance(array, np.ndarray) else ir.tensor(array, name=name)
    t.metadata_props.update(metadata or {})
    v = ir.Value(name=name, const_value=t)
    graph.register_initializer(v)
    return v


def rank_of(v: ir.Value) -> int | None:
    return len(v.shape) if v.shape is not None else None


def static_dims(value: ir.Value) -> list[int | None] | None:
    """A value's dims (None for a symbolic one), or None when its rank is unknown."""
    if value.shape is None:
        return None
    return [int(d) if isinstance(d, int) else None for d in value.shape]


def default_opset(model: ir.Model) -> int | None:
    """The model's ``ai.onnx`` opset version (imported as ``""`` or ``"ai.onnx"``); None when it has none."""
    for domain in ("", "ai.onnx"):
        if domain in model.opset_imports:
            return int(model.opset_imports[domain])
    return None


def replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Point every use of ``old`` at ``new`` (same tensor); a graph output keeps its name."""
    new.type, new.shape = old.type, old.shape
    if old.is_graph_output():
        name = old.name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        old.name = f"{name}__replaced"
        new.name = name
    else:
        old.replace_all_uses_with(new)


def sort_graph(graph: ir.Graph, what: str) -> None:
    """Topological sort; a cycle (a bug in the rewrite ``what`` names, e.g. "quantizing") is a
    one-line PassFailed naming a node on it."""
    try:
        graph.sort()
    except ValueError as e:
        on_cycle = _node_on_cycle(graph)
        raise PassFailed(f"{what} made the graph cyclic{f' (through {on_cycle})' if on_cycle else ''}: "
                         f"{e}; please report this model") from e


def _node_on_cycle(graph: ir.Graph) -> str | None:
    state: dict[int, int] = {}
    for start in graph:
        stack = [(start, iter(v.producer() for v in start.inputs if v is not None))]
        state[id(start)] = state.get(id(start), 0) or 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, False)
            if nxt is False:
                state[id(node)] = 2
                stack.pop()
            elif nxt is not None and nxt.graph is graph:
                st = state.get(id(nxt), 0)
                if st == 1:
                    return nxt.name
                if st == 0:
                    state[id(nxt)] = 1
                    stack.append((nxt, iter(v.producer() for v in nxt.inputs if v is not None)))
    return None


def histogram(model: ir.Model) -> dict[str, int]:
    """Op counts, ``domain.op`` for non-default domains."""
    counts: dict[str, int] = {}
    for node in model.graph:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def param_tensors(graph: ir.Graph):
    """Every initializer's tensor and every Constant node's tensor (subgraphs included)."""
    for v in graph.initializers.values():
        if v.const_value is not None:
            yield v.const_value
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.op_type == "Constant" and node.domain == "" and "value" in node.attributes:
            yield node.attributes["value"].as_tensor()


def count_parameters(model: ir.Model) -> int:
    """Elements of every initializer and Constant-node tensor, any dtype: what ``inspect`` counts."""
    return sum(int(np.prod(t.shape.numpy())) for t in param_tensors(model.graph))


# A layer: MatMul(x, W [K, N]) with an optional bias Add after it, Gemm(x, B, C), Conv(x, W, b).

def layer_weight(node: ir.Node, *, graph_inputs: bool = False) -> np.ndarray | None:
    """A MatMul/Gemm/Conv layer's weight as [K, N] (input features × outputs): MatMul's W, Gemm's
    B (transposed when ``transB``), a pointwise Conv's [N, K, 1, ...] as [K, N]; None when the
    weight is not a constant (``graph_inputs``: as :func:`const_array`). The dtype is the stored one."""
    w = const_array(node.inputs[1] if len(node.inputs) > 1 else None, graph_inputs=graph_inputs)
    if w is None:
        return None
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], w.shape[1]).T
    if node.op_type == "Gemm" and int(attribute(node, "transB", 0)):
        return w.T
    return w


def bias_add(node: ir.Node, *, graph_inputs: bool = False) -> ir.Node | None:
    """The Add of a constant bias (N values, the last dim N) that is the only use of a MatMul's
    output (not also a graph output), if any."""
    out = node.outputs[0]
    add = single_use(out)
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    w = const_array(node.inputs[1], graph_inputs=graph_inputs)
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    c = const_array(other, graph_inputs=graph_inputs)
    if w is None or w.ndim != 2 or c is None or c.ndim == 0:
        return None
    n = w.shape[1]
    return add if c.size == n and c.shape[-1] == n else None


def bias_slot(node: ir.Node, *, graph_inputs: bool = False) -> tuple[ir.Node, int] | None:
    """Where the layer's bias lives, as (node, input index): Conv/Gemm input 2 (present or not),
    a MatMul's :func:`bias_add` (None without one)."""
    if node.op_type in ("Conv", "Gemm"):
        return node, 2
    add = bias_add(node, graph_inputs=graph_inputs)
    if add is None:
        return None
    return add, 0 if add.inputs[1] is node.outputs[0] else 1


def layer_bias(node: ir.Node, n_out: int, *, graph_inputs: bool = False) -> np.ndarray | None:
    """The layer's bias broadcast to [n_out] (stored dtype), or None when it has none."""
    slot = bias_slot(node, graph_inputs=graph_inputs)
    if slot is None or slot[1] >= len(slot[0].inputs) or slot[0].inputs[slot[1]] is None:
        return None
    b = const_array(slot[0].inputs[slot[1]], graph_inputs=graph_inputs)
    return None if b is None else np.broadcast_to(b.reshape(-1), (n_out,)).copy()
