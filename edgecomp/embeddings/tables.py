"""What the embedding passes share: finding tables (and the output projections tied to them),
emitting nodes next to an anchor, and reading stored (possibly quantized) rows back in the graph.

An embedding table is a constant float initializer [V, D] read by ``Gather(table, ids, axis=0)``
with integer ``ids`` computed at run time. Nodes emitted exist at the graph's declared opset
(Gather, Cast, Mul, Add, Concat, Shape, Reshape without ``allowzero``, Unsqueeze with ``axes``
as an input from opset 13 and as an attribute before, BitShift from opset 11). A table is
*tied* when it also feeds an output projection (an LM head) computing ``x @ table^T``, recognised in two forms:
``MatMul(x, Transpose(table, perm=[1, 0]))`` and ``Gemm(x, table, transB=1)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from edgecomp.errors import PassFailed
from edgecomp.graph import NameAllocator, add_initializer, attribute, rank_of

#: metadata key on initializers that hold scales/offsets of a reduced table
ROLE_KEY = "edgecomp.embedding_role"
#: On a vocabulary table: how many of its last rows ``--add-tokens`` appended (``--train-rows new`` trains them).
ADDED_ROWS_KEY = "edgecomp.added_rows"

__all__ = ["EmbeddingTable", "find_embedding_tables", "Emitter", "rank_of", "gather_rows", "register_const",
           "register_stored", "replace_output", "ROLE_KEY", "ADDED_ROWS_KEY"]


@dataclasses.dataclass
class EmbeddingTable:
    """A table, the Gathers that read it, and the head nodes (Transpose or Gemm) tied to it."""

    value: ir.Value
    gathers: list[ir.Node]
    heads: list[ir.Node] = dataclasses.field(default_factory=list)

    @property
    def array(self) -> np.ndarray:
        return self.value.const_value.numpy()

    def row(self, **extra: Any) -> dict[str, Any]:
        rows, dim = self.value.const_value.shape.numpy()
        return {"table": self.value.name, "rows": rows, "dim": dim, **extra}


def find_embedding_tables(model: ir.Model, min_rows: int = 0,
                          tied: bool = False) -> tuple[list[EmbeddingTable], list[dict[str, Any]]]:
    """The embedding tables of ``model``, and a row for each table left alone with the reason.

    With ``tied=False`` a table with any use besides Gather is left whole; with ``tied=True`` a
    table whose other uses are recognised output projections is returned with them as ``heads``.
    """
    found, skipped = [], []
    for value in model.graph.initializers.values():
        t = value.const_value
        if t is None or len(t.shape) != 2 or not t.dtype.is_floating_point() or ROLE_KEY in t.metadata_props:
            continue  # scales of an already reduced table are read by Gather too
        uses = list(value.uses())
        gathers = [u.node for u in uses if u.node.op_type == "Gather" and u.idx == 0 and _default_domain(u.node)
                   and attribute(u.node, "axis", 0) == 0 and u.node.inputs[1].const_value is None]
        if not gathers:
            continue
        rows, dim = t.shape.numpy()
        if value.is_graph_input():  # a default the caller may feed: reducing it would ignore what is fed
            skipped.append({"table": value.name, "rows": rows, "dim": dim, "decision": "left whole",
                            "reason": "a graph input (a default the caller may feed)"})
            continue
        others = [u for u in uses if u.node not in gathers]
        heads = [u.node for u in others if _is_head(u)]
        if others and (not tied or len(heads) != len(others)):
            names = sorted({u.node.op_type for u in others})
            why = "not as an output projection x @ table^T" if tied else "(tied table)"
            skipped.append({"table": value.name, "rows": rows, "dim": dim, "decision": "left whole",
                            "reason": f"also used by {', '.join(names)} {why}"})
            continue
        if rows < min_rows:
            skipped.append({"table": value.name, "rows": rows, "dim": dim, "decision": "left whole",
                            "reason": f"fewer than {min_rows} rows"})
            continue
        found.append(EmbeddingTable(value, gathers, heads))
    return found, skipped


def _default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _is_head(use) -> bool:
    node = use.node
    if not _default_domain(node) or use.idx != (0 if node.op_type == "Transpose" else 1):
        return False
    if node.op_type == "Gemm":
        return attribute(node, "transB", 0) == 1 and attribute(node, "transA", 0) == 0
    if node.op_type == "Transpose":
        perm = attribute(node, "perm")
        if perm is not None and list(perm) != [1, 0]:
            return False
        return all(u.node.op_type == "MatMul" and u.idx == 1 for u in node.outputs[0].uses())
    return False


def register_const(model: ir.Model, name: str, array: np.ndarray, role: str | None = None) -> ir.Value:
    return add_initializer(model.graph, name, array, {ROLE_KEY: role} if role else None)


def register_stored(model: ir.Model, prefix: str, stored: dict[str, np.ndarray]) -> dict[str, ir.Value]:
    """Initializers for what :func:`quantize_rows` stores; scales and offsets are tagged so that
    no later pass takes them for an embedding table."""
    return {k: register_const(model, f"{prefix}_{k}", a, role=k if k in ("scale", "lo") else None)
            for k, a in stored.items()}


def replace_output(model: ir.Model, node: ir.Node, y: ir.Value) -> None:
    """Make ``y`` take the place (uses, name, type) of ``node``'s output, and drop ``node``."""
    out = node.outputs[0]
    name = out.name
    y.type, y.shape = out.type, out.shape
    out.replace_all_uses_with(y, replace_graph_outputs=True)
    model.graph.remove(node, safe=True)
    y.name = name


