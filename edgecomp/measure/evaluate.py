"""Scoring a candidate model against a reference on evaluation feeds: the loss a tolerance bounds.

- :class:`Evaluator` — the first output against the reference model's, by one of
  :data:`~edgecomp.measure.metrics.METRICS` (``1 − mean cosine``, top-1 accuracy lost, MAE), with
  :meth:`Evaluator.estimate` adding the loss's one-sided 95% upper bound
  (:func:`~edgecomp.measure.metrics.loss_bound`, the math in :mod:`edgecomp.measure.metrics`).
- :class:`FidelityEvaluator` — every float output: the score is the lowest mean cosine among them.

A candidate whose outputs have other shapes than the reference's computes something else, whatever
its cosine: :class:`~edgecomp.errors.InterfaceChanged`. Quantization's fallback
(:mod:`edgecomp.quantize.tolerance`) and pruning's search (:mod:`edgecomp.prune.tolerance`) both
measure with these.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.data import check_label_range
from edgecomp.errors import DataError, InterfaceChanged, OptionError
from edgecomp.measure.interface import shape_difference
from edgecomp.measure.metrics import METRICS, LossEstimate, loss_bound
from edgecomp.runtime import make_session, run_feed

__all__ = ["Evaluator", "FidelityEvaluator"]


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


def _pooled_cosine(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float:
    from edgecomp.measure.validate import cosine_rows

    r = [np.asarray(a, np.float64).reshape(1, -1) for a in ref]
    g = [np.asarray(a, np.float64).reshape(1, -1) for a in got]
    if r[0].size < 8:
        r, g = [np.concatenate(r, axis=1)], [np.concatenate(g, axis=1)]
    return float(np.mean([cosine_rows(a, b)[0] for a, b in zip(r, g)]))
