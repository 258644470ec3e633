"""Accuracy-aware fallback: measure each layer's loss on eval data and keep the most sensitive
layers float until the whole model's loss is within the tolerance.

The loss is a mean over ``n`` eval samples, so it is an estimate: a tolerance met on 16 samples
need not hold on the next 150. :meth:`Evaluator.estimate` gives the loss with a one-sided 95%
upper bound (:class:`LossEstimate`); "met" is still decided on the measured loss, and
:meth:`LossEstimate.warning` says when the bound exceeds the tolerance or ``n`` is too small for
the bound itself to be trusted (:data:`MIN_EVAL_SAMPLES`).

- ``cosine`` and ``mae``: per-sample losses ``l_i`` (``1 − cos_i``, or the sample's mean absolute
  error), ``upper = mean(l) + t(0.95, n−1) · sd(l) / √n`` (Student t, sample sd with ``n − 1``).
- ``top1``: the fraction ``p = k/n`` of samples lost (top-1 differs from the float model's; with
  labels, the float model right and the candidate wrong), upper end of the Wilson score interval
  at one-sided 95% (``z = 1.645``)::

      upper = (p + z²/2n + z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n)

  With labels this bounds the rate of samples lost, ignoring those gained, so it is at least the
  bound of the net loss (conservative).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
import onnx_ir as ir

from edgecomp.data import check_label_range
from edgecomp.errors import DataError, InterfaceChanged, OptionError
from edgecomp.measure.interface import shape_difference
from edgecomp.quantize.options import METRICS
from edgecomp.quantize.plan import build
from edgecomp.quantize.quantize_static import LayerPlan
from edgecomp.runtime import make_session, run_feed

__all__ = ["MIN_EVAL_SAMPLES", "Evaluator", "FidelityEvaluator", "LossEstimate", "fit_tolerance", "loss_bound",
           "t_quantile", "wilson_upper"]

#: Below this many eval samples the loss bound is a warning on its own. Two reasons, one per kind of
#: metric: a top-1 count with no sample lost still has a 95% upper bound of about 3/n (the rule of
#: three), 3 accuracy points at n = 100 — the smallest tolerance one usually asks for; and
#: per-sample cosine losses are skewed (bounded by 0, long right tail), for which the t interval
#: reaches its nominal coverage only from n ≈ 25·skewness² (Cochran's rule), ~100 for a skewness of 2.
MIN_EVAL_SAMPLES = 100
CONFIDENCE = 0.95  # one-sided: the loss exceeds ``upper`` with probability at most 5%


@dataclasses.dataclass(frozen=True)
class LossEstimate:
    """The measured loss over ``n`` eval samples and its one-sided 95% upper bound."""

    metric: str
    n: int
    loss: float
    upper: float

    def text(self) -> str:
        return f"{self.loss:.4g} (95% upper bound {self.upper:.4g} on {self.n} eval samples)"

    def warning(self, tolerance: float) -> str | None:
        """One line when the bound exceeds ``tolerance`` or ``n`` is under :data:`MIN_EVAL_SAMPLES`; else None."""
        why = []
        if self.upper > tolerance:
            why.append(f"its 95% upper bound {self.upper:.4g} exceeds the tolerance {tolerance:g}")
        if self.n < MIN_EVAL_SAMPLES:
            why.append(f"only {self.n} eval samples (under {MIN_EVAL_SAMPLES}, the bound itself is rough)")
        if not why:
            return None
        return (f"the {self.metric} loss {self.loss:.4g} was measured on {self.n} eval samples and "
                f"{' and '.join(why)}: it may not hold on other data; give more --eval samples")


class Evaluator:
    """Scores a candidate against the float model's first output on evaluation feeds.

    ``runner(model, feeds)``, when given, computes the candidates' outputs (each sample's list of
    outputs) instead of the host's onnxruntime: an emulated target's
    (:class:`edgecomp.emulate.TargetRunner`), so the fallback keeps float what breaks there. The
    float reference always runs on the host.
    """

    def __init__(self, model: ir.Model, feeds: list, metric: str, labels: np.ndarray | None, threads: int,
                 runner=None):
        if metric not in METRICS:
            raise OptionError("metric", f"must be one of {', '.join(METRICS)}, got {metric!r}")
        if not feeds:
            raise DataError("the eval data holds no samples")
        self.feeds, self.metric, self.labels, self.threads, self.runner = feeds, metric, labels, threads, None
        self.ref = self._outputs(model)  # the float reference, on the host
        self.runner = runner
        if labels is not None:
            check_label_range(labels, int(np.prod(self.ref[0].shape[1:])), "labels")
        self.ref_score = self._score(self.ref)

    def _outputs(self, model: ir.Model) -> list[np.ndarray]:
        if self.runner is not None:
            return [o[0] for o in self.runner(model, self.feeds)]
        s = make_session(model, threads=self.threads)
        self.names = [s.get_outputs()[0].name]  # the metric reads the first output
        return [run_feed(s, f, self.names)[0] for f in self.feeds]

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

    def _checked(self, outs: list) -> list:
        """``outs`` once every array has the float model's shape (shapes before values): a
        candidate returning another shape computes something else, whatever its cosine."""
        def per_output(runs):
            return list(zip(*[r if isinstance(r, (list, tuple)) else [r] for r in runs]))

        names = getattr(self, "names", None) or [f"#{i}" for i in range(len(per_output(self.ref)))]
        diff = shape_difference(names, per_output(self.ref), per_output(outs), ("the float model", "the candidate"))
        if diff:
            raise InterfaceChanged(f"{diff}; the quantized model would compute something else, nothing was written "
                                   "(please report this)")
        return outs

    def drop(self, model: ir.Model) -> tuple[float, float]:
        """(score, loss vs fp32) — loss is 1-cos, accuracy points lost, or the MAE itself."""
        score = self._score(self._checked(self._outputs(model)))
        if self.metric == "mae":
            return score, score
        return score, self.ref_score - score

    def estimate(self, model: ir.Model) -> LossEstimate:
        """The loss of ``model`` (as :meth:`drop` measures it) with its upper bound (module docstring)."""
        outs = self._checked(self._outputs(model))
        loss = self._score(outs) if self.metric == "mae" else self.ref_score - self._score(outs)
        return loss_bound(self.metric, self._sample_losses(outs), loss)

    def _sample_losses(self, outs: list[np.ndarray]) -> np.ndarray:
        """Per-sample losses (cosine, mae) or 0/1 "lost" flags (top1) whose statistics bound the loss."""
        from edgecomp.measure.validate import cosine_rows

        if self.metric == "cosine":
            return 1.0 - np.concatenate([cosine_rows(r, o) for r, o in zip(self.ref, outs)])
        if self.metric == "mae":
            return np.array([np.abs(r - o).mean() for r, o in zip(self.ref, outs)], np.float64)
        pred = np.concatenate([o.reshape(o.shape[0], -1).argmax(1) for o in outs])
        ref = np.concatenate([r.reshape(r.shape[0], -1).argmax(1) for r in self.ref])
        if self.labels is None:
            return (pred != ref).astype(np.float64)
        labels = self.labels[: len(pred)]
        return ((ref == labels) & (pred != labels)).astype(np.float64)



class FidelityEvaluator(Evaluator):
    """Every float output of a candidate against the float model's: the score is the lowest mean
    cosine among the outputs (an output of under 8 values a sample, such as a probability, is
    compared over all samples together: one value's cosine is only its sign). The loss is
    1 - score; the float model scores 1."""

    def __init__(self, model: ir.Model, feeds: list, threads: int, runner=None):
        if not feeds:
            raise DataError("no samples for the fidelity check")
        self.feeds, self.metric, self.labels, self.threads, self.runner = feeds, "cosine", None, threads, None
        self.ref = self._outputs(model)  # the float reference, on the host
        self.runner = runner
        self.floats = [i for i, r in enumerate(self.ref[0]) if np.issubdtype(np.asarray(r).dtype, np.floating)]
        self.ref_score = 1.0

    def _outputs(self, model: ir.Model) -> list:
        if self.runner is not None:
            return self.runner(model, self.feeds)
        s = make_session(model, threads=self.threads)
        self.names = [o.name for o in s.get_outputs()]
        return [run_feed(s, f) for f in self.feeds]

    def _score(self, outs: list) -> float:
        scores = [_pooled_cosine([r[i] for r in self.ref], [o[i] for o in outs]) for i in self.floats]
        return min(scores, default=1.0)



def loss_bound(metric: str, samples: np.ndarray, loss: float) -> LossEstimate:
    """``loss`` with the one-sided 95% upper bound from per-sample losses (a t bound) or, for
    ``top1``, from 0/1 flags of samples lost (Wilson); see the module docstring."""
    x = np.asarray(samples, np.float64).ravel()
    n = int(x.size)
    if metric == "top1":
        upper = wilson_upper(round(x.sum()), n)
    elif n < 2:
        upper = math.inf
    else:
        upper = float(x.mean() + t_quantile(CONFIDENCE, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return LossEstimate(metric, n, float(loss), max(upper, float(loss)))


def wilson_upper(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """Upper end of the one-sided Wilson score interval of a proportion ``k/n``."""
    if n == 0:
        return 1.0
    z = NormalDist().inv_cdf(confidence)
    p = k / n
    return (p + z * z / (2 * n) + z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile (q ≥ 0.5) of Student's t with ``df`` degrees of freedom, to ~1e-12.

    P(T > t) = I_x(df/2, 1/2) / 2 with x = df / (df + t²); bisection on t (scipy is not a dependency).
    """
    tail = 1.0 - q
    lo, hi = 0.0, 1.0
    while _t_upper_tail(hi, df) > tail:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_upper_tail(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def _t_upper_tail(t: float, df: int) -> float:
    return 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b): its continued fraction, modified Lentz (Numerical Recipes 6.4)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side only
        return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b
    return front * _beta_fraction(a, b, x) / a


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300

    def clamp(v: float) -> float:
        return tiny if abs(v) < tiny else v

    c, d = 1.0, 1.0 / clamp(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / clamp(1.0 + num * d)
            c = clamp(1.0 + num / c)
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h



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
