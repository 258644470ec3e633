"""Accuracy-aware fallback: measure each layer's loss on eval data and keep the most sensitive
layers float until the whole model's loss is within the tolerance.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.data import check_label_range
from edgecomp.errors import DataError, OptionError
from edgecomp.quantize.options import METRICS
from edgecomp.quantize.plan import build
from edgecomp.quantize.quantize_static import LayerPlan
from edgecomp.runtime import make_session, run_feed

__all__ = ["Evaluator", "FidelityEvaluator", "fit_tolerance"]


class Evaluator:
    """Scores a candidate against the float model's first output on evaluation feeds."""

    def __init__(self, model: ir.Model, feeds: list, metric: str, labels: np.ndarray | None, threads: int):
        if metric not in METRICS:
            raise OptionError("metric", f"must be one of {', '.join(METRICS)}, got {metric!r}")
        if not feeds:
            raise DataError("the eval data holds no samples")
        self.feeds, self.metric, self.labels, self.threads = feeds, metric, labels, threads
        self.ref = self._outputs(model)
        if labels is not None:
            check_label_range(labels, int(np.prod(self.ref[0].shape[1:])), "labels")
        self.ref_score = self._score(self.ref)

    def _outputs(self, model: ir.Model) -> list[np.ndarray]:
        s = make_session(model, threads=self.threads)
        return [run_feed(s, f)[0] for f in self.feeds]

    def _score(self, outs: list[np.ndarray]) -> float:
        from edgecomp.measure.validate import cosine_rows

        if self.metric == "cosine":
            return float(np.mean(np.concatenate([cosine_rows(r, o) for r, o in zip(self.ref, outs)])))
        if self.metric == "mae":
            return float(np.mean([np.abs(r - o).mean() for r, o in zip(self.ref, outs)]))
        pred = np.concatenate([o.reshape(o.shape[0], -1).argmax(1) for o in outs])
        if self.labels is not None:
            return float(np.mean(pred == self.labels[: len(pred)]))
        ref = np.concatenate([r.reshape(r.shape[0], -1).argmax(1) for r in self.ref])
        return float(np.mean(pred == ref))

    def drop(self, model: ir.Model) -> tuple[float, float]:
        """(score, loss vs fp32) — loss is 1-cos, accuracy points lost, or the MAE itself."""
        score = self._score(self._outputs(model))
        if self.metric == "mae":
            return score, score
        return score, self.ref_score - score



class FidelityEvaluator(Evaluator):
    """Every float output of a candidate against the float model's: the score is the lowest mean
    cosine among the outputs (an output of under 8 values a sample, such as a probability, is
    compared over all samples together: one value's cosine is only its sign). The loss is
    1 - score; the float model scores 1."""

    def __init__(self, model: ir.Model, feeds: list, threads: int):
        if not feeds:
            raise DataError("no samples for the fidelity check")
        self.feeds, self.metric, self.labels, self.threads = feeds, "cosine", None, threads
        self.ref = self._outputs(model)
        self.floats = [i for i, r in enumerate(self.ref[0]) if np.issubdtype(np.asarray(r).dtype, np.floating)]
        self.ref_score = 1.0

    def _outputs(self, model: ir.Model) -> list:
        s = make_session(model, threads=self.threads)
        return [run_feed(s, f) for f in self.feeds]

    def _score(self, outs: list) -> float:
        scores = [_pooled_cosine([r[i] for r in self.ref], [o[i] for o in outs]) for i in self.floats]
        return min(scores, default=1.0)



def _pooled_cosine(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float:
    from edgecomp.measure.validate import cosine_rows

    r = [np.asarray(a, np.float64).reshape(1, -1) for a in ref]
    g = [np.asarray(a, np.float64).reshape(1, -1) for a in got]
    if r[0].size < 8:
        r, g = [np.concatenate(r, axis=1)], [np.concatenate(g, axis=1)]
    return float(np.mean([cosine_rows(a, b)[0] for a, b in zip(r, g)]))



def fit_tolerance(model: ir.Model, plan: dict[str, LayerPlan], evaluator: Evaluator, tolerance: float,
                  progress: bool = False, embeddings: bool = False, format: str = "contrib",
                  ) -> tuple[dict[str, LayerPlan], dict[str, float], list[str], bool, float]:
    """Keep the most sensitive layers float until the loss is within ``tolerance``.

    Returns (final plan, sensitivity per layer, layers kept float, met, final loss). Sensitivity
    is the loss with only that layer quantized. Float layers are added in order of sensitivity,
    doubling the count, then bisecting to the fewest that meet the tolerance. Every candidate is
    built in ``format``, the form that will be written.
    """
    from tqdm import tqdm

    _, loss = evaluator.drop(build(model, plan, embeddings, format))
    if loss <= tolerance:
        return plan, {}, [], True, loss
    sens = {}
    for name in tqdm(list(plan), desc="sensitivity", disable=None if progress else True, leave=False):
        sens[name] = evaluator.drop(build(model, {name: plan[name]}, format=format))[1]
    order = sorted(plan, key=lambda n: -sens[n])

    def trial(k: int) -> float:
        keep = set(order[:k])
        return evaluator.drop(build(model, {n: p for n, p in plan.items() if n not in keep}, embeddings, format))[1]

    losses = {0: loss}
    k = 1
    while k < len(order):
        losses[k] = trial(k)
        if losses[k] <= tolerance:
            break
        k *= 2
    else:
        k = len(order)
        losses[k] = trial(k)
    lo = max((j for j in losses if j < k), default=0)
    while k - lo > 1 and losses[k] <= tolerance:
        mid = (lo + k) // 2
        losses[mid] = trial(mid)
        if losses[mid] <= tolerance:
            k = mid
        else:
            lo = mid
    met_ks = [j for j, v in losses.items() if v <= tolerance]
    best_k = min(met_ks) if met_ks else min(losses, key=lambda j: losses[j])
    keep = order[:best_k]
    final = {n: p for n, p in plan.items() if n not in set(keep)}
    return final, sens, keep, bool(met_ks), losses[best_k]
