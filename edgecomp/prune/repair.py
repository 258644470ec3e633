"""Ridge least-squares repair of the layers whose inputs lost channels (math in :mod:`edgecomp.prune`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (not imported by onnx_ir itself)

from edgecomp.data import Dataset
from edgecomp.graph import NameAllocator, attribute, bias_slot, const_array, layer_bias, layer_weight
from edgecomp.prune.groups import PRUNABLE_OPS
from edgecomp.prune.importance import PrunePlan
from edgecomp.prune.options import HOLD_OUT_EVERY
from edgecomp.prune.samples import feature_rows, feeds, is_held, n_used

__all__ = ["bias_of", "repair"]


def _repairable(node: ir.Node) -> str | None:
    """Why a consumer cannot be re-fitted (None if it can)."""
    if node.op_type == "Conv":
        w = const_array(node.inputs[1])
        if any(k != 1 for k in w.shape[2:]):
            return f"{'x'.join(map(str, w.shape[2:]))} kernel (repair covers 1x1 convs and Linear layers)"
        if any(attribute(node, "pads", [0]) ) or int(attribute(node, "group", 1)) != 1:
            return "padded or grouped conv"
        if str(attribute(node, "auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
            return "auto_pad"
    if node.op_type == "Gemm" and (int(attribute(node, "transA", 0)) or float(attribute(node, "alpha", 1.0)) != 1.0
                                   or float(attribute(node, "beta", 1.0)) != 1.0):
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
    orig_nodes = {n.name: n for n in original.graph if n.op_type in PRUNABLE_OPS}
    here = {n.name: n for n in pruned.graph if n.op_type in PRUNABLE_OPS}  # the plan names its nodes (any copy's)
    outs = {e.node.name: e.layout.indices(kept, an.sizes) for e in an.edits
            if e.kind == "param" and e.role == "out" and any(a in kept for a in e.layout.atoms())}
    rows, targets = [], []
    for e in an.edits:
        if e.kind != "param" or e.role != "in" or not any(a in kept for a in e.layout.atoms()):
            continue
        node, ref = here.get(e.node.name), orig_nodes.get(e.node.name)
        if node is None:  # PruneChannelsPass.requires found every planned node: not reached
            rows.append({"layer": e.node.name, "repair": "skipped: not in the pruned model"})
            continue
        why = _repairable(node)
        if why is None and len({u.node.name for u in node.inputs[1].uses()}) > 1:
            why = "weight shared with another layer (one fit per call site would copy it)"
        if why is not None or ref is None:
            rows.append({"layer": node.name, "repair": f"skipped: {why or 'layer renamed'}"})
            continue
        n_out = layer_weight(ref).shape[1]
        targets.append((node, ref, e.layout.indices(kept, an.sizes), outs.get(node.name, np.arange(n_out))))
    if not targets:
        return rows
    from edgecomp.runtime import make_session

    # the original never changes: one session gives every target's unpruned input
    s_orig = make_session(original, threads=threads, optimization="basic",
                          extra_outputs=sorted({node.inputs[0].name for node, *_ in targets}))
    # one layer at a time, in graph order: each fit sees the inputs its repaired predecessors give it.
    # A session of the pruned model is made again only after a fit changed it (one exposing every
    # remaining input): a session per layer cost a whole-model serialization each, quadratic.
    # The Gram matrices of the next layers come from one pass over the data for as many layers as
    # _GRAM_BYTES holds (one run of each model a sample, not one per layer: that was quadratic too);
    # after an applied fit, those of the layers after it are computed again.
    names, s_new, grams = NameAllocator(pruned.graph), None, {}
    for k, (node, ref, in_idx, out_idx) in enumerate(targets):
        if s_new is None:
            s_new = make_session(pruned, threads=threads, optimization="basic",
                                 extra_outputs=sorted({t[0].inputs[0].name for t in targets[k:]}))
            grams = {}
        if k not in grams:
            chunk, size = [], 0
            for j in range(k, len(targets)):
                size += 48 * (layer_weight(targets[j][1]).shape[0] + 1) ** 2  # A, B, C (float64), fit and held out
                if chunk and size > _GRAM_BYTES:
                    break
                chunk.append(j)
            grams = dict(zip(chunk, _grams(s_orig, s_new, original, [targets[j][0] for j in chunk], data, max_samples)))
        fit, held = grams[k]
        rows.append(_refit(pruned, node, ref, in_idx, out_idx, fit, held, ridge, names))
        if rows[-1]["repair"] == "applied":
            s_new = None
    ir.passes.common.RemoveUnusedNodesPass()(pruned)
    return rows



_Grams = tuple  # (A, B, C, rows) with A = Σ X̃ᵀX̃, B = Σ X̃ᵀX, C = Σ XᵀX
_GRAM_BYTES = 2**28  # the Gram matrices computed in one pass over the data, at most



def _grams(s_orig, s_new, original: ir.Model, nodes: list[ir.Node], data: Dataset, max_samples: int | None
           ) -> list[tuple[_Grams, _Grams]]:
    """(A, B, C, rows) for each node's input (ones column appended), on the fitted and on the
    held-out samples; ``s_orig`` and ``s_new`` are sessions of the original and the pruned model
    that expose those inputs."""
    from edgecomp.runtime import run_feed

    wanted = sorted({node.inputs[0].name for node in nodes})
    accs = [{False: [0.0, 0.0, 0.0, 0], True: [0.0, 0.0, 0.0, 0]} for _ in nodes]
    n = n_used(data, max_samples)
    for i, feed in enumerate(feeds(data, original, max_samples)):
        xs = dict(zip(wanted, run_feed(s_orig, feed, wanted)))
        ys = dict(zip(wanted, run_feed(s_new, feed, wanted)))
        for node, acc in zip(nodes, accs):
            name = node.inputs[0].name
            x = feature_rows(np.asarray(xs[name], np.float64), node, True)
            y = feature_rows(np.asarray(ys[name], np.float64), node, True)
            x = np.hstack([x, np.ones((len(x), 1))])
            y = np.hstack([y, np.ones((len(y), 1))])
            g = acc[is_held(i, n)]
            g[0], g[1], g[2], g[3] = g[0] + y.T @ y, g[1] + y.T @ x, g[2] + x.T @ x, g[3] + len(x)
    return [(tuple(acc[False]), tuple(acc[True])) for acc in accs]



def bias_of(node: ir.Node, n_out: int) -> np.ndarray:
    """The layer's bias as float64 [n_out] (:func:`edgecomp.graph.layer_bias`), zeros without one."""
    b = layer_bias(node, n_out)
    return np.zeros(n_out) if b is None else b.astype(np.float64)



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
           fit: _Grams, held: _Grams, ridge: float, names: NameAllocator) -> dict[str, Any]:
    w_old = layer_weight(ref).astype(np.float64)
    target = np.vstack([w_old, bias_of(ref, w_old.shape[1])[None, :]])[:, out_idx]
    keep_rows = np.append(in_idx, w_old.shape[0])  # the bias row stays
    fit_bias = bias_slot(node) is not None
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
    _write_layer(pruned, node, v[:-1] if fit_bias else v, v[-1] if fit_bias else None, names)
    return row



def _write_layer(model: ir.Model, node: ir.Node, w: np.ndarray, bias: np.ndarray | None, names: NameAllocator) -> None:
    """Store a [K, N] weight (and bias) back in the layer's own layout."""
    from edgecomp.prune.prune_channels import new_initializer

    old = const_array(node.inputs[1])
    if node.op_type == "Conv":
        arr = w.T.reshape(old.shape)
    elif node.op_type == "Gemm" and int(attribute(node, "transB", 0)):
        arr = w.T
    else:
        arr = w
    node.replace_input_with(1, new_initializer(model.graph, node.inputs[1].name, arr.astype(old.dtype), names))
    if bias is None:
        return
    slot, idx = bias_slot(node)
    if idx >= len(slot.inputs):
        slot.resize_inputs(idx + 1)
    current = slot.inputs[idx]
    shape = const_array(current).shape if current is not None else (len(bias),)
    if current is not None and int(np.prod(shape)) != len(bias):
        shape = (len(bias),)
    slot.replace_input_with(idx, new_initializer(model.graph, (current.name if current is not None else node.name + "_bias"),
                                                 bias.reshape(shape).astype(old.dtype), names))
