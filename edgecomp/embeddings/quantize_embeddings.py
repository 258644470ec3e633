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

  unpacking uses BitShift (left then right for the low half) on the gathered bytes only, so compute stays per token.

Scales (and ``lo``) are stored in ``scale_dtype``: float16 halves their share of an int4 table
(blocks of 64 with float16 scales: 7.1x smaller than float32). Tables below ``min_rows`` rows
(position or token-type tables) are left alone. A table tied to an output projection is left
whole and reported, or with ``tied=True`` the projection reads the whole table dequantized
(the file shrinks; the projection's compute is unchanged).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (not imported by onnx_ir itself)

from edgecomp.embeddings.tables import (
    EmbeddingTable,
    Emitter,
    find_embedding_tables,
    gather_rows,
    register_stored,
    replace_output,
)
from edgecomp.errors import OptionError
from edgecomp.passes.base import EdgecompPass, PassReport, one_line_failures

__all__ = ["QuantizeEmbeddingsPass", "find_embedding_tables", "quantize_rows", "dequantize_rows"]


def quantize_rows(table: np.ndarray, bits: int, block: int | None,
                  scale_dtype: str = "float32") -> dict[str, np.ndarray]:
    """The stored arrays for ``table`` (see the module docstring); block None = whole row."""
    v, d = table.shape
    b = block or d
    if d % b:
        raise OptionError("block", f"{b} does not divide the embedding width {d}; choose a divisor of {d}")
    t = table.astype(np.float32).reshape(v, d // b, b)
    if bits == 8:
        scale = np.abs(t).max(-1, keepdims=True) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(scale_dtype)
        q = np.clip(np.round(t / scale.astype(np.float32)), -127, 127).astype(np.int8)
        return {"q": q.reshape(v, d), "scale": scale.reshape(v, d // b)}
    if bits == 4:
        if b % 2:
            raise OptionError("block", f"{b} is odd; int4 blocks must hold an even number of values")
        lo, hi = t.min(-1, keepdims=True).astype(scale_dtype), t.max(-1, keepdims=True)
        scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(scale_dtype)
        q = np.clip(np.round((t - lo.astype(np.float32)) / scale.astype(np.float32)), 0, 15).astype(np.uint8).reshape(v, d)
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
        return {"q": packed, "scale": scale.reshape(v, d // b), "lo": lo.reshape(v, d // b)}
    raise OptionError("bits", f"must be 8 or 4, got {bits}")


def dequantize_rows(stored: dict[str, np.ndarray], bits: int, block: int | None, dim: int) -> np.ndarray:
    """numpy reference of what the rewritten graph computes for every row."""
    v = stored["q"].shape[0]
    b = block or dim
    scale = stored["scale"].astype(np.float32)[..., None]
    if bits == 8:
        return (stored["q"].reshape(v, dim // b, b) * scale).reshape(v, dim)
    p = stored["q"]
    q = np.empty((v, dim), np.float32)
    q[:, 0::2], q[:, 1::2] = p & 0x0F, p >> 4
    return (q.reshape(v, dim // b, b) * scale + stored["lo"].astype(np.float32)[..., None]).reshape(v, dim)


class QuantizeEmbeddingsPass(EdgecompPass):
    """Row-wise int8 / blocked int4 embedding tables.

    Args:
        bits: 8 or 4.
        block: values per scale within a row (None: one scale per row for int8; int4 default 32).
        min_rows: leave smaller tables alone.
        scale_dtype: "float32" or "float16" storage of the scales (and int4 offsets).
        tied: also rewrite tables tied to an output projection (it reads the dequantized table).
    """

    def __init__(self, *, bits: int = 8, block: int | None = None, min_rows: int = 1000,
                 scale_dtype: str = "float32", tied: bool = False):
        if bits not in (4, 8):
            raise OptionError("bits", f"must be 8 or 4, got {bits}")
        if scale_dtype not in ("float32", "float16"):
            raise OptionError("scale_dtype", f"must be float32 or float16, got {scale_dtype}")
        self.bits = bits
        self.block = block if block is not None else (32 if bits == 4 else None)
        self.min_rows = min_rows
        self.scale_dtype = scale_dtype
        self.tied = tied

    @one_line_failures
    def call(self, model: ir.Model) -> PassReport:
        tables, rows = find_embedding_tables(model, self.min_rows, tied=self.tied)
        for t in tables:
            table = t.array
            v, d = table.shape
            stored = quantize_rows(table, self.bits, self.block, self.scale_dtype)
            err = np.abs(dequantize_rows(stored, self.bits, self.block, d) - table)
            new_bytes = sum(a.nbytes for a in stored.values())
            self.rewrite(model, t, stored)
            rows.append(t.row(decision=f"int{self.bits}", reason=f"block {self.block or d}" + (", tied head" if t.heads else ""),
                              **{"bytes before": table.nbytes, "bytes after": new_bytes, "ratio": table.nbytes / new_bytes,
                                 "max abs err": float(err.max()),
                                 "rel rms err": float(np.sqrt((err ** 2).mean() / max((table ** 2).mean(), 1e-30)))}))
        if tables:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return self.report(model, bool(tables), {"tables": len(tables)}, rows)

    def rewrite(self, model: ir.Model, t: EmbeddingTable, stored: dict[str, np.ndarray]) -> None:
        """Replace ``t``'s uses by reads of ``stored`` (its Gathers, then its tied heads)."""
        dim = t.value.const_value.shape[1]
        name = t.value.name
        consts = register_stored(model, name, stored)
        for gather in t.gathers:
            y = gather_rows(Emitter(model.graph, gather), consts, gather.inputs[1], bits=self.bits, block=self.block,
                            dim=dim, dtype=t.value.const_value.dtype)
            replace_output(model, gather, y)
        for head in t.heads:
            full = gather_rows(Emitter(model.graph, head), consts, None, bits=self.bits, block=self.block, dim=dim,
                               dtype=t.value.const_value.dtype)
            head.replace_input_with(0 if head.op_type == "Transpose" else 1, full)
        model.graph.initializers.pop(name)
        model.graph.sort()

