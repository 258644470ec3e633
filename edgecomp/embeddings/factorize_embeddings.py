"""FactorizeEmbeddingsPass: store an embedding table as a low-rank product, optionally quantized.

A table ``E`` [V, D] becomes ``A`` [V, R] and ``B`` [R, D]; a Gather then reads
``Gather(A, ids) @ B`` (compute per token: R x D multiply-adds).

- Subspace: the top-R right singular vectors of ``W^(1/2) E`` with row weights
  ``w_v = (count_v + smoothing) ** power`` (``counts`` None: plain SVD, every row alike)::

      W^(1/2) E = U S Vt,   B = Vt[:R],   A = E B^T   (each row's best fit in the subspace)

  Count-weighted SVD (``power=1``) spends the subspace on frequent tokens and fails on rarer
  ones met in another domain; the square root with smoothing keeps most of the gain on
  frequent tokens without starving the rest.
- ``exact_rows=k``: the k most counted rows also store their residual
  ``E[v] - A[v] B`` (int8 when ``bits`` is set) in a small table read through an int32 map
  ``V -> {0: none, 1..k}``, so frequent tokens come back (nearly) exact::

      out = Gather(A, ids) @ B + Gather(residual, Gather(map, ids))

- ``bits=8|4``: A (and the residual) are stored as :func:`quantize_rows` stores them; the
  residual is computed against the dequantized A, so it corrects A's quantization error too.
- ``rank`` or ``energy``: R given, or the smallest R whose weighted retained energy
  ``sum_{i<R} S_i^2 / sum S_i^2`` reaches ``energy``.

A tied output projection ``x @ E^T`` becomes ``(x @ B^T) @ A^T`` (no exact rows there: a table
with ``exact_rows`` and a tied head is left whole, with the reason).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (not imported by onnx_ir itself)

from edgecomp.embeddings.quantize_embeddings import dequantize_rows, quantize_rows
from edgecomp.embeddings.tables import (
    EmbeddingTable,
    Emitter,
    find_embedding_tables,
    gather_rows,
    register_const,
    register_stored,
    replace_output,
)
from edgecomp.errors import OptionError
from edgecomp.passes.base import EdgecompPass, PassReport

__all__ = ["FactorizeEmbeddingsPass", "factorize", "row_weights"]


def row_weights(counts: np.ndarray | None, rows: int, power: float, smoothing: float) -> np.ndarray:
    if counts is None:
        return np.ones(rows, np.float64)
    return (np.asarray(counts, np.float64) + smoothing) ** power


def factorize(table: np.ndarray, weights: np.ndarray, rank: int | None = None,
              energy: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """(A [V, R], B [R, D], weighted retained energy) of ``table`` (see the module docstring)."""
    e = table.astype(np.float64)
    _, s, vt = np.linalg.svd(e * np.sqrt(weights)[:, None], full_matrices=False)
    cum = np.cumsum(s ** 2) / max(float((s ** 2).sum()), 1e-30)
    if rank is None:
        rank = int(np.searchsorted(cum, energy - 1e-12) + 1)
    b = vt[:rank]
    return (e @ b.T).astype(np.float32), b.astype(np.float32), float(cum[rank - 1])


class FactorizeEmbeddingsPass(EdgecompPass):
    """Low-rank (optionally corpus-weighted, quantized) embedding tables.

    Args:
        rank: R, below the table width; or
        energy: the weighted energy to retain, in (0, 1].
        counts: per-row token counts of the user's text (for the table whose rows they fit).
        power, smoothing: row weight ``(count + smoothing) ** power``.
        exact_rows: keep this many most-counted rows exact through a residual table.
        bits, block, scale_dtype: quantize A (and the residual) as QuantizeEmbeddingsPass does.
        min_rows: leave smaller tables alone.
        tied: also rewrite a tied output projection.
    """

    def __init__(self, *, rank: int | None = None, energy: float | None = None, counts: np.ndarray | None = None,
                 power: float = 0.5, smoothing: float = 1.0, exact_rows: int = 0, bits: int | None = None,
                 block: int | None = None, scale_dtype: str = "float32", min_rows: int = 1000, tied: bool = True):
        if rank is not None and energy is not None:
            raise OptionError("energy", "replaces rank; give one of them")
        if rank is None and energy is None:
            raise OptionError("rank", "or energy must be set (one of them)")
        if rank is not None and rank < 1:
            raise OptionError("rank", f"must be at least 1, got {rank}")
        if energy is not None and not 0 < energy <= 1:
            raise OptionError("energy", f"must be in (0, 1], e.g. 0.99; got {energy}")
        if bits not in (None, 4, 8):
            raise OptionError("bits", f"must be 8 or 4, got {bits}")
        self.rank, self.energy, self.power, self.smoothing = rank, energy, power, smoothing
        self.exact_rows, self.bits, self.block, self.scale_dtype = exact_rows, bits, block, scale_dtype
        self.min_rows, self.tied = min_rows, tied
        self.corpus_weighted = counts is not None
        self._counts = counts

    def call(self, model: ir.Model) -> PassReport:
        tables, rows = find_embedding_tables(model, self.min_rows, tied=self.tied)
        done = []
        for t in tables:
            v, d = t.value.const_value.shape.numpy()
            if self.rank is not None and self.rank >= min(v, d):
                raise OptionError("rank", f"{self.rank} does not reduce {t.value.name} ({v}x{d}); "
                                          f"choose a rank below {min(v, d)}")
            counts = self._counts if self._counts is not None and len(self._counts) == v else None
            exact = self.exact_rows if counts is not None else 0
            if exact and t.heads:
                rows.append(t.row(decision="left whole", reason="exact rows cannot be kept in a tied output "
                                                                "projection; use --exact-rows 0 for tied tables"))
                continue
            rows.append(self._factorize(model, t, counts, exact))
            done.append(t)
        if done:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return self.report(model, bool(done), {"tables": len(done)}, rows)

    def _factorize(self, model: ir.Model, t: EmbeddingTable, counts: np.ndarray | None, exact: int) -> dict[str, Any]:
        table = t.array
        v, d = table.shape
        w = row_weights(counts, v, self.power, self.smoothing)
        a, b, weighted_energy = factorize(table, w, self.rank, self.energy)
        r = b.shape[0]
        block = self.block if self.bits != 4 else (self.block or min(32, r))
        stored_a = quantize_rows(a, self.bits, block, self.scale_dtype) if self.bits else {"table": a}
        a_hat = dequantize_rows(stored_a, self.bits, block, r) if self.bits else a
        recon = a_hat @ b
        stored_res, head = {}, np.zeros(0, np.int64)
        if exact:
            head = np.argsort(-counts, kind="stable")[:exact]
            head = head[counts[head] > 0]
            res = np.zeros((len(head) + 1, d), np.float32)
            res[1:] = table[head] - recon[head]
            stored_res = quantize_rows(res, 8, None) if self.bits else {"table": res}
            recon[head] += (dequantize_rows(stored_res, 8, None, d) if self.bits else res)[1:]
        self._rewrite(model, t, stored_a, block, b, stored_res, head)
        err = recon - table
        cos = (recon * table).sum(1) / np.maximum(np.linalg.norm(recon, axis=1) * np.linalg.norm(table, axis=1), 1e-30)
        stored = [*stored_a.values(), b, *stored_res.values()] + ([np.zeros(v, np.int32)] if len(head) else [])
        new_bytes = sum(x.nbytes for x in stored)
        out = t.row(decision=f"rank {r}" + (f" + int{self.bits}" if self.bits else ""),
                    reason=("count-weighted" if counts is not None else "plain SVD") +
                           (f", {len(head)} exact rows" if len(head) else "") + (", tied head" if t.heads else ""))
        out.update({"rank": r, "retained energy": float((a ** 2).sum() / max((table ** 2).sum(), 1e-30)),
                    "weighted energy": weighted_energy,
                    "rel rms err": float(np.sqrt((err ** 2).mean() / max((table ** 2).mean(), 1e-30))),
                    "mean row cos": float(cos.mean()), "bytes before": table.nbytes, "bytes after": new_bytes,
                    "ratio": table.nbytes / new_bytes})
        if counts is not None:
            out["count-weighted row cos"] = float((cos * counts).sum() / max(counts.sum(), 1))
        return out

    def _rewrite(self, model: ir.Model, t: EmbeddingTable, stored_a: dict[str, np.ndarray], block: int | None,
                 b: np.ndarray, stored_res: dict[str, np.ndarray], head: np.ndarray) -> None:
        name = t.value.name
        dtype = t.value.const_value.dtype
        v, d = t.value.const_value.shape.numpy()
        r = b.shape[0]
        a_consts = register_stored(model, f"{name}_A", stored_a)
        b_const = register_const(model, f"{name}_B", b)
        res_bits = 8 if self.bits else None
        if len(head):
            res_consts = register_stored(model, f"{name}_exact", stored_res)
            index = np.zeros(v, np.int32)
            index[head] = np.arange(1, len(head) + 1, dtype=np.int32)
            map_const = register_const(model, f"{name}_exact_map", index)
        for gather in t.gathers:
            g = Emitter(model.graph, gather)
            ids = gather.inputs[1]
            low = gather_rows(g, a_consts, ids, bits=self.bits, block=block, dim=r, dtype=dtype)
            y = g.op("MatMul", [low, b_const])
            if len(head):
                slot = g.op("Gather", [map_const, ids], axis=0)
                slot.shape = ids.shape
                y = g.op("Add", [y, gather_rows(g, res_consts, slot, bits=res_bits, block=None, dim=d, dtype=dtype)])
            replace_output(model, gather, y)
        if t.heads:
            bt = register_const(model, f"{name}_Bt", np.ascontiguousarray(b.T))
        for node in t.heads:
            g = Emitter(model.graph, node)
            full_a = gather_rows(g, a_consts, None, bits=self.bits, block=block, dim=r, dtype=dtype)
            if node.op_type == "Gemm":
                node.replace_input_with(0, g.op("MatMul", [node.inputs[0], bt]))
                node.replace_input_with(1, full_a)
                continue
            node.replace_input_with(0, full_a)
            for use in list(node.outputs[0].uses()):
                mm = use.node
                mm.replace_input_with(0, Emitter(model.graph, mm).op("MatMul", [mm.inputs[0], bt]))
        model.graph.initializers.pop(name)
        model.graph.sort()
