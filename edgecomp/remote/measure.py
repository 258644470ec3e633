"""``bench`` and ``validate`` with the models run on a device (:class:`~edgecomp.remote.device.Device`).

The feed and the data are prepared on the host exactly as for the local commands (the first
model's inputs, ``--shape``/``--value``, DATA cast to the reference's input types), the device
runs onnxruntime, and the numbers are computed on the host by the same code as locally:
:class:`~edgecomp.measure.bench.LatencyStats` for latency, :func:`~edgecomp.measure.validate.validate_many`
for fidelity. So a device result differs from a local one only by what the device computes.

- :func:`validate_on_device` streams DATA: chunks of about :data:`CHUNK_BYTES` of feeds go to one
  work folder holding both models, both run on each chunk, and the outputs come back chunk by
  chunk (the device holds one chunk and its outputs; the host holds one chunk of feeds and the
  outputs, as local validate does: neighbour agreement needs every embedding).
- :func:`compare_on_device` is :func:`edgecomp.measure.bench.compare_latency` on the device: the
  runner times ``max_rounds`` rounds of paired interleaved runs in one trip (runs per round sized
  on the device), and the host reads them with the same stopping rule
  (:func:`edgecomp.measure.bench.estimates_from_rounds`). ``targets measure`` and quantize's
  never-slower check use it for a profile with ``remote = ...``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from edgecomp.data import Feed, feed_defaults, image_size_hint, input_specs, load_data, synthesize_feed
from edgecomp.errors import OptionError
from edgecomp.io import load_model, model_size_bytes
from edgecomp.measure.bench import BenchResult, LatencyStats, RatioEstimate, estimates_from_rounds
from edgecomp.measure.validate import ValidationResult, validate_many
from edgecomp.remote.device import Device

__all__ = ["CHUNK_BYTES", "bench_on_device", "compare_on_device", "validate_on_device"]

CHUNK_BYTES = 32 << 20  # feeds per trip to the device when validating


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
    """:func:`edgecomp.measure.validate.validate` with both models run on the device, DATA streamed
    to it in chunks (one session pair per chunk, one work folder)."""
    specs = input_specs(load_model(reference))
    ds = load_data(data, specs)
    ds.check_against(specs)
    paths = [str(reference), str(candidate)]
    outputs: dict[str, tuple[list[str], list[list[np.ndarray]]]] = {}
    with device.workspace(paths) as ws:
        def outputs_of(model, feeds):
            if not outputs:  # the first call (the reference) runs both models on each chunk as it goes
                for path, (names, values) in zip(paths, _streamed_outputs(ws, feeds, threads)):
                    outputs[path] = (names, values)
            return outputs[str(model)]

        return validate_many(reference, [candidate], ds, labels, threads, k, outputs_of=outputs_of)[0]


def _streamed_outputs(ws, feeds: Iterable[Mapping[str, np.ndarray]], threads: int,
                      ) -> list[tuple[list[str], list[list[np.ndarray]]]]:
    """Each model's output names and per-output values on every feed, the feeds sent in chunks."""
    merged: list[tuple[list[str], list[list[np.ndarray]]]] = []
    for chunk in _chunks(feeds, CHUNK_BYTES):
        got = ws.outputs(chunk, threads)
        if not merged:
            merged = [(names, [[] for _ in names]) for names, _ in got]
        for (_, acc), (_, values) in zip(merged, got):
            for a, v in zip(acc, values):
                a.extend(v)
    return merged


def _chunks(feeds: Iterable[Mapping[str, np.ndarray]], limit: int) -> Iterable[list[Mapping[str, np.ndarray]]]:
    chunk: list[Mapping[str, np.ndarray]] = []
    size = 0
    for feed in feeds:
        chunk.append(feed)
        size += sum(np.asarray(v).nbytes for v in feed.values())
        if size >= limit:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def compare_on_device(device: Device, models: Sequence, feed: Feed, *, threads: int = 1, round_seconds: float,
                      min_rounds: int, max_rounds: int, min_runs: int, max_runs: int,
                      labels: Sequence[str]) -> list[RatioEstimate]:
    """:func:`edgecomp.measure.bench.compare_latency` with the runs on the device; ``models`` are
    files or in-memory models (written to a temporary folder first)."""
    from edgecomp.io import save_model

    with tempfile.TemporaryDirectory(prefix="edgecomp-compare-") as tmp:
        paths = []
        for i, m in enumerate(models):
            if isinstance(m, (str, os.PathLike)):
                paths.append(str(m))
            else:  # each in its own folder: a model over 2 GiB writes NAME.data beside it
                folder = Path(tmp) / f"m{i}"
                folder.mkdir()
                paths.append(str(save_model(m, folder / "model.onnx")))
        rounds = device.rounds(paths, feed, threads, max_rounds, round_seconds, min_runs, max_runs)
    return estimates_from_rounds(rounds, list(labels), min_rounds)
