"""PruneMagnitudePass: unstructured magnitude pruning — zero the smallest weights.

Weights of Conv, MatMul and Gemm layers (constant, at least 2-D) are candidates. With scope
``per-layer`` each weight loses its ``sparsity`` fraction of smallest ``|w|``; with ``global`` one
threshold ``t`` (the ``sparsity`` quantile of every candidate's ``|w|``) applies to all::

    w' = w · [|w| > t]

The tensor shapes stay the same, so the file is no smaller and onnxruntime on CPU runs the same
dense kernels: there is no speed-up. What shrinks is the compressed size (zeros deflate well),
which the report gives as ``zlib``-deflated weight bytes before and after.
"""

from __future__ import annotations

import re
import zlib
from typing import Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.errors import ConfigError
from edgecomp.passes.base import EdgecompPass, PassReport

__all__ = ["PruneMagnitudePass", "NO_SPEEDUP_NOTE"]

NO_SPEEDUP_NOTE = ("unstructured sparsity: shapes are unchanged and onnxruntime on CPU runs dense kernels, "
                   "so there is no speed-up; only the compressed (zipped) size shrinks")


def _compressed(arr: np.ndarray) -> int:
    return len(zlib.compress(np.ascontiguousarray(arr).tobytes(), 6))


class PruneMagnitudePass(EdgecompPass):
    """Zero the smallest-magnitude weights.

    Args:
        sparsity: fraction of weights set to zero, in (0, 1).
        scope: ``global`` (one threshold) or ``per-layer``.
        protect: regexes on node names whose weights stay dense.
    """

    def __init__(self, *, sparsity: float, scope: str = "global", protect: Sequence[str] = ()):
        if not 0.0 < sparsity < 1.0:
            raise ConfigError(f"--sparsity must be strictly between 0 and 1, got {sparsity}")
        if scope not in ("global", "per-layer"):
            raise ConfigError(f"--scope must be global or per-layer, got {scope!r}")
        self.sparsity = sparsity
        self.scope = scope
        self.protect = tuple(protect)

    def _weights(self, model: ir.Model) -> list[tuple[ir.Node, ir.Value]]:
        patterns = [re.compile(p) for p in self.protect]
        hits = set()
        found, seen = [], set()
        for node in model.graph:
            if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.inputs) < 2:
                continue
            w = node.inputs[1]
            if w is None or w.const_value is None or len(w.const_value.shape) < 2 or w.name in seen:
                continue
            if not w.const_value.dtype.is_floating_point():
                continue
            matched = [p.pattern for p in patterns if p.search(node.name or "")]
            hits.update(matched)
            if not matched:
                found.append((node, w))
                seen.add(w.name)
        missing = [p.pattern for p in patterns if p.pattern not in hits]
        if missing:
            raise ConfigError(f"--protect {missing[0]!r} matches no layer with weights; check the node names")
        return found

    def call(self, model: ir.Model) -> PassReport:
        weights = self._weights(model)
        arrays = [w.const_value.numpy() for _, w in weights]
        if self.scope == "global" and arrays:
            mags = np.concatenate([np.abs(a).reshape(-1) for a in arrays])
            k = int(round(self.sparsity * mags.size))
            cut = np.partition(mags, k - 1)[k - 1] if k else -1.0
        rows = []
        total = zeros = bytes_before = bytes_after = 0
        for (node, w), arr in zip(weights, arrays):
            flat = np.abs(arr).reshape(-1)
            if self.scope == "per-layer":
                k = int(round(self.sparsity * flat.size))
                mask = np.ones(flat.size, bool)
                mask[np.argsort(flat, kind="stable")[:k]] = False  # exactly k, even with ties
            else:
                mask = flat > cut
            pruned = (arr.reshape(-1) * mask).reshape(arr.shape).astype(arr.dtype)
            w.const_value = ir.tensor(pruned, name=w.name)
            before, after = _compressed(arr), _compressed(pruned)
            n_zero = int(pruned.size - np.count_nonzero(pruned))
            rows.append({"layer": node.name, "weight": w.name, "params": int(arr.size),
                         "sparsity": n_zero / arr.size, "zipped before": before, "zipped after": after})
            total, zeros = total + arr.size, zeros + n_zero
            bytes_before, bytes_after = bytes_before + before, bytes_after + after
        summary = {"layers": len(rows), "sparsity reached": zeros / total if total else 0.0,
                   "zipped weights before": bytes_before, "zipped weights after": bytes_after, "note": NO_SPEEDUP_NOTE}
        return self.report(model, bool(rows), summary, rows)
