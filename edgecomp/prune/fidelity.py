"""Fidelity of a pruned model against the unpruned one, and the floor it must keep.

Where it is measured:

- with data: the held-out samples (every 5th; all of them when there are fewer than 5), which
  neither importance nor repair saw;
- without data: :data:`~edgecomp.prune.options.SYNTHETIC_SAMPLES` inputs synthesized as ``bench``
  and ``inspect`` synthesize them (:func:`edgecomp.data.synthesize_feed`, seeds 0, 1, …): float
  inputs standard normal (the scale of a normalized image, spectrogram or waveform), integer inputs
  ids in [0, 100) (a vocabulary's first entries, a class index, a small count), inputs named
  ``*mask*`` and booleans all ones; symbolic dims get batch 1, sequence 128 and the image side of
  the model's metadata (else 224). The report says the inputs are synthetic.

What is measured, per float output over the samples (:func:`edgecomp.measure.validate.compare_outputs`):
the mean cosine of each sample's output and, for logits, the top-1 agreement; the verdict takes
the worst output. A result whose mean cosine or top-1 agreement is below
:data:`~edgecomp.prune.options.FIDELITY_FLOOR` is *below the floor*: :func:`apply_floor` refuses
it (:class:`~edgecomp.errors.BelowFloor`, nothing written) unless a degraded result is allowed,
and then flags it (``PruneResult.degraded``, a warning; the CLI exits with status 3).

Synthetic inputs are not the model's data. They catch a pruned model that computes something else
on everything (the failure this guards against: a classifier agreeing on 25% of its inputs), not
the fine loss on the real distribution: a result they pass is "checked on synthesized inputs",
never validated. A model that does not run on synthesized inputs (an input that needs a real
value, a made-up size its shapes refuse) cannot be checked without data: the floor counts it as
not met (refused, or written flagged when a degraded result is allowed), since nothing says the
cut left it working.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.data import Dataset
from edgecomp.errors import BelowFloor, EdgecompError
from edgecomp.io import first_line
from edgecomp.prune.options import FIDELITY_FLOOR, HOLD_OUT_EVERY, SYNTHETIC_SAMPLES
from edgecomp.prune.samples import feeds, n_used

if TYPE_CHECKING:
    from edgecomp.prune.step import PruneResult

__all__ = ["held_out_fidelity", "synthetic_fidelity", "fidelity_text", "below_floor", "apply_floor"]


def _compare(original: ir.Model, pruned: ir.Model, samples: Iterable[Mapping[str, np.ndarray]],
             threads: int) -> dict[str, Any]:
    """Both models on every feed of ``samples``: per float output the mean cosine and, for logits,
    top-1 agreement; overall the worst of each."""
    from edgecomp.measure.validate import compare_outputs
    from edgecomp.runtime import make_session, run_feed

    s0 = make_session(original, threads=threads, optimization="basic")
    s1 = make_session(pruned, threads=threads, optimization="basic")
    names = [o.name for o in s0.get_outputs()]
    ref: list[list[np.ndarray]] = [[] for _ in names]
    cand: list[list[np.ndarray]] = [[] for _ in names]
    count = 0
    for feed in samples:
        for store, sess in ((ref, s0), (cand, s1)):
            for j, arr in enumerate(run_feed(sess, dict(feed))):
                store[j].append(np.asarray(arr))
        count += 1
    outs = [compare_outputs(name, r, c) for name, r, c in zip(names, ref, cand)
            if r and np.issubdtype(r[0].dtype, np.floating)]
    top1 = [o.top1_agreement for o in outs if o.top1_agreement is not None]
    return {"samples": count, "cosine": min((o.cosine_mean for o in outs), default=None),
            "top-1 agreement": min(top1) if top1 else None, "outputs": [dataclasses.asdict(o) for o in outs]}


def held_out_fidelity(original: ir.Model, pruned: ir.Model, data: Dataset, max_samples: int | None = None,
                      threads: int = 1) -> dict[str, Any]:
    """Outputs of ``pruned`` vs ``original`` on the held-out samples of ``data`` (all samples when
    there are fewer than 5)."""
    part = "held" if n_used(data, max_samples) >= HOLD_OUT_EVERY else "all"
    fid = _compare(original, pruned, feeds(data, original, max_samples, part), threads)
    return {**fid, "inputs": "held-out" if part == "held" else "all", "held out": part == "held"}


def synthetic_fidelity(original: ir.Model, pruned: ir.Model, samples: int = SYNTHETIC_SAMPLES, threads: int = 1,
                       shapes: Mapping[str, Sequence[int]] | None = None,
                       values: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Outputs of ``pruned`` vs ``original`` on ``samples`` synthesized inputs (seeds 0 … samples−1;
    ``shapes`` and ``values`` fix inputs as ``bench --shape/--value`` do); ``not checked`` holds the
    reason when the model does not run on them."""
    from edgecomp.data import feed_defaults, image_size_hint, input_specs, synthesize_feed

    specs, image = input_specs(original), image_size_hint(original)
    fid: dict[str, Any] = {"samples": 0, "inputs": "synthetic", "held out": False, "cosine": None,
                           "top-1 agreement": None, "outputs": [], "not checked": None}
    try:
        fid["assumed"] = feed_defaults(specs, shapes, values, image)
        fid.update(_compare(original, pruned, (synthesize_feed(specs, shapes, seed=i, values=values, image_size=image)
                                               for i in range(samples)), threads))
    except EdgecompError as e:  # a made-up input the model refuses (run_feed's DataError)
        fid["not checked"] = f"the model does not run on synthesized inputs ({first_line(e)})"
    return fid


