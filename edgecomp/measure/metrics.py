"""The losses a fidelity tolerance bounds, and how sure a measured loss is.

:data:`METRICS` names the losses (:class:`edgecomp.measure.evaluate.Evaluator` measures them):
``cosine`` is ``1 − mean cosine`` of the first output against the reference model's, ``top1`` the
top-1 accuracy lost (on labels, or agreement with the reference's top-1 without them), ``mae`` the
mean absolute error.

The loss is a mean over ``n`` eval samples, so it is an estimate: a tolerance met on 16 samples
need not hold on the next 150. :func:`loss_bound` gives the loss with a one-sided 95% upper bound
(:class:`LossEstimate`); "met" is still decided on the measured loss, and
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

Light on purpose (numpy and the standard library): option declarations read :data:`METRICS`.
"""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

import numpy as np

__all__ = ["METRICS", "MIN_EVAL_SAMPLES", "LossEstimate", "loss_bound", "t_quantile", "wilson_upper"]

METRICS = ("cosine", "top1", "mae")
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
