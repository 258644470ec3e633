"""Latency of ONNX models in onnxruntime on this CPU.

Several models are measured interleaved (A B C A B C ...) with the same feed, so slow phases of a
shared machine hit every model alike and the ratios to the first model stay meaningful even when
absolute times drift.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.data import Dataset, Feed, feed_defaults, image_size_hint, input_specs, synthesize_feed
from edgecomp.errors import DataError, OptionError
from edgecomp.io import load_model, model_bytes, model_size_bytes
from edgecomp.runtime import make_session, run_feed, with_input_floats
from edgecomp.step import StepResult

__all__ = ["compare_latency", "estimates_from_rounds", "RatioEstimate", "LatencyStats", "BenchResult", "benchmark", "pin_cpus",
           "parse_cpus", "first_feed", "run"]


@dataclasses.dataclass
class LatencyStats:
    model: str
    size_bytes: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput_per_s: float
    ratio_to_first: float = 1.0

    @classmethod
    def from_times(cls, model: str, size: int, times_s: Sequence[float], batch: int) -> "LatencyStats":
        t = np.asarray(times_s) * 1e3
        p50 = float(np.percentile(t, 50))
        return cls(model, size, len(t), p50, float(np.percentile(t, 90)), float(np.percentile(t, 99)),
                   float(t.mean()), batch * 1e3 / p50)


@dataclasses.dataclass
class BenchResult:
    threads: int
    warmup: int
    runs: int
    feed_shapes: dict[str, list[int]]
    models: list[LatencyStats]
    feed_defaults: list[str] = dataclasses.field(default_factory=list)  # sizes assumed for symbolic dims


def parse_cpus(spec: str) -> list[int]:
    """The CPUs of a spec like ``0`` or ``0-1,3``."""
    try:
        return sorted({c for part in spec.split(",") for c in _cpu_range(part)})
    except ValueError:
        raise OptionError("pin", f"{spec!r} is not a list of CPUs; write CPUs like 0 or 0-3 or 0,2") from None


def pin_cpus(spec: str) -> list[int]:
    """Pin this process to CPUs like ``0`` or ``0-1,3``; returns the list."""
    cpus = parse_cpus(spec)
    if not hasattr(os, "sched_setaffinity"):
        raise OptionError("pin", "needs Linux (sched_setaffinity)")
    available = os.sched_getaffinity(0)
    if not set(cpus) <= available:
        raise OptionError("pin", f"{spec}: CPUs {sorted(set(cpus) - available)} are not available here "
                                 f"(this process may use {sorted(available)})")
    os.sched_setaffinity(0, cpus)
    return cpus


def _cpu_range(part: str) -> range:
    lo, _, hi = part.strip().partition("-")
    return range(int(lo), int(hi or lo) + 1)


def benchmark(paths: Sequence[str | os.PathLike | ir.Model], threads: int = 1, warmup: int = 10, runs: int = 50,
              feed: Feed | None = None, shapes: Mapping[str, Sequence[int]] | None = None,
              labels: Sequence[str] | None = None, values: Mapping[str, np.ndarray] | None = None) -> BenchResult:
    """Median-of-``runs`` latency of each model, interleaved, on one shared feed.

    Models are files or in-memory ``ir.Model`` (then ``labels`` names them and the size is the
    serialized size). The feed is synthesized from the first model's inputs (``shapes`` fills
    symbolic dims, ``values`` fixes inputs, the rest get documented defaults) unless given; every
    model must accept it.
    """
    if runs < 1:
        raise OptionError("runs", f"must be >= 1, got {runs}")
    if warmup < 0:
        raise OptionError("warmup", f"must be >= 0, got {warmup}")
    labels = list(labels) if labels else [str(p) for p in paths]
    sizes = [len(model_bytes(p)) if isinstance(p, ir.Model) else model_size_bytes(p) for p in paths]
    assumed: list[str] = []
    if feed is None:
        first = paths[0] if isinstance(paths[0], ir.Model) else load_model(paths[0])
        specs, image = input_specs(first), image_size_hint(first)
        feed = synthesize_feed(specs, shapes, values=values, image_size=image)
        assumed = feed_defaults(specs, shapes, values, image)
        del first
    sessions = [make_session(p, threads=threads) for p in paths]  # files are opened by onnxruntime itself
    feeds = [with_input_floats(s, feed) for s in sessions]  # a float32 model and its float16 export side by side
    for s, f in zip(sessions, feeds):
        try:
            run_feed(s, f)
        except DataError as e:
            if not assumed:
                raise
            raise DataError(f"{e} (on a made-up feed: {', '.join(assumed)}; give data, or the inputs' shapes or "
                            "values)") from e
        for _ in range(warmup):
            run_feed(s, f)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, feeds[i])
            times[i].append(time.perf_counter() - t0)
    batch = int(next(iter(feed.values())).shape[0]) if feed else 1
    stats = [LatencyStats.from_times(lab, size, t, batch) for lab, size, t in zip(labels, sizes, times)]
    for s in stats:
        s.ratio_to_first = s.p50_ms / stats[0].p50_ms
    return BenchResult(threads, warmup, runs, {k: list(v.shape) for k, v in feed.items()}, stats, assumed)


@dataclasses.dataclass
class RatioEstimate:
    """A model's latency over the reference's, from interleaved rounds, with a confidence interval."""

    label: str
    ratio: float          # geometric mean of the per-round ratios of medians
    low: float
    high: float
    rounds: int

    @property
    def faster(self) -> bool:
        """Faster than the reference beyond noise: the whole interval lies below 1."""
        return self.high < 1.0

    def text(self) -> str:
        return f"{self.ratio:.3f} [{self.low:.3f}, {self.high:.3f}] over {self.rounds} rounds"


# two-sided 95% Student t quantiles by degrees of freedom (1..30); beyond, the normal 1.96
_T95 = [12.71, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def compare_latency(models: Sequence[ir.Model | str | os.PathLike], feed: Feed, *, threads: int = 1,
                    runs_per_round: int = 10, min_rounds: int = 3, max_rounds: int = 12,
                    labels: Sequence[str] | None = None, timer: Callable[[], float] = time.perf_counter,
                    ) -> list[RatioEstimate]:
    """Latency of ``models[1:]`` relative to ``models[0]``, robust to a busy machine.

    Each round runs the models interleaved (A B C A B C ...) ``runs_per_round`` times and takes
    the ratio of each model's median to the reference's median; the log-ratios of the rounds give
    a 95% Student-t interval. Rounds go on until every interval excludes 1.0 or ``max_rounds``
    is reached, so a decision taken from :attr:`RatioEstimate.faster` holds under noise, and
    equal timings (the interval stays on 1.0) never count as faster.
    """
    sessions = [make_session(m, threads=threads) for m in models]
    labels = list(labels) if labels else [str(m) for m in models]
    feeds = [with_input_floats(s, feed) for s in sessions]
    for s, f in zip(sessions, feeds):
        run_feed(s, f)
    logs: list[list[float]] = [[] for _ in sessions[1:]]
    estimates: list[RatioEstimate] = []
    for rnd in range(1, max_rounds + 1):
        times: list[list[float]] = [[] for _ in sessions]
        for _ in range(runs_per_round):
            for i, s in enumerate(sessions):
                t0 = timer()
                s.run(None, feeds[i])
                times[i].append(timer() - t0)
        estimates = _add_round(logs, times, labels)
        if rnd >= min_rounds and _settled(estimates):
            break
    return estimates


def estimates_from_rounds(rounds: Sequence[Sequence[Sequence[float]]], labels: Sequence[str],
                          min_rounds: int) -> list[RatioEstimate]:
    """:func:`compare_latency`'s estimates from rounds timed elsewhere (a device runs them all in
    one trip): ``rounds[r][i]`` are model ``i``'s seconds in round ``r``. The rounds are read in
    order with the same stopping rule, so the estimate is the one :func:`compare_latency` would
    have stopped at; later rounds are not used."""
    logs: list[list[float]] = [[] for _ in labels[1:]]
    estimates: list[RatioEstimate] = []
    for rnd, times in enumerate(rounds, 1):
        estimates = _add_round(logs, times, labels)
        if rnd >= min_rounds and _settled(estimates):
            break
    return estimates


def _add_round(logs: list[list[float]], times: Sequence[Sequence[float]], labels: Sequence[str]) -> list[RatioEstimate]:
    """One more round's log ratios appended to ``logs``; the estimates over every round so far."""
    for lg, value in zip(logs, _log_ratios(times)):
        lg.append(value)
    return [_interval(lab, lg) for lab, lg in zip(labels[1:], logs)]


