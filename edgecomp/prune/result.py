"""What structured and unstructured pruning return, and the checks and tables both the fixed cut
(:func:`edgecomp.prune.prune_model`) and the tolerance search (:mod:`edgecomp.prune.tolerance`) share:
the result's verification (:func:`verify_pruned`), the per-layer table (:func:`layer_table`), the
shape probe behind its MAC counts (:func:`probe_shapes`), and the one-line reason nothing was cut
(:func:`nothing_to_prune_message`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.data import input_specs
from edgecomp.errors import EdgecompError, PassFailed
from edgecomp.graph import const_array, layer_weight
from edgecomp.io import first_line
from edgecomp.prune.groups import PRUNABLE_OPS
from edgecomp.prune.options import PruneOptions
from edgecomp.prune.repair import bias_of

__all__ = ["PruneResult", "layer_table", "nothing_to_prune_message", "probe_shapes", "verify_pruned"]


@dataclasses.dataclass
class PruneResult:
    model: ir.Model
    groups: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    summary: dict[str, Any]
    fidelity: dict[str, Any] | None = None  # held_out_fidelity with data, else synthetic_fidelity
    warnings: list[str] = dataclasses.field(default_factory=list)  # one line each, for stderr
    met_tolerance: bool | None = None  # with a tolerance: whether the result is within it
    degraded: bool = False  # below the fidelity floor, written because allow_degraded (apply_floor)



def probe_shapes(model: ir.Model, feed: Mapping[str, np.ndarray] | None) -> dict[str, list[int]] | None:
    """Every value's shape on ``feed`` (synthesized when None), for the MAC counts; None when the
    model cannot be probed."""
    from edgecomp.data import synthesize_feed
    from edgecomp.measure.inspect import probe_shapes

    try:
        feed = dict(feed) if feed is not None else synthesize_feed(input_specs(model))
        shapes = probe_shapes(model, feed)
    except EdgecompError:  # MACs are informative only: a model we cannot probe (symbolic dims, no data) has none
        return None
    shapes.update({k: list(v.shape) for k, v in feed.items()})
    return shapes



def layer_table(before: ir.Model, after: ir.Model, sb, sa, repaired: list[dict[str, Any]],
                 unrepaired: str = "no data") -> list[dict[str, Any]]:
    """One row per layer whose weight changed: channels in/out, parameters and MACs before/after
    (``sb``/``sa``: :func:`probe_shapes` of each model), and the repair's outcome."""
    from edgecomp.measure.inspect import node_macs

    old = {n.name: n for n in before.graph if n.op_type in PRUNABLE_OPS}
    fits = {r["layer"]: r for r in repaired}
    rows = []
    for node in after.graph:
        ref = old.get(node.name)
        if ref is None or ref.op_type != node.op_type or len(node.inputs) < 2:  # unnamed nodes share the name ""
            continue
        if const_array(ref.inputs[1]) is None or const_array(node.inputs[1]) is None:
            continue
        w0, w1 = const_array(ref.inputs[1]), const_array(node.inputs[1])
        if w0.shape == w1.shape and node.name not in fits:
            continue
        k0, n0 = layer_weight(ref).shape if ref.op_type != "Conv" else (w0.shape[1], w0.shape[0])
        k1, n1 = layer_weight(node).shape if node.op_type != "Conv" else (w1.shape[1], w1.shape[0])
        b0, b1 = bias_of(ref, n0), bias_of(node, n1)
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
        raise PassFailed(f"the pruned model fails onnx.checker ({first_line(e)}); nothing was written") from e
    try:
        make_session(model, optimization="disable")
    except Exception as e:
        raise PassFailed(f"onnxruntime cannot load the pruned model ({first_line(e)}); nothing was written") from e



def _reason_key(status: str) -> str:
    """'kept whole: LSTM (lstm_1); graph output y' → 'LSTM' (the first reason, node names dropped)."""
    first = status.removeprefix("kept whole: ").split("; ")[0].rstrip(" …")
    return re.sub(r" \([^()]*\)", "", first).strip() or "kept whole"



def nothing_to_prune_message(rows: Sequence[Mapping[str, Any]], opts: PruneOptions, computed: int = 0,
                             subgraph_hint: str = "") -> str:
    """One line naming the commonest reasons every group was kept whole (``computed``: layers
    whose weight is computed, e.g. a Transpose of an initializer; ``subgraph_hint``: said when layers sit in subgraphs)."""
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
        hint = f"; at sparsity {opts.sparsity} the rounded channel counts keep every channel (raise sparsity or set round_to 1)"
    if "layers in subgraphs are not pruned" in text:
        hint += subgraph_hint
    return f"nothing to prune: every channel group is kept whole ({text}){hint}; nothing was written"
