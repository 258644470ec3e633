"""Keep int8 only for the op families that measurably run faster on this machine."""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.quantize.layers import Layer
from edgecomp.quantize.options import FAMILIES, QuantizeOptions
from edgecomp.quantize.plan import build
from edgecomp.quantize.quantize_static import LayerPlan
from edgecomp.runtime import make_session

__all__ = ["choose_families"]


def choose_families(model: ir.Model, layers: Sequence[Layer], plan: Mapping[str, LayerPlan], feed,
                    opts: QuantizeOptions, timer: Callable[[], float] = time.perf_counter,
                    ) -> tuple[set[str], list[dict[str, Any]]]:
    """Families to quantize, and a row per measured combination with its latency ratio.

    Every non-empty combination of the families present is built (in ``opts.format``: the QDQ form
    runs at its own speed here) and timed interleaved with the
    float model (families interact: a lone int8 family pays quantize/dequantize at its borders,
    which int8 neighbours would share) in rounds, until each ratio's 95% interval excludes 1.0
    or ten rounds are spent (:func:`edgecomp.measure.bench.compare_latency`). The fastest combination
    wins only if its whole interval lies below 1.0 and its ratio is at most 0.97; otherwise
    everything stays float, so a busy machine cannot talk edgecomp into a slower model.

    With ``opts.table`` (a measured target table, :mod:`edgecomp.quantize.measured`) nothing is
    timed: each family is decided from its stored ratio by the same rule, so repeated runs agree.
    Each row's ``evidence`` says which of the two was used.
    """
    from itertools import combinations

    from edgecomp.measure.bench import compare_latency

    present = [f for f in FAMILIES if any(l.family == f for l in layers)]
    if opts.families == "all":
        return set(present), [{"families": ",".join(present), "decision": "int8", "reason": "--families all"}]
    if opts.families != "auto":
        wanted = set(opts.families.split(",")) & set(present)
        return wanted, [{"families": ",".join(sorted(wanted)), "decision": "int8", "reason": "--families"}]
    if opts.table is not None:  # measured once with many rounds: the same answer on a busy or an idle machine
        from edgecomp.quantize.measured import decide_from_table

        return decide_from_table(opts.table, present)
    combos = [c for k in range(1, len(present) + 1) for c in combinations(present, k)]
    variants = [model] + [build(model, {n: p for n, p in plan.items() if family_of(layers, n) in c}, format=opts.format)
                          for c in combos]
    t0 = time.perf_counter()
    make_session(model, threads=opts.threads).run(None, feed)
    probe = max(time.perf_counter() - t0, 1e-4)
    runs = int(np.clip(0.3 / (probe * len(variants)), 5, 100))
    est = dict(zip(combos, compare_latency(variants, feed, threads=opts.threads, runs_per_round=runs,
                                           max_rounds=10, labels=["float"] + [",".join(c) for c in combos],
                                           timer=timer)))
    best = min(combos, key=lambda c: est[c].ratio)
    chosen = set(best) if (est[best].faster and est[best].ratio <= 0.97) else set()
    rows = []
    for c in combos:
        win = set(c) == chosen
        reason = ""
        if win:
            reason = "fastest combination, faster than float beyond noise"
        elif not chosen and c == best:
            reason = "no combination is >= 3% faster beyond noise: all float"
        rows.append({"families": ",".join(c), "latency ratio int8/float": est[c].ratio,
                     "95% interval": f"[{est[c].low:.3f}, {est[c].high:.3f}]", "rounds": est[c].rounds,
                     "decision": "chosen" if win else "-", "reason": reason,
                     "evidence": f"timed in this command on this host, 1 calibration sample, {runs} runs a round"})
    return chosen, rows



def family_of(layers: Sequence[Layer], node: str) -> str:
    return next(l.family for l in layers if l.node == node)
