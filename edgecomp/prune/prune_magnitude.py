"""PruneMagnitudePass: unstructured magnitude pruning — zero the smallest weights.

Weights of Conv, MatMul and Gemm layers (constant, at least 2-D, float) are candidates, including
weights held in Constant nodes or read through Identity (lifted to initializers first) and layers
inside If/Loop subgraphs (their initializers or Constant nodes are rewritten in place); a model
with none is refused (``NothingToPrune``) rather than copied unchanged. With scope
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
from typing import Any, Callable, Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.errors import OptionError
from edgecomp.passes.base import EdgecompPass, PassReport

__all__ = ["PruneMagnitudePass", "NO_SPEEDUP_NOTE"]

NO_SPEEDUP_NOTE = ("unstructured sparsity: shapes are unchanged and onnxruntime on CPU runs dense kernels, "
                   "so there is no speed-up; only the compressed (zipped) size shrinks")


def _compressed(arr: np.ndarray) -> int:
    return len(zlib.compress(np.ascontiguousarray(arr).tobytes(), 6))


def _source(w: ir.Value | None) -> tuple[Any, ir.TensorProtocol | None]:
    """Where a weight's tensor lives — the initializer value, or the Constant node (inside a
    subgraph) producing it — and the tensor; (None, None) for a computed weight."""
    if w is None or w.is_graph_input():
        return None, None
    if w.const_value is not None:
        return w, w.const_value
    p = w.producer()
    if p is not None and p.op_type == "Constant" and p.domain in ("", "ai.onnx") and set(p.attributes) == {"value"}:
        return p, p.attributes["value"].as_tensor()
    return None, None


def _writer(source: Any, name: str | None) -> Callable[[np.ndarray], None]:
    def write(arr: np.ndarray) -> None:
        if isinstance(source, ir.Node):
            source.attributes["value"] = ir.AttrTensor("value", ir.tensor(arr, name=name))
        else:
            source.const_value = ir.tensor(arr, name=name)
    return write


class PruneMagnitudePass(EdgecompPass):
    """Zero the smallest-magnitude weights.

    Args:
        sparsity: fraction of weights set to zero, in (0, 1).
        scope: ``global`` (one threshold) or ``per-layer``.
        protect: regexes on node names whose weights stay dense.
    """

    def __init__(self, *, sparsity: float, scope: str = "global", protect: Sequence[str] = ()):
        if not 0.0 < sparsity < 1.0:
            raise OptionError("sparsity", f"must be strictly between 0 and 1, got {sparsity}")
        if scope not in ("global", "per-layer"):
            raise OptionError("scope", f"must be global or per-layer, got {scope!r}")
        self.sparsity = sparsity
        self.scope = scope
        self.protect = tuple(protect)

    def _weights(self, model: ir.Model) -> list[tuple[ir.Node, ir.Value, np.ndarray, Callable[[np.ndarray], None]]]:
        """(layer, weight value, array, writer) of every candidate, subgraphs (If/Loop) included."""
        patterns = [re.compile(p) for p in self.protect]
        hits = set()
        found, seen = [], set()
        skipped: dict[str, int] = {}  # why layers were passed over, for the nothing-to-prune line
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.inputs) < 2:
                continue
            w = node.inputs[1]
            source, tensor = _source(w)
            if source is not None and id(source) in seen:
                continue
            why = None
            if tensor is None:
                p = w.producer() if w is not None else None
                folded = p is not None and all(_source(v)[1] is not None for v in p.inputs if v is not None)
                why = "weights computed from constants (`edgecomp optimize` folds them)" if folded else "computed weights"
            elif len(tensor.shape) < 2:
                why = "weights of rank < 2"
            elif not tensor.dtype.is_floating_point():
                why = f"{tensor.dtype.name.lower()} weights"
            if why is not None:
                skipped[why] = skipped.get(why, 0) + 1
                continue
            matched = [p.pattern for p in patterns if p.search(node.name or "")]
            hits.update(matched)
            if matched:
                skipped["protected"] = skipped.get("protected", 0) + 1
            else:
                found.append((node, w, tensor.numpy(), _writer(source, w.name)))
                seen.add(id(source))
        missing = [p.pattern for p in patterns if p.pattern not in hits]
        if missing:
            raise OptionError("protect", f"{missing[0]!r} matches no layer with weights; check the node names")
        if not found:
            from edgecomp.errors import NothingToPrune

            why = ", ".join(f"{k}: {n} layer{'s' if n > 1 else ''}" for k, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
            raise NothingToPrune("nothing to prune: no Conv, MatMul or Gemm has a constant float weight to sparsify"
                                 + (f" ({why})" if why else "") + "; nothing was written")
        return found

    def call(self, model: ir.Model) -> PassReport:
        from edgecomp.prune.groups import lift_constants

        lift_constants(model)  # main-graph Constant-node and Identity-fed weights become plain initializers
        weights = self._weights(model)
        arrays = [arr for _, _, arr, _ in weights]
        if self.scope == "global" and arrays:
            mags = np.concatenate([np.abs(a).reshape(-1) for a in arrays])
            k = int(round(self.sparsity * mags.size))
            cut = np.partition(mags, k - 1)[k - 1] if k else -1.0
        rows = []
        total = zeros = bytes_before = bytes_after = 0
        for node, w, arr, write in weights:
            flat = np.abs(arr).reshape(-1)
            if self.scope == "per-layer":
                k = int(round(self.sparsity * flat.size))
                mask = np.ones(flat.size, bool)
                mask[np.argsort(flat, kind="stable")[:k]] = False  # exactly k, even with ties
            else:
                mask = flat > cut
            pruned = (arr.reshape(-1) * mask).reshape(arr.shape).astype(arr.dtype)
            write(pruned)
            before, after = _compressed(arr), _compressed(pruned)
            n_zero = int(pruned.size - np.count_nonzero(pruned))
            rows.append({"layer": node.name, "weight": w.name, "params": int(arr.size),
                         "sparsity": n_zero / arr.size, "zipped before": before, "zipped after": after})
            total, zeros = total + arr.size, zeros + n_zero
            bytes_before, bytes_after = bytes_before + before, bytes_after + after
        summary = {"layers": len(rows), "sparsity reached": zeros / total if total else 0.0,
                   "zipped weights before": bytes_before, "zipped weights after": bytes_after, "note": NO_SPEEDUP_NOTE}
        return self.report(model, bool(rows), summary, rows)
