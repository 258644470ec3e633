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
                    opts: QuantizeOptions, timer: Callable[[], float] = time.perf_counter, confirm_feed=None,
                    ) -> tuple[set[str], list[dict[str, Any]]]:
    """Families to quantize, and a row per measured combination with its latency ratio.

    Every non-empty combination of the families present is built (in ``opts.format``: the QDQ form
    runs at its own speed here) and timed interleaved with the
    float model (families interact: a lone int8 family pays quantize/dequantize at its borders,
    which int8 neighbours would share) in rounds, until each ratio's 95% interval excludes 1.0
    or ten rounds are spent (:func:`edgecomp.measure.bench.compare_latency`). The fastest combination
    wins only if its whole interval lies below 1.0 and its ratio is at most 0.97; otherwise
    everything stays float, so a busy machine cannot talk edgecomp into a slower model. A win is
    re-timed (every combination again, fresh rounds) on ``confirm_feed`` (the second calibration
    sample) and kept only if the same combination wins again: one lucky series cannot pick int8.

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
    family = {l.node: l.family for l in layers}  # family_of per plan entry scans the layers: quadratic
    variants = [model] + [build(model, {n: p for n, p in plan.items() if family[n] in c}, format=opts.format)
                          for c in combos]
    runs = int(np.clip(0.3 / (_one_run(model, feed, opts.threads) * len(variants)), 5, 100))
    labels = ["float"] + [",".join(c) for c in combos]

    def measure(sample):
        return dict(zip(combos, compare_latency(variants, sample, threads=opts.threads, runs_per_round=runs,
                                                max_rounds=10, labels=labels, timer=timer)))

    est = measure(feed)
    best = min(combos, key=lambda c: est[c].ratio)
    chosen = set(best) if _wins(est[best]) else set()
    again = None
    if chosen:  # a win must hold again on another sample, in a fresh measurement: one lucky series is not enough
        again = measure(confirm_feed if confirm_feed is not None else feed)
        chosen = chosen if _wins(again[best]) else set()
    evidence = (f"timed in this command on this host ({runs} runs a round, calibration sample 1"
                + ("" if again is None else ", the winner re-timed on sample 2)" if confirm_feed is not None
                   else ", the winner re-timed)"))
    rows = []
    for c in combos:
        win = set(c) == chosen
        reason = ""
        if win:
            reason = "fastest combination, faster than float beyond noise (twice)"
        elif not chosen and c == best:
            reason = ("faster on sample 1, not beyond noise when re-timed: all float" if again is not None else
                      "no combination is >= 3% faster beyond noise: all float")
        row = {"families": ",".join(c), "latency ratio int8/float": est[c].ratio,
               "95% interval": f"[{est[c].low:.3f}, {est[c].high:.3f}]", "rounds": est[c].rounds}
        if again is not None:
            row["re-timed"] = again[c].text()
        rows.append({**row, "decision": "chosen" if win else "-", "reason": reason, "evidence": evidence})
    return chosen, rows


def _one_run(model: ir.Model, feed, threads: int) -> float:
    """Seconds of one warm run of ``model``: the rounds are sized from it. Not the session's creation
    nor its first run (allocations): counted in, a 0.2 ms encoder probed at ~50 ms and got 5 runs a
    round, whose medians were too noisy for any interval to leave 1.0 (int8 then stayed float)."""
    session = make_session(model, threads=threads)
    session.run(None, feed)
    t0 = time.perf_counter()
    session.run(None, feed)
    return max(time.perf_counter() - t0, 1e-5)


def _wins(e) -> bool:
    """int8 pays: the whole 95% interval below 1.0 and at least 3% faster."""
    return e.faster and e.ratio <= 0.97