class Emitter:
    """Inserts nodes right before ``anchor`` with names derived from it."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node):
        self.graph, self.anchor, self.n = graph, anchor, 0
        # passes run one after another on the same anchor: names must not repeat earlier ones
        self._names = NameAllocator(graph)

    def _name(self, op: str) -> str:
        """``{anchor}_{op}_{n}``, n counting up over this emitter's names past any already used."""
        while True:
            self.n += 1
            name = f"{self.anchor.name}_{op}_{self.n}"
            if self._names.claim(name):
                return name

    def const(self, array: np.ndarray) -> ir.Value:
        return add_initializer(self.graph, self._name("const"), array)

    def op(self, op_type: str, inputs, **attrs) -> ir.Value:
        name = self._name(op_type)
        node = ir.node(op_type, inputs, attributes=attrs or None, name=name, num_outputs=1)
        node.outputs[0].name = self._names.unique(f"{name}_out")
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0]

    @property
    def opset(self) -> int:
        """The default-domain opset of the graph (the newest when none is declared)."""
        imports = self.graph.opset_imports
        return int(imports.get("", imports.get("ai.onnx", onnx.defs.onnx_opset_version())))

    def unsqueeze_last(self, x: ir.Value) -> ir.Value:
        """``x[..., None]``: Unsqueeze's axes are an input from opset 13, an attribute before."""
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.const(np.array([-1], np.int64))])
        return self.op("Unsqueeze", [x], axes=[-1])


def gather_rows(g: Emitter, consts: dict[str, ir.Value], ids: ir.Value | None, *, bits: int | None,
                block: int | None, dim: int, dtype: ir.DataType = ir.DataType.FLOAT) -> ir.Value:
    """Emit the float rows ``ids`` of a stored table (``ids=None``: the whole table).

    ``consts`` holds ``table`` (float) or what :func:`quantize_rows` stores (``q``, ``scale``,
    and ``lo`` for 4 bits); only the gathered rows are unpacked and dequantized.
    """
    lead = 1 if ids is None else rank_of(ids)

    def take(c: ir.Value) -> ir.Value:
        return c if ids is None else g.op("Gather", [c, ids], axis=0)

    if bits is None:
        return take(consts["table"])
    b = block or dim
    blocked = b != dim

    def shape(*tail: int) -> ir.Value:  # ids.shape + tail (from Shape(ids) when the rank is unknown)
        if lead is not None:
            return g.const(np.array([0] * lead + list(tail), np.int64))
        return g.op("Concat", [g.op("Shape", [ids]), g.const(np.array(tail, np.int64))], axis=0)

    q = take(consts["q"])
    if bits == 4:
        if g.opset < 11:
            raise PassFailed(f"int4 tables unpack with BitShift, which needs opset 11; the model declares {g.opset}")
        four = g.const(np.array(4, np.uint8))  # BitShift (opset 11), not BitwiseAnd (opset 18)
        low = g.op("BitShift", [g.op("BitShift", [q, four], direction="LEFT"), four], direction="RIGHT")
        high = g.op("BitShift", [q, four], direction="RIGHT")
        pair = g.op("Concat", [g.unsqueeze_last(low), g.unsqueeze_last(high)], axis=-1)
        q = g.op("Reshape", [pair, shape(dim)])  # no allowzero (opset 14): the shape's 0s copy ids' dims
    x = g.op("Cast", [q], to=dtype)

    def side(name: str) -> ir.Value:
        s = take(consts[name])
        if consts[name].const_value.dtype != dtype:
            s = g.op("Cast", [s], to=dtype)
        return g.unsqueeze_last(s) if blocked else s

    if blocked:
        x = g.op("Reshape", [x, shape(dim // b, b)])
    y = g.op("Mul", [x, side("scale")])
    if bits == 4:
        y = g.op("Add", [y, side("lo")])
    if blocked:
        y = g.op("Reshape", [y, shape(dim)])
    return y
