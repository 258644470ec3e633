"""Streaming activation statistics and the activation ranges computed from them.

Two passes over the calibration samples, each streaming one sample at a time (memory is bounded
whatever the number of samples and whatever their shapes — variable sequence lengths included):

1. ranges: global min/max, per-channel min/max, and a reservoir of up to ``reservoir`` channel
   rows (uniform over all rows seen) used later to simulate layer errors;
2. histograms (only for percentile / entropy / mse): a fixed-range histogram over pass 1's
   [min, max] of the activation *after* any smoothing division, so the range chosen is the range
   of what is actually quantized.

Range methods, for an asymmetric uint8 grid of 256 levels:

- ``minmax``: [min, max];
- ``percentile``: the ``p``-th and ``(100-p)``-th percentiles;
- ``entropy``: the clipping range whose 256-level quantized histogram has the least KL divergence
  from the full histogram (TensorRT's method, with both ends shrunk toward 0);
- ``mse``: the clipping range minimizing expected squared error: rounding noise Δ²/12 for values
  inside the range plus (x - clip)² for values outside.

Every range is widened to include 0 so that zero (padding) is exact.
"""


from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.data import Dataset, input_specs
from edgecomp.errors import DataError
from edgecomp.quantize.layers import Layer
from edgecomp.quantize.options import METHODS, QuantizeOptions
from edgecomp.runtime import make_session

__all__ = ["calibrate", "METHODS", "ActivationStats", "collect_ranges", "collect_histograms", "choose_range"]


def sessions_for(model: ir.Model, threads: int) -> Callable[[Sequence[str]], Any]:
    return lambda names: make_session(model, threads=threads, optimization="basic", extra_outputs=names)



def calibration_feeds(ds: Dataset, specs, limit: int | None) -> list:
    class _Limited:
        def __len__(self):
            return min(len(ds), limit) if limit else len(ds)

        def __iter__(self):
            return ds.feeds_for(specs, limit)

    return _Limited()



def calibrate(model: ir.Model, layers: Sequence[Layer], data: Dataset, opts: QuantizeOptions) -> dict[str, ActivationStats]:
    """Pass 1 statistics of every layer input (and conv output).

    Only a MatMul/Gemm input needs per-channel statistics (SmoothQuant, simulated error), over its
    last axis (K, fixed by the weight). Conv and Add tensors get one range per tensor, so no
    statistic depends on an axis that varies between samples (sequence length, image size) — a
    tensor read by both kinds of layer gets the MatMul's per-channel statistics."""
    axes: dict[str, int | None] = {}
    for layer in layers:
        if layer.family == "matmul":
            axes[layer.act] = -1
        else:
            axes.setdefault(layer.act, None)
        for other in (layer.out_value, layer.act_b):
            if other:
                axes.setdefault(other, None)
    return collect_ranges(sessions_for(model, opts.threads), axes, calibration_feeds(data, input_specs(model), opts.max_samples),
                          reservoir=opts.reservoir, progress="calibrating" if opts.progress else None)







HIST_BINS = 2048



