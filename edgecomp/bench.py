"""Latency of ONNX models in onnxruntime on this CPU.

Several models are measured interleaved (A B C A B C ...) with the same feed, so slow phases of a
shared machine hit every model alike and the ratios to the first model stay meaningful even when
absolute times drift.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.data import Dataset, Feed, feed_defaults, image_size_hint, input_specs, synthesize_feed
from edgecomp.errors import ConfigError
from edgecomp.io import load_model, model_bytes, model_size_bytes
from edgecomp.runtime import make_session, run_feed

__all__ = ["LatencyStats", "BenchResult", "benchmark", "pin_cpus", "first_feed"]


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


def pin_cpus(spec: str) -> list[int]:
    """Pin this process to CPUs like ``0`` or ``0-1,3``; returns the list."""
    try:
        cpus = sorted({c for part in spec.split(",") for c in _cpu_range(part)})
    except ValueError:
        raise ConfigError(f"bad --pin {spec!r}; write CPUs like 0 or 0-3 or 0,2") from None
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError("--pin needs Linux (sched_setaffinity)")
    available = os.sched_getaffinity(0)
    if not set(cpus) <= available:
        raise ConfigError(f"--pin {spec}: CPUs {sorted(set(cpus) - available)} are not available here "
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
    if runs < 1 or warmup < 0:
        raise ConfigError("--runs must be >= 1 and --warmup >= 0")
    models = [p if isinstance(p, ir.Model) else load_model(p) for p in paths]
    labels = list(labels) if labels else [str(p) for p in paths]
    sizes = [len(model_bytes(m)) if isinstance(p, ir.Model) else model_size_bytes(p) for p, m in zip(paths, models)]
    assumed: list[str] = []
    if feed is None:
        specs, image = input_specs(models[0]), image_size_hint(models[0])
        feed = synthesize_feed(specs, shapes, values=values, image_size=image)
        assumed = feed_defaults(specs, shapes, values, image)
    sessions = [make_session(m, threads=threads) for m in models]
    del models
    for s in sessions:
        for _ in range(warmup):
            run_feed(s, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, feed)
            times[i].append(time.perf_counter() - t0)
    batch = int(next(iter(feed.values())).shape[0]) if feed else 1
    stats = [LatencyStats.from_times(lab, size, t, batch) for lab, size, t in zip(labels, sizes, times)]
    for s in stats:
        s.ratio_to_first = s.p50_ms / stats[0].p50_ms
    return BenchResult(threads, warmup, runs, {k: list(v.shape) for k, v in feed.items()}, stats, assumed)


def first_feed(data: str | os.PathLike, model: ir.Model | str | os.PathLike | None = None) -> Feed:
    """The first sample of DATA (cast to ``model``'s input types when given), as the benchmark feed."""
    ds = Dataset(data)
    if model is None:
        return ds[0]
    specs = input_specs(model if isinstance(model, ir.Model) else load_model(model))
    ds.check_against(specs)
    return next(ds.feeds_for(specs))