def _log_ratios(times: Sequence[Sequence[float]]) -> list[float]:
    """One round: each model's log ratio of medians to the reference's (``times[0]``)."""
    ref = max(float(np.median(times[0])), 1e-12)
    return [float(np.log(max(float(np.median(t)), 1e-12) / ref)) for t in times[1:]]


def _settled(estimates: Sequence[RatioEstimate]) -> bool:
    """Every interval excludes 1.0: more rounds would not change a verdict."""
    return all(e.high < 1.0 or e.low > 1.0 for e in estimates)


def _interval(label: str, logs: Sequence[float]) -> RatioEstimate:
    n = len(logs)
    mean = float(np.mean(logs))
    if n < 2:
        half = float("inf")
    else:
        half = _T95[min(n - 2, len(_T95) - 1)] * float(np.std(logs, ddof=1)) / float(np.sqrt(n))
    return RatioEstimate(label, float(np.exp(mean)), float(np.exp(mean - half)), float(np.exp(mean + half)), n)


def first_feed(data: str | os.PathLike, model: ir.Model | str | os.PathLike | None = None) -> Feed:
    """The first sample of DATA (cast to ``model``'s input types when given), as the benchmark feed."""
    ds = Dataset(data)
    if model is None:
        return ds[0]
    specs = input_specs(model if isinstance(model, ir.Model) else load_model(model))
    ds.check_against(specs)
    return next(ds.feeds_for(specs))


def run(models: Sequence[str | os.PathLike | ir.Model], options: Mapping[str, object], data=None,
        context=None) -> StepResult:
    """bench as a step, in the shape every capability returns: every model (files or in-memory
    ``ir.Model``) timed interleaved on one feed (the first sample of ``data.eval`` or
    ``data.calibration``, else synthesized), ratios to the first; the table ``latency`` has one
    row per model; nothing is written (``model`` is None). Threads: the option, else the context's."""
    source = (data.eval or data.calibration) if data is not None else None
    feed = first_feed(source, models[0]) if source else None
    threads = options.get("threads") or getattr(context, "threads", None) or 1
    labels = [str(m) if isinstance(m, (str, os.PathLike)) else f"model {i}" for i, m in enumerate(models)]
    res = benchmark(list(models), threads=threads, warmup=options["warmup"], runs=options["runs"], feed=feed,
                    labels=labels)
    summary = {"threads": res.threads, "runs": res.runs, "feed": res.feed_shapes,
               "sizes assumed": ", ".join(res.feed_defaults) or None}
    return StepResult("bench", None, summary, {"latency": [dataclasses.asdict(s) for s in res.models]})