@dataclasses.dataclass
class ActivationStats:
    """What calibration saw of one activation tensor; ``axis`` is its channel axis, or None for a
    tensor that needs only its overall range (no per-channel min/max, no reservoir rows).

    Per-channel statistics need a channel axis whose size is the same in every sample (a MatMul
    input's last axis, K): an axis that varies (sequence length) is refused with one line."""

    name: str
    axis: int | None
    min: float = np.inf
    max: float = -np.inf
    ch_min: np.ndarray | None = None
    ch_max: np.ndarray | None = None
    rows: np.ndarray | None = None
    rows_seen: int = 0
    hist: np.ndarray | None = None
    hist_lo: float = 0.0
    hist_hi: float = 0.0
    divisor: np.ndarray | None = None  # the smoothing divisor the histogram was taken after

    @property
    def ch_absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.ch_min), np.abs(self.ch_max))

    def channel_rows(self, x: np.ndarray) -> np.ndarray:
        if self.axis is None:
            return x.reshape(-1, 1)
        return np.moveaxis(x, self.axis, -1).reshape(-1, x.shape[self.axis])

    def update_ranges(self, x: np.ndarray, reservoir: int, rng: np.random.Generator) -> None:
        if x.size == 0:
            return
        if self.axis is None:
            x = x.astype(np.float32, copy=False)
            lo, hi = float(x.min()), float(x.max())
            self.min, self.max = min(self.min, lo), max(self.max, hi)
            self.ch_min = np.array([self.min], np.float32)
            self.ch_max = np.array([self.max], np.float32)
            self.rows_seen += x.size
            return
        if x.ndim == 0:
            raise DataError(f"activation {self.name!r} is a scalar; it has no channel axis")
        rows = self.channel_rows(x.astype(np.float32, copy=False))
        self.min = min(self.min, float(rows.min()))
        self.max = max(self.max, float(rows.max()))
        lo, hi = rows.min(0), rows.max(0)
        if self.ch_min is None:
            self.ch_min, self.ch_max = lo, hi
        elif self.ch_min.shape != lo.shape:
            raise DataError(f"activation {self.name!r} changed channel count between samples "
                            f"({self.ch_min.shape[0]} vs {lo.shape[0]} along axis {self.axis}); per-channel "
                            "statistics need an axis of fixed size")
        else:
            self.ch_min, self.ch_max = np.minimum(self.ch_min, lo), np.maximum(self.ch_max, hi)
        self._reservoir_add(rows, reservoir, rng)

    def _reservoir_add(self, rows: np.ndarray, k: int, rng: np.random.Generator) -> None:
        """Algorithm R over rows, vectorized per sample: every row seen is kept with prob k/seen."""
        if k <= 0:
            return
        n = rows.shape[0]
        if self.rows is None:
            self.rows = np.empty((0, rows.shape[1]), np.float32)
        fill = min(n, k - self.rows.shape[0])
        if fill > 0:
            self.rows = np.concatenate([self.rows, rows[:fill]])
        idx = np.arange(self.rows_seen + fill, self.rows_seen + n) + 1  # 1-based position of each later row
        slots = (rng.random(idx.shape[0]) * idx).astype(np.int64)
        keep = slots < k
        self.rows[slots[keep]] = rows[fill:][keep]
        self.rows_seen += n

    def update_hist(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        if self.divisor is not None:
            x = self.channel_rows(x) / self.divisor
        h, _ = np.histogram(x, bins=HIST_BINS, range=(self.hist_lo, self.hist_hi))
        self.hist += h



def _run_activations(session_factory, names: Sequence[str], feeds: Iterable[Mapping[str, np.ndarray]], progress: str | None):
    from tqdm import tqdm

    session = session_factory(names)
    out_names = [o.name for o in session.get_outputs()]
    idx = [out_names.index(n) for n in names]
    total = len(feeds) if hasattr(feeds, "__len__") else None
    # disable=None: no bar when stderr is not a terminal (CI logs, captured output)
    for feed in tqdm(feeds, total=total, desc=progress, disable=None if progress else True, leave=False, unit="sample"):
        outs = session.run(None, dict(feed))
        yield {n: outs[i] for n, i in zip(names, idx)}



def collect_ranges(session_factory, axes: Mapping[str, int], feeds, reservoir: int = 512, seed: int = 0,
                   progress: str | None = None) -> dict[str, ActivationStats]:
    """Pass 1. ``session_factory(names)`` returns an onnxruntime session exposing ``names``."""
    stats = {n: ActivationStats(n, a) for n, a in axes.items()}
    rng = np.random.default_rng(seed)
    count = 0
    for values in _run_activations(session_factory, list(axes), feeds, progress):
        count += 1
        for n, x in values.items():
            if x.dtype.kind == "f" and not np.isfinite(x).all():  # no range, no scale: say so before any math
                raise DataError(f"the float model computes NaN or Inf at {n!r} on calibration sample {count} (of the "
                                "samples used): it overflows on this data; check the inputs' scale or the model")
            stats[n].update_ranges(x, reservoir, rng)
    if count == 0:
        raise DataError("no calibration samples: give DATA with at least one sample")
    return stats



def collect_histograms(session_factory, stats: Mapping[str, ActivationStats], feeds,
                       divisors: Mapping[str, np.ndarray] | None = None, progress: str | None = None) -> None:
    """Pass 2: fill ``stats[n].hist`` over the (divided) range found in pass 1."""
    divisors = divisors or {}
    for n, s in stats.items():
        s.divisor = divisors.get(n)
        lo, hi = s.min, s.max
        if s.divisor is not None:
            lo, hi = float((s.ch_min / s.divisor).min()), float((s.ch_max / s.divisor).max())
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if hi - lo < 1e-12:
            hi = lo + 1e-6
        s.hist_lo, s.hist_hi = lo, hi
        s.hist = np.zeros(HIST_BINS, np.int64)
    for values in _run_activations(session_factory, list(stats), feeds, progress):
        for n, x in values.items():
            stats[n].update_hist(x)



def choose_range(s: ActivationStats, method: str = "minmax", percentile: float = 99.99,
                 divisor: np.ndarray | None = None) -> tuple[float, float]:
    """The clipping range of ``s`` (after dividing channels by ``divisor``) by ``method``."""
    if method not in METHODS:
        raise DataError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}")
    if divisor is not None:
        lo, hi = float((s.ch_min / divisor).min()), float((s.ch_max / divisor).max())
    else:
        lo, hi = s.min, s.max
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if method == "minmax":
        return lo, hi
    if s.hist is None:
        raise DataError(f"method {method!r} needs histograms; run collect_histograms first")
    edges = np.linspace(s.hist_lo, s.hist_hi, HIST_BINS + 1)
    if method == "percentile":
        cdf = np.cumsum(s.hist) / max(1, s.hist.sum())
        q = (100.0 - percentile) / 100.0
        plo = edges[min(HIST_BINS, int(np.searchsorted(cdf, q)))]
        phi = edges[min(HIST_BINS, int(np.searchsorted(cdf, 1.0 - q)) + 1)]
        return min(float(plo), 0.0), max(float(phi), 0.0)
    candidates = _shrunk_ranges(s.hist_lo, s.hist_hi)
    score = _kl_score if method == "entropy" else _mse_score
    errs = [score(s.hist, edges, c_lo, c_hi) for c_lo, c_hi in candidates]
    return candidates[int(np.argmin(errs))]



