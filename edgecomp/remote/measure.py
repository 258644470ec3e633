"""``bench`` and ``validate`` with the models run on a device (:class:`~edgecomp.remote.device.Device`).

The feed and the data are prepared on the host exactly as for the local commands (the first
model's inputs, ``--shape``/``--value``, DATA cast to the reference's input types), the device
runs onnxruntime, and the numbers are computed on the host by the same code as locally:
:class:`~edgecomp.measure.bench.LatencyStats` for latency, :func:`~edgecomp.measure.validate.validate_many`
for fidelity. So a device result differs from a local one only by what the device computes.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from edgecomp.data import Feed, feed_defaults, image_size_hint, input_specs, load_data, synthesize_feed
from edgecomp.errors import OptionError
from edgecomp.io import load_model, model_size_bytes
from edgecomp.measure.bench import BenchResult, LatencyStats
from edgecomp.measure.validate import ValidationResult, validate_many
from edgecomp.remote.device import Device

__all__ = ["bench_on_device", "validate_on_device"]


def bench_on_device(device: Device, models: Sequence[str | os.PathLike], threads: int = 1, warmup: int = 10,
                    runs: int = 50, feed: Feed | None = None, shapes: Mapping[str, Sequence[int]] | None = None,
                    values: Mapping[str, np.ndarray] | None = None, pin: Sequence[int] | None = None,
                    labels: Sequence[str] | None = None) -> BenchResult:
    """:func:`edgecomp.measure.bench.benchmark` with the sessions on the device."""
    if runs < 1:
        raise OptionError("runs", f"must be >= 1, got {runs}")
    if warmup < 0:
        raise OptionError("warmup", f"must be >= 0, got {warmup}")
    labels = list(labels) if labels else [str(p) for p in models]
    assumed: list[str] = []
    if feed is None:
        first = load_model(models[0])
        specs, image = input_specs(first), image_size_hint(first)
        feed = synthesize_feed(specs, shapes, values=values, image_size=image)
        assumed = feed_defaults(specs, shapes, values, image)
        del first
    times = device.bench([str(m) for m in models], feed, threads, warmup, runs, pin)
    batch = int(next(iter(feed.values())).shape[0]) if feed else 1
    stats = [LatencyStats.from_times(lab, model_size_bytes(m), t, batch) for lab, m, t in zip(labels, models, times)]
    for s in stats:
        s.ratio_to_first = s.p50_ms / stats[0].p50_ms
    return BenchResult(threads, warmup, runs, {k: list(v.shape) for k, v in feed.items()}, stats, assumed)


def validate_on_device(device: Device, reference: str | os.PathLike, candidate: str | os.PathLike,
                       data: str | os.PathLike, labels: str | os.PathLike | None = None, threads: int = 1,
                       k: int = 10) -> ValidationResult:
    """:func:`edgecomp.measure.validate.validate` with both models run on the device (one session each)."""
    specs = input_specs(load_model(reference))
    ds = load_data(data, specs)
    ds.check_against(specs)
    feeds = list(ds.reread(specs))
    outputs = dict(zip((str(reference), str(candidate)),
                       device.outputs([str(reference), str(candidate)], feeds, threads)))
    return validate_many(reference, [candidate], feeds, labels, threads, k,
                         outputs_of=lambda model, model_feeds: outputs[str(model)])[0]