def _where(fid: dict[str, Any]) -> str:
    if fid["inputs"] == "synthetic":
        assumed = f"; sizes assumed: {', '.join(fid['assumed'])}" if fid.get("assumed") else ""
        return f"{fid['samples']} synthesized inputs (random, no data given{assumed})"
    if fid["inputs"] == "held-out":
        return f"{fid['samples']} held-out samples"
    return f"all {fid['samples']} samples (fewer than {HOLD_OUT_EVERY}: none held out)"


def fidelity_text(fid: dict[str, Any]) -> str:
    """The summary's fidelity line: what was measured and on which inputs."""
    if fid.get("not checked"):
        return f"not checked: {fid['not checked']}"
    parts = []
    if fid["cosine"] is not None:
        parts.append(f"mean cosine {fid['cosine']:.4f}")
    if fid["top-1 agreement"] is not None:
        parts.append(f"top-1 agreement {fid['top-1 agreement']:.1%}")
    return f"{', '.join(parts) or 'no float outputs to compare'} on {_where(fid)}"


def below_floor(fid: dict[str, Any]) -> str | None:
    """What falls below :data:`FIDELITY_FLOOR` and on which inputs (or why nothing could be
    measured: an unchecked result does not meet the floor either), or None when the floor is met."""
    if fid.get("not checked"):
        return f"the pruned model could not be checked: {fid['not checked']}"
    low = []
    if fid["cosine"] is not None and fid["cosine"] < FIDELITY_FLOOR:
        low.append(f"mean cosine {fid['cosine']:.3f} < {FIDELITY_FLOOR}")
    if fid["top-1 agreement"] is not None and fid["top-1 agreement"] < FIDELITY_FLOOR:
        low.append(f"top-1 agreement {fid['top-1 agreement']:.1%} < {FIDELITY_FLOOR:.0%}")
    if not low:
        return None
    return f"the pruned model departs from the original on {_where(fid)}: {'; '.join(low)}"


def apply_floor(result: PruneResult, allow_degraded: bool, remedies: dict[str, str]) -> None:
    """The one rule for a pruned result (CLI and recipes alike): below the floor, or not checked,
    it is refused with :class:`BelowFloor` (``remedies``: what to do, keyed by option or data name,
    in neutral words), or, when ``allow_degraded``, flagged ``degraded`` with a warning."""
    fid = result.fidelity
    if fid is None:
        return
    finding = below_floor(fid)
    if finding is None:
        return
    if not allow_degraded:
        raise BelowFloor(finding, remedies)
    result.degraded = True
    result.warnings.append(f"{finding}; written because a degraded result was allowed (exit status 3)")
