"""Accuracy-aware fallback: measure each layer's loss on eval data and keep the most sensitive
layers float until the whole model's loss is within the tolerance.

The loss is measured by :class:`edgecomp.measure.evaluate.Evaluator` (its metrics and their 95%
upper bound: :mod:`edgecomp.measure.metrics`). Sensitivity of a layer is the loss with only that
layer quantized; float layers are added in order of sensitivity, doubling their count until the
tolerance is met, then bisecting to the fewest that meet it (about ``L + 2·log2(L)`` candidates
built and measured for ``L`` layers).
"""

from __future__ import annotations

import onnx_ir as ir

from edgecomp.measure.evaluate import Evaluator
from edgecomp.quantize.plan import build
from edgecomp.quantize.quantize_static import LayerPlan

__all__ = ["fit_tolerance"]


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
