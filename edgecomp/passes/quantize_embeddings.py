"""QuantizeEmbeddingsPass: store embedding tables row-wise in int8 or int4 and dequantize only
the gathered rows.

An embedding table is a constant float initializer [V, D] read by ``Gather(table, ids, axis=0)``
with integer ``ids`` computed at run time. Cases handled:

- ``bits=8``: symmetric int8 per row (or per block of ``block`` values of a row)::

      q[v, d] = round(T[v, d] / scale[v, b]),  scale[v, b] = max_{d in block b} |T[v, d]| / 127
      out = Cast(Gather(q, ids)) * Gather(scale, ids)            (blocks: reshaped to [.., D/B, B])

- ``bits=4``: asymmetric 4-bit per block (default 32 values), two values packed per byte::

      q = round((T - lo) / scale) in [0, 15],  scale = (hi - lo) / 15 per block
      out = (unpack(Gather(packed, ids)) * Gather(scale, ids)) + Gather(lo, ids)

  unpacking uses BitShift/BitwiseAnd on the gathered bytes only, so compute stays per token.

Tables below ``min_rows`` rows (position or token-type tables) are left alone. A table that
has uses other than Gather (tied to an output projection) is left whole and reported.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (not imported by onnx_ir itself)

from edgecomp.errors import PassFailed
from edgecomp.passes.base import EdgecompPass, PassReport

__all__ = ["QuantizeEmbeddingsPass", "find_embedding_tables", "quantize_rows"]


def find_embedding_tables(model: ir.Model, min_rows: int = 0) -> tuple[list[tuple[ir.Value, list[ir.Node]]], list[dict[str, Any]]]:
    """(table, gathers) for each embedding table, and rows for tables left alone with the reason."""
    found, skipped = [], []
    for value in model.graph.initializers.values():
        t = value.const_value
        if t is None or len(t.shape) != 2 or not t.dtype.is_floating_point():
            continue
        uses = list(value.uses())
        gathers = [u.node for u in uses if u.node.op_type == "Gather" and u.idx == 0
                   and u.node.domain in ("", "ai.onnx") and _axis(u.node) == 0 and u.node.inputs[1].const_value is None]
        if not gathers:
            continue
        rows, dim = t.shape.numpy()
        if len(gathers) != len(uses):
            others = sorted({u.node.op_type for u in uses if u.node not in gathers})
            skipped.append({"table": value.name, "rows": rows, "dim": dim, "decision": "left whole",
                            "reason": f"also used by {', '.join(others)} (tied table)"})
            continue
        if rows < min_rows:
            skipped.append({"table": value.name, "rows": rows, "dim": dim, "decision": "left whole",
                            "reason": f"fewer than {min_rows} rows"})
            continue
        found.append((value, gathers))
    return found, skipped


def _axis(node: ir.Node) -> int:
    a = node.attributes.get("axis")
    return a.as_int() if a is not None else 0


def quantize_rows(table: np.ndarray, bits: int, block: int | None) -> dict[str, np.ndarray]:
    """The stored arrays for ``table`` (see the module docstring); block None = whole row."""
    v, d = table.shape
    b = block or d
    if d % b:
        raise PassFailed(f"block {b} does not divide the embedding width {d}")
    t = table.astype(np.float32).reshape(v, d // b, b)
    if bits == 8:
        scale = np.abs(t).max(-1, keepdims=True) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.round(t / scale), -127, 127).astype(np.int8)
        return {"q": q.reshape(v, d), "scale": scale.reshape(v, d // b)}
    if bits == 4:
        if b % 2:
            raise PassFailed("int4 blocks must hold an even number of values")
        lo, hi = t.min(-1, keepdims=True), t.max(-1, keepdims=True)
        scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32)
        q = np.clip(np.round((t - lo) / scale), 0, 15).astype(np.uint8).reshape(v, d)
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
        return {"q": packed, "scale": scale.reshape(v, d // b), "lo": lo.astype(np.float32).reshape(v, d // b)}
    raise PassFailed(f"bits must be 8 or 4, got {bits}")


def dequantize_rows(stored: dict[str, np.ndarray], bits: int, block: int | None, dim: int) -> np.ndarray:
    """numpy reference of what the rewritten graph computes for every row."""
    v = stored["q"].shape[0]
    b = block or dim
    if bits == 8:
        return (stored["q"].reshape(v, dim // b, b) * stored["scale"][..., None]).reshape(v, dim)
    p = stored["q"]
    q = np.empty((v, dim), np.float32)
    q[:, 0::2], q[:, 1::2] = p & 0x0F, p >> 4
    return (q.reshape(v, dim // b, b) * stored["scale"][..., None] + stored["lo"][..., None]).reshape(v, dim)


class QuantizeEmbeddingsPass(EdgecompPass):
    """Row-wise int8 / blocked int4 embedding tables.

    Args:
        bits: 8 or 4.
        block: values per scale within a row (None: one scale per row for int8; int4 default 32).
        min_rows: leave smaller tables alone.
    """

    def __init__(self, *, bits: int = 8, block: int | None = None, min_rows: int = 1000):
        if bits not in (4, 8):
            raise PassFailed(f"--bits must be 8 or 4, got {bits}")
        self.bits = bits
        self.block = block if block is not None else (32 if bits == 4 else None)
        self.min_rows = min_rows

    def call(self, model: ir.Model) -> PassReport:
        tables, rows = find_embedding_tables(model, self.min_rows)
        for value, gathers in tables:
            table = value.const_value.numpy()
            v, d = table.shape
            stored = quantize_rows(table, self.bits, self.block)
            err = np.abs(dequantize_rows(stored, self.bits, self.block, d) - table)
            consts = {k: self._const(model, f"{value.name}_{k}", a) for k, a in stored.items()}
            for g in gathers:
                self._rewrite(model, g, consts, d)
            model.graph.initializers.pop(value.name)
            new_bytes = sum(a.nbytes for a in stored.values())
            rows.append({"table": value.name, "rows": v, "dim": d, "decision": f"int{self.bits}",
                         "reason": f"block {self.block or d}", "bytes before": table.nbytes, "bytes after": new_bytes,
                         "ratio": table.nbytes / new_bytes, "max abs err": float(err.max()),
                         "rel rms err": float(np.sqrt((err ** 2).mean() / max((table ** 2).mean(), 1e-30)))})
        if tables:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return self.report(model, bool(tables), {"tables": len(tables)}, rows)

    @staticmethod
    def _const(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
        v = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        model.graph.register_initializer(v)
        return v

    def _rewrite(self, model: ir.Model, gather: ir.Node, consts: dict[str, ir.Value], dim: int) -> None:
        g = _Emitter(model.graph, gather)
        ids = gather.inputs[1]
        block = self.block or dim
        rank = _rank(ids)
        blocked = block != dim
        if blocked and rank is None:
            raise PassFailed(f"cannot block-quantize {gather.name}: the rank of its indices is unknown")
        q = g.op("Gather", [consts["q"], ids], axis=0)
        if self.bits == 4:
            low = g.op("BitwiseAnd", [q, g.const(np.array(0x0F, np.uint8))])
            high = g.op("BitShift", [q, g.const(np.array(4, np.uint8))], direction="RIGHT")
            pair = g.op("Concat", [g.op("Unsqueeze", [low, g.const(np.array([-1]))]),
                                   g.op("Unsqueeze", [high, g.const(np.array([-1]))])], axis=-1)
            q = g.op("Reshape", [pair, g.const(np.array([0] * rank + [dim], np.int64))])
        x = g.op("Cast", [q], to=ir.DataType.FLOAT)
        scale = g.op("Gather", [consts["scale"], ids], axis=0)
        if blocked:
            x = g.op("Reshape", [x, g.const(np.array([0] * rank + [dim // block, block], np.int64))])
            scale = g.op("Unsqueeze", [scale, g.const(np.array([-1]))])
        y = g.op("Mul", [x, scale])
        if self.bits == 4:
            lo = g.op("Gather", [consts["lo"], ids], axis=0)
            if blocked:
                lo = g.op("Unsqueeze", [lo, g.const(np.array([-1]))])
            y = g.op("Add", [y, lo])
        if blocked:
            y = g.op("Reshape", [y, g.const(np.array([0] * rank + [dim], np.int64))])
        out = gather.outputs[0]
        name = out.name
        y.type, y.shape = out.type, out.shape
        out.replace_all_uses_with(y, replace_graph_outputs=True)
        model.graph.remove(gather, safe=True)
        y.name = name
        model.graph.sort()


def _rank(v: ir.Value) -> int | None:
    return len(v.shape) if v.shape is not None else None


class _Emitter:
    """Appends nodes right after ``anchor`` with names derived from it."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node):
        self.graph, self.anchor, self.n = graph, anchor, 0

    def _name(self, op: str) -> str:
        self.n += 1
        return f"{self.anchor.name}_{op}_{self.n}"

    def const(self, array: np.ndarray) -> ir.Value:
        name = self._name("const")
        v = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(v)
        return v

    def op(self, op_type: str, inputs, **attrs) -> ir.Value:
        name = self._name(op_type)
        node = ir.node(op_type, inputs, attributes=attrs or None, name=name, num_outputs=1)
        node.outputs[0].name = f"{name}_out"
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0]