def _shrunk_ranges(lo: float, hi: float, steps: int = 64) -> list[tuple[float, float]]:
    """Candidate ranges: each end independently kept or shrunk toward 0, on a geometric grid."""
    fracs = np.concatenate([[1.0], np.geomspace(1.0, 0.05, steps)[1:]])
    return [(lo * a, hi * b) for a in fracs[::4] for b in fracs]



def _mse_score(hist: np.ndarray, edges: np.ndarray, lo: float, hi: float) -> float:
    centers = (edges[:-1] + edges[1:]) / 2
    step = (hi - lo) / 255.0
    inside = (centers >= lo) & (centers <= hi)
    clip_err = np.where(centers < lo, (centers - lo) ** 2, np.where(centers > hi, (centers - hi) ** 2, 0.0))
    return float((hist * (clip_err + inside * step * step / 12.0)).sum())



def _kl_score(hist: np.ndarray, edges: np.ndarray, lo: float, hi: float) -> float:
    """KL(P || Q) as in TensorRT's entropy calibration: P = the histogram inside [lo, hi] with the
    clipped outliers added to its edge bins; Q = the inside histogram *without* them, merged into
    256 levels and spread uniformly over each level's non-empty bins. Ranges narrower than 256
    bins are not candidates (Q would equal P and clipping would look free)."""
    centers = (edges[:-1] + edges[1:]) / 2
    inside = (centers >= lo) & (centers <= hi)
    if inside.sum() < 256:
        return np.inf
    q_src = hist[inside].astype(np.float64)
    p = q_src.copy()
    p[0] += hist[centers < lo].sum()
    p[-1] += hist[centers > hi].sum()
    level = np.minimum(((centers[inside] - lo) / max(hi - lo, 1e-12) * 256).astype(np.int64), 255)
    nonzero = q_src > 0
    level_mass = np.bincount(level, weights=q_src, minlength=256)
    level_bins = np.bincount(level, weights=nonzero.astype(np.float64), minlength=256)
    q = np.where(nonzero, level_mass[level] / np.maximum(level_bins[level], 1), 0.0)
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum == 0 or q_sum == 0:
        return np.inf
    p, q = p / p_sum, q / q_sum
    m = p > 0
    return float((p[m] * np.log(p[m] / np.maximum(q[m], 1e-12))).sum())
