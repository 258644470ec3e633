"""Importance scores per channel (magnitude, activation, OBS) and the plan of what each group keeps."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
import onnx_ir as ir

from edgecomp.data import Dataset
from edgecomp.errors import DataNeeded
from edgecomp.graph import const_array
from edgecomp.prune.analysis import Analysis, Edit, Layout
from edgecomp.prune.options import PruneOptions
from edgecomp.prune.samples import feature_rows, feeds

__all__ = ["PrunePlan", "plan_pruning", "channel_stats"]


@dataclasses.dataclass
class PrunePlan:
    """What to cut: kept channel indices per atom (atoms absent are kept whole)."""

    analysis: Analysis
    kept: dict[int, np.ndarray]
    rows: list[dict[str, Any]]
    importance: str



def _positions(layout: Layout, atom: int, sizes: Mapping[int, int]) -> np.ndarray:
    """[size, repeat] positions of ``atom``'s channels along the layout's axis."""
    offset = 0
    for a, rep in layout.parts:
        if a == atom:
            return offset + np.arange(sizes[a])[:, None] * rep + np.arange(rep)[None, :]
        offset += sizes[a] * rep
    raise KeyError(atom)



def _slice_norms(w: np.ndarray, axis: int, p: int) -> np.ndarray:
    flat = np.moveaxis(w.astype(np.float64), axis, 0).reshape(w.shape[axis], -1)
    return np.abs(flat).sum(1) if p == 1 else (flat ** 2).sum(1)



def _group_scores(an: Analysis, how: str, stats: Mapping[str, np.ndarray] | None,
                  sparsity: float = 1.0) -> dict[int, np.ndarray]:
    """Importance per channel of every group (root atom → scores)."""
    p = 1 if how == "l1" else 2
    mag: dict[int, np.ndarray] = {}
    act: dict[int, np.ndarray] = {}
    for e in an.edits:
        if e.kind != "param" or e.role not in ("out", "in", "dw"):
            continue
        w = const_array(e.node.inputs[e.index])
        if w is None:
            continue
        norms = _slice_norms(w, e.axis, p)
        x2 = stats.get(e.node.inputs[0].name) if (stats and e.role == "in") else None
        if x2 is not None and len(x2) == len(norms):
            contrib = np.sqrt(x2) * np.sqrt(_slice_norms(w, e.axis, 2))
        else:
            contrib = None
        for atom in e.layout.atoms():
            pos = _positions(e.layout, atom, an.sizes)
            if pos.max() >= len(norms):
                continue
            root = an.root(atom)
            mag.setdefault(root, np.zeros(an.sizes[atom]))
            mag[root] += norms[pos].sum(1)
            if contrib is not None:
                act.setdefault(root, np.zeros(an.sizes[atom]))
                act[root] += contrib[pos].sum(1)
    if p == 2:
        mag = {k: np.sqrt(v) for k, v in mag.items()}
    if how == "obs":
        act.update(_obs_scores(an, stats, sparsity))
    if how in ("activation", "obs"):
        return {k: act.get(k, v) for k, v in mag.items()}
    return mag



def _obs_scores(an: Analysis, stats: Mapping[str, np.ndarray], sparsity: float) -> dict[int, np.ndarray]:
    """Optimal Brain Surgeon order for groups read by exactly one MatMul/Gemm (e.g. FFN neurons).

    With ``H = E[x xᵀ]`` of the consumer's input and its weight rows ``W_j``, removing input ``j``
    and re-fitting the rest costs ``ΔE_j = ‖W_j‖² / [H⁻¹]_jj``. Inputs are removed greedily, the
    cheapest first, updating ``W`` and ``H⁻¹`` after each removal (the compensation that repair
    later re-fits exactly); a channel's score is the step at which it would be removed (those
    still in place after a little more than ``sparsity`` of the inputs are gone score highest).
    """
    readers: dict[int, list[Edit]] = {}
    for e in an.edits:
        if e.kind == "param" and e.role == "in":
            for atom in e.layout.atoms():
                readers.setdefault(an.root(atom), []).append(e)
    out = {}
    for root, edits in readers.items():
        if len(edits) != 1 or edits[0].node.op_type not in ("MatMul", "Gemm") or len(edits[0].layout.parts) != 1:
            continue
        e = edits[0]
        gram = stats.get("gram:" + e.node.inputs[0].name)
        w = const_array(e.node.inputs[e.index])
        atom, rep = e.layout.parts[0]
        if gram is None or w is None or rep != 1 or e.axis != 0 or w.shape[0] != an.sizes[atom] or gram.shape[0] != w.shape[0]:
            continue
        out[root] = _obs_order(gram, w.astype(np.float64), min(w.shape[0], int(w.shape[0] * sparsity) + 8))
    return out



def _obs_order(gram: np.ndarray, w: np.ndarray, steps: int) -> np.ndarray:
    k = gram.shape[0]
    hinv = np.linalg.inv(gram + np.eye(k) * max(1e-2 * float(np.mean(np.diag(gram))), 1e-12))
    w = w.copy()
    alive = np.ones(k, bool)
    score = np.full(k, float(k))
    for step in range(steps):
        d = np.diag(hinv)
        cost = np.where(alive, (w ** 2).sum(1) / np.maximum(d, 1e-30), np.inf)
        j = int(np.argmin(cost))
        score[j] = step
        alive[j] = False
        col = hinv[:, j].copy()
        w -= np.outer(col / hinv[j, j], w[j])
        hinv -= np.outer(col, hinv[j]) / hinv[j, j]
        hinv[j, :] = hinv[:, j] = 0.0
        hinv[j, j] = 1.0
        w[j] = 0.0
    return score



def _round_keep(keep: int, size: int, round_to: int) -> int:
    step = round_to or (8 if size >= 32 else 1)
    return max(1, min(size, int(np.ceil(keep / step) * step)))



def _n_keep(size: int, sparsity: float, round_to: int) -> int:
    return _round_keep(size - int(np.floor(size * sparsity + 1e-9)), size, round_to)



def plan_pruning(an: Analysis, opts: PruneOptions, stats: Mapping[str, np.ndarray] | None = None) -> PrunePlan:
    """Choose the channels to keep in every prunable group (see the module docstring)."""
    how = opts.importance
    if how == "auto":
        how = "activation" if stats else "l2"
    if how in ("activation", "obs") and not stats:
        raise DataNeeded("calibration", f"importance {how}", option="importance")
    scores = _group_scores(an, how, stats, opts.sparsity)
    groups = an.groups()
    rows, prunable = [], []
    for root, atoms in groups.items():
        kind = an.kinds[root]
        name = " + ".join(dict.fromkeys(an.names[a] for a in atoms[:3])) + (" …" if len(atoms) > 3 else "")
        row = {"group": name, "kind": kind, "layers": len(atoms), "before": an.sizes[root], "after": an.sizes[root],
               "threshold": None, "status": "kept whole"}
        rows.append(row)
        reasons = an.group_blocked(root, groups)
        if kind not in opts.kinds:
            row["status"] = f"kept whole: {kind} not selected (--kinds)"
        elif reasons:
            row["status"] = "kept whole: " + "; ".join(reasons[:2]) + (" …" if len(reasons) > 2 else "")
        elif root not in scores or an.sizes[root] < 2:
            row["status"] = "kept whole: no weights to rank"
        else:
            prunable.append((root, row))
    kept: dict[int, np.ndarray] = {}
    if opts.resolved_scope() == "global":
        normed = {r: scores[r] / max(scores[r].mean(), 1e-30) for r, _ in prunable}
        allv = np.concatenate(list(normed.values())) if normed else np.zeros(0)
        cut = np.quantile(allv, opts.sparsity) if len(allv) else 0.0
    for root, row in prunable:
        s, size = scores[root], an.sizes[root]
        order = np.argsort(-s, kind="stable")
        if opts.resolved_scope() == "global":
            keep = max(1, int((normed[root] > cut).sum()))
            keep = _round_keep(keep, size, opts.round_to)
        else:
            keep = _n_keep(size, opts.sparsity, opts.round_to)
        row["after"] = keep
        row["threshold"] = float(s[order[keep - 1]]) if keep < size else None
        row["status"] = "pruned" if keep < size else "kept whole: nothing below the threshold"
        if keep < size:
            idx = np.sort(order[:keep])
            for a in groups[root]:
                kept[a] = idx
    return PrunePlan(an, kept, rows, how)



def channel_stats(model: ir.Model, an: Analysis, data: Dataset, max_samples: int | None = None,
                  threads: int = 1, grams: bool = False, part: str = "all") -> dict[str, np.ndarray]:
    """``E[x_c²]`` per input feature of every consumer the analysis found, streamed over samples
    (``part`` as in :func:`_feeds`); with ``grams``, also ``E[x xᵀ]`` (under ``"gram:" + name``)
    for MatMul/Gemm consumers of up to 4096 features, which OBS importance needs."""
    from edgecomp.runtime import make_session, run_feed

    consumers = {e.node.inputs[0].name: e.node for e in an.edits if e.kind == "param" and e.role == "in"}
    if not consumers:
        return {}
    names = list(consumers)
    session = make_session(model, threads=threads, optimization="basic", extra_outputs=names)
    sums: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(names, 0)
    for feed in feeds(data, model, max_samples, part):
        for name, x in zip(names, run_feed(session, feed, names)):
            rows = feature_rows(np.asarray(x, np.float64), consumers[name], False)
            sums[name] = sums.get(name, 0) + (rows ** 2).sum(0)
            if grams and consumers[name].op_type in ("MatMul", "Gemm") and rows.shape[1] <= 4096:
                sums["gram:" + name] = sums.get("gram:" + name, 0) + rows.T @ rows
            counts[name] += rows.shape[0]
    return {k: v / max(counts[k.removeprefix("gram:")], 1) for k, v in sums.items()}
