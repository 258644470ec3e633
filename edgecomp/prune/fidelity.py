"""Held-out fidelity of a pruned model against the unpruned one, and the warning when it is low."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from edgecomp.data import Dataset
from edgecomp.prune.options import FIDELITY_WARN, HOLD_OUT_EVERY
from edgecomp.prune.samples import feeds, n_used

__all__ = ["held_out_fidelity"]


def held_out_fidelity(original: ir.Model, pruned: ir.Model, data: Dataset, max_samples: int | None = None,
                      threads: int = 1) -> dict[str, Any]:
    """Outputs of ``pruned`` vs ``original`` on the held-out samples (all samples when there are
    fewer than 5): per output the mean cosine and, for logits, top-1 agreement; overall the
    worst of each."""
    from edgecomp.measure.validate import compare_outputs
    from edgecomp.runtime import make_session, run_feed

    n = n_used(data, max_samples)
    part = "held" if n >= HOLD_OUT_EVERY else "all"
    s0 = make_session(original, threads=threads, optimization="basic")
    s1 = make_session(pruned, threads=threads, optimization="basic")
    names = [o.name for o in s0.get_outputs()]
    ref: list[list[np.ndarray]] = [[] for _ in names]
    cand: list[list[np.ndarray]] = [[] for _ in names]
    count = 0
    for feed in feeds(data, original, max_samples, part):
        for store, sess in ((ref, s0), (cand, s1)):
            for j, arr in enumerate(run_feed(sess, feed)):
                store[j].append(np.asarray(arr))
        count += 1
    outs = [compare_outputs(name, r, c) for name, r, c in zip(names, ref, cand)
            if r and np.issubdtype(r[0].dtype, np.floating)]
    top1 = [o.top1_agreement for o in outs if o.top1_agreement is not None]
    return {"samples": count, "held out": part == "held",
            "cosine": min((o.cosine_mean for o in outs), default=None),
            "top-1 agreement": min(top1) if top1 else None,
            "outputs": [dataclasses.asdict(o) for o in outs]}



def fidelity_text(fid: dict[str, Any]) -> str:
    parts = []
    if fid["cosine"] is not None:
        parts.append(f"mean cosine {fid['cosine']:.4f}")
    if fid["top-1 agreement"] is not None:
        parts.append(f"top-1 agreement {fid['top-1 agreement']:.1%}")
    where = (f"{fid['samples']} held-out samples" if fid["held out"]
             else f"all {fid['samples']} samples (fewer than {HOLD_OUT_EVERY}: none held out)")
    return f"{', '.join(parts) or 'no float outputs to compare'} on {where}"



def fidelity_warning(fid: dict[str, Any]) -> str | None:
    low = []
    if fid["cosine"] is not None and fid["cosine"] < FIDELITY_WARN:
        low.append(f"mean cosine {fid['cosine']:.3f} < {FIDELITY_WARN}")
    if fid["top-1 agreement"] is not None and fid["top-1 agreement"] < FIDELITY_WARN:
        low.append(f"top-1 agreement {fid['top-1 agreement']:.1%} < {FIDELITY_WARN:.0%}")
    if not low:
        return None
    where = "held-out samples" if fid["held out"] else "samples (none held out)"
    return (f"the pruned model departs from the original on {fid['samples']} {where} ({'; '.join(low)}); "
            "lower --sparsity, --protect the sensitive layers or give more --data")
