"""A candidate model's numerics on emulated ARM targets, against the host.

For each target with an ``emulate`` entry, the candidate runs in the target's onnxruntime (see
:mod:`edgecomp.emulate.runner`) on ``max_samples`` samples evenly spaced over DATA, and two comparisons are
made per output with :func:`edgecomp.measure.validate.compare_outputs` (errors, cosine, top-1 or
k-NN agreement):

- **fidelity**: candidate on the target vs the reference (fp32) on the host: what the user gets
  on the device, relative to the model they trust;
- **platform gap**: candidate on the target vs the same candidate on the host: what the host's own
  validation misses. fp32 models show ~1e-7; a static int8 model can differ where a 1-ulp float
  difference before a QuantizeLinear flips a code at a rounding boundary.

The reference runs on the host only (fp32 kernels agree across platforms to ~1e-7, and fp32
under emulation costs ~10x int8). Emulation timings are the cost of the check, never a latency.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.data import Dataset, input_specs, load_data
from edgecomp.emulate.limits import DEFAULT_MAX_SAMPLES, DEFAULT_TIMEOUT_S
from edgecomp.emulate.runner import Emulation, EmulatedRunner
from edgecomp.emulate.setup import Runtime, load_runtime
from edgecomp.errors import DataError, OptionError
from edgecomp.io import load_model
from edgecomp.measure.validate import OutputFidelity, batch_of, compare_outputs
from edgecomp.runtime import make_session, run_feed

__all__ = ["DEFAULT_MAX_SAMPLES", "TargetFidelity", "target_fidelity", "fidelity_rows"]

#: Samples checked per target by default: a MiniLM int8 sentence costs 1.5-3 s of CPU under emulation.


@dataclasses.dataclass
class TargetFidelity:
    target: str
    cpu: str
    samples: int
    fidelity: list[OutputFidelity]  # candidate on the target vs the reference on the host
    platform_gap: list[OutputFidelity]  # candidate on the target vs the candidate on the host
    seconds_per_sample: float  # emulation cost of the samples computed (0 when all were cached)
    cached: int
    note: str | None = None


def target_fidelity(reference: str | os.PathLike | ir.Model, candidate: str | os.PathLike | ir.Model,
                    data: str | os.PathLike | Dataset | Sequence[Mapping[str, np.ndarray]],
                    profiles: Sequence, *, max_samples: int = DEFAULT_MAX_SAMPLES, runtime: Runtime | None = None,
                    workers: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, k: int = 10,
                    threads: int = 1, cache: bool = True, progress=None) -> list[TargetFidelity]:
    """:class:`TargetFidelity` of ``candidate`` on each profile (module docstring)."""
    if max_samples < 1:
        raise OptionError("max_samples", f"must be >= 1, got {max_samples}")
    emulations = [Emulation.of(p) for p in profiles]  # refuse a profile without emulate before any work
    ref_model = reference if isinstance(reference, ir.Model) else load_model(reference)
    cand_model = candidate if isinstance(candidate, ir.Model) else load_model(candidate)
    specs = input_specs(ref_model)
    if isinstance(data, (str, os.PathLike, Dataset)):
        ds = data if isinstance(data, Dataset) else load_data(data, specs)
        ds.check_against(specs)
        feeds = list(ds.feeds_for(specs, limit=max_samples))
    else:
        feeds = list(data)[:max_samples]
    if not feeds:
        raise DataError("the data holds no samples")
    runtime = runtime or load_runtime()
    ref_host = _host_outputs(ref_model, feeds, threads)
    cand_host = _host_outputs(cand_model, feeds, threads)
    batches = [batch_of(f, specs) for f in feeds]
    names = [o.name for o in cand_model.graph.outputs]
    if names != [o.name for o in ref_model.graph.outputs]:
        raise DataError(f"the candidate's outputs {names} differ from the reference's "
                        f"{[o.name for o in ref_model.graph.outputs]}; compare models with the same outputs")
    results = []
    for em in emulations:
        run = EmulatedRunner(em, runtime, workers=workers, timeout_s=timeout_s, cache=cache,
                             progress=progress).run(cand_model, feeds, label="the candidate")
        target = [[s[j] for s in run.outputs] for j in range(len(names))]
        computed = len(feeds) - run.cached
        results.append(TargetFidelity(
            target=em.name, cpu=em.cpu, samples=len(feeds),
            fidelity=[compare_outputs(n, r, t, k, batches) for n, r, t in zip(names, ref_host, target)],
            platform_gap=[compare_outputs(n, c, t, k, batches) for n, c, t in zip(names, cand_host, target)],
            seconds_per_sample=run.seconds / computed if computed else 0.0, cached=run.cached, note=em.note))
    return results


def fidelity_rows(results: Sequence[TargetFidelity]) -> list[dict]:
    """One table row per target and output."""
    rows = []
    for r in results:
        for fid, gap in zip(r.fidelity, r.platform_gap):
            agree = fid.top1_agreement if fid.top1_agreement is not None else fid.knn_agreement
            rows.append({"target": r.target, "qemu cpu": r.cpu, "output": fid.name, "samples": r.samples,
                         "cos vs host fp32": fid.cosine_mean, "worst cos": fid.cosine_min,
                         "top-1/kNN": agree, "platform gap 1-cos": 1.0 - gap.cosine_mean,
                         "gap max|d|": gap.max_abs_err, "note": r.note or ""})
    return rows


def _host_outputs(model: ir.Model, feeds, threads: int) -> list[list[np.ndarray]]:
    """Per output, its value on each feed, from the host's onnxruntime."""
    session = make_session(model, threads)
    per_sample = [run_feed(session, f) for f in feeds]
    return [[s[j] for s in per_sample] for j in range(len(session.get_outputs()))]
