"""Accuracy-aware structured pruning: the largest cut whose measured loss on eval data stays within
a tolerance, each channel group cut as far as it can bear.

The loss is the one ``quantize --tolerance`` bounds (:class:`edgecomp.measure.evaluate.Evaluator`,
the model's first output on the eval samples against the unpruned model's): ``cosine`` is
``1 − mean cosine``, ``top1`` the top-1 accuracy lost on the labels (agreement with the unpruned
model's top-1 without labels), ``mae`` the mean absolute error.

1. Once: the dependency analysis (:func:`find_groups`), importance statistics with calibration data
   (:func:`channel_stats`), and one per-layer plan (:func:`plan_pruning`) per sparsity level ``s`` of
   ``levels`` (0.25, 0.5, 0.75): at level ``s`` a group keeps its ``1 − s`` most important channels,
   counts rounded as ``round_to`` says (levels that round to the same count are one).
2. Sensitivity: per prunable group ``g`` and per level ``i``, shallowest first, the loss ``L_g(i)``,
   the parameter count ``P_g(i)`` and the MACs ``M_g(i)`` (on the first eval sample's shapes) of
   the model with only ``g`` cut (every other group whole, no repair). The first level past the tolerance ends the group's sweep: a deeper cut of the same
   channels is not expected to hurt less. A group past the tolerance at its first level stays whole.
3. Order: a step takes one group one level deeper. Among the next step of every group, the one
   with the least loss per MAC removed goes first (MACs are what the cut is for: a conv early in a
   CNN costs far more per parameter than the classifier; parameters stand in when the model's
   shapes cannot be probed)::

       priority(g, i → i+1) = max(L_g(i+1) − L_g(i), 0) / (M_g(i) − M_g(i+1))    (L_g(0) = 0)

4. Search: losses of several cuts do not add exactly, so every candidate is the combined model,
   measured. The longest prefix of that order within the tolerance is found by doubling then
   bisection; every later step is then tried once, in order, and kept when the combined loss stays
   within the tolerance; a step refused leaves its group at its level for good.
5. The chosen plan is applied to the unpruned model, repaired (with calibration data and
   ``repair``; :func:`repair`) and measured again; the repair is dropped when it raises the loss.
   The result passes :func:`verify_pruned` and never has more parameters than the input.

When no cut is within the tolerance, the result is the single-group cut with the least loss, and
the tolerance is reported as not met. The summary gives the number of eval samples and the loss's
95% upper bound, with a warning when the bound exceeds the tolerance or the eval set is small
(:class:`edgecomp.measure.metrics.LossEstimate`); "met" is decided on the measured loss. Work: at most ``G·L`` evaluations for the sweep (``G``
prunable groups, ``L`` levels), about ``2·log2(G·L) + G·L`` for the search and 1 for the repair;
``max_evaluations`` caps the total (a step not measured is not taken).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (not imported by onnx_ir itself)

from edgecomp.data import Dataset, input_specs
from edgecomp.errors import DataNeeded, NothingToPrune, OptionError, PassFailed
from edgecomp.prune.analysis import Analysis
from edgecomp.prune.groups import find_groups, lift_constants
from edgecomp.prune.importance import PrunePlan, channel_stats, plan_pruning
from edgecomp.prune.options import PruneOptions

if TYPE_CHECKING:
    from edgecomp.prune.result import PruneResult
    from edgecomp.measure.evaluate import Evaluator

__all__ = ["LEVELS", "prune_to_tolerance"]

LEVELS = (0.25, 0.5, 0.75)  # sparsities tried per group: 3 keeps the sweep at 3 evaluations a group

Choice = dict[int, int]  # group root → level index (0: whole, i: the group's i-th level)


@dataclasses.dataclass
class _Group:
    """A prunable group: its levels (sparsity, kept channels) and what the sweep measured."""

    root: int
    atoms: list[int]
    levels: list[tuple[float, int]]
    losses: list[float] = dataclasses.field(default_factory=list)  # L_g(i) for the levels measured, i ≥ 1
    params: list[int] = dataclasses.field(default_factory=list)  # P_g(i) for the same levels
    macs: list[int | None] = dataclasses.field(default_factory=list)  # M_g(i), None when not probed


class _Search:
    """Builds and measures candidates (cut, no repair) from the unpruned model; counts evaluations."""

    def __init__(self, base: ir.Model, an: Analysis, plans: dict[float, PrunePlan], groups: dict[int, _Group],
                 evaluator: Evaluator, tolerance: float, budget: int | None,
                 macs_of: Callable[[ir.Model], int | None] = lambda model: None):
        from edgecomp.measure.inspect import count_parameters

        self.base, self.an, self.plans, self.groups = base, an, plans, groups
        self.evaluator, self.tolerance, self.budget, self.macs_of = evaluator, tolerance, budget, macs_of
        self.params0 = count_parameters(base)
        self.macs0 = macs_of(base)
        self.evaluations = 0
        self.measured: dict[tuple, tuple[float, int]] = {}  # choice key → (loss, parameters)

    def spent(self) -> bool:
        return self.budget is not None and self.evaluations >= self.budget

    def build(self, choice: Choice) -> tuple[ir.Model, PrunePlan, dict[str, Any]]:
        """A copy of the unpruned model with ``choice`` cut, the plan that cut it and the cut's summary."""
        from edgecomp.passes.base import run_pass
        from edgecomp.prune.prune_channels import PruneChannelsPass

        model = self.base.clone()
        plan = _combined_plan(self.an, self.plans, self.groups, choice)  # the pass finds its nodes by name
        return model, plan, dict(run_pass(PruneChannelsPass(plan=plan), model).summary)

    def measure(self, choice: Choice) -> tuple[float, int, int | None] | None:
        """(loss, parameters, MACs) of ``choice`` cut; None when the evaluation budget is spent."""
        from edgecomp.measure.inspect import count_parameters

        key = _key(choice)
        if key not in self.measured:
            if not key:
                return 0.0, self.params0, self.macs0
            if self.spent():
                return None
            model, _, _ = self.build(choice)
            self.evaluations += 1
            self.measured[key] = (self.evaluator.drop(model)[1], count_parameters(model), self.macs_of(model))
        return self.measured[key]

    def within(self, choice: Choice) -> bool:
        got = self.measure(choice)
        return got is not None and got[0] <= self.tolerance



def _key(choice: Choice) -> tuple:
    return tuple(sorted((r, i) for r, i in choice.items() if i))



def _combined_plan(an: Analysis, plans: dict[float, PrunePlan], groups: dict[int, _Group], choice: Choice) -> PrunePlan:
    """Every group at its chosen level (whole when absent): kept channels and rows of that level's plan."""
    first = next(iter(plans.values()))
    rows = [dict(r) for r in first.rows]
    kept: dict[int, np.ndarray] = {}
    for j, root in enumerate(an.groups()):
        g, i = groups.get(root), choice.get(root, 0)
        if g is None:
            continue
        if i == 0:
            rows[j].update(after=rows[j]["before"], threshold=None, status="kept whole")
            continue
        level_plan = plans[g.levels[i - 1][0]]
        rows[j] = dict(level_plan.rows[j])
        for a in g.atoms:
            kept[a] = level_plan.kept[a]
    return PrunePlan(an, kept, rows, first.importance)



def _prunable_groups(an: Analysis, plans: dict[float, PrunePlan]) -> dict[int, _Group]:
    """Groups some level cuts, with their distinct levels (a level that rounds to the count of a
    shallower one is dropped)."""
    out = {}
    for root, atoms in an.groups().items():
        levels: list[tuple[float, int]] = []
        for s, plan in plans.items():
            keep = len(plan.kept[atoms[0]]) if atoms[0] in plan.kept else an.sizes[root]
            if keep < (levels[-1][1] if levels else an.sizes[root]):
                levels.append((s, keep))
        if levels:
            out[root] = _Group(root, atoms, levels)
    return out



def _sweep(search: _Search, progress: bool) -> None:
    """Loss and parameters of each group cut alone, level by level, until one is past the tolerance."""
    from tqdm import tqdm

    for g in tqdm(list(search.groups.values()), desc="sensitivity", disable=None if progress else True, leave=False):
        for i in range(1, len(g.levels) + 1):
            got = search.measure({g.root: i})
            if got is None:
                return
            g.losses.append(got[0])
            g.params.append(got[1])
            g.macs.append(got[2])
            if got[0] > search.tolerance:
                break



def _priority(g: _Group, i: int, params0: int, macs0: int | None = None) -> tuple[float, int]:
    """(loss added per MAC removed, − MACs removed) of taking ``g`` from level i−1 to i; per
    parameter when the MACs are unknown."""
    loss0, p0, m0 = (g.losses[i - 2], g.params[i - 2], g.macs[i - 2]) if i > 1 else (0.0, params0, macs0)
    m1 = g.macs[i - 1] if len(g.macs) >= i else None
    removed = m0 - m1 if (m0 is not None and m1 is not None) else p0 - g.params[i - 1]
    return max(g.losses[i - 1] - loss0, 0.0) / max(removed, 1), -removed



def _step_order(groups: dict[int, _Group], params0: int, tolerance: float,
                macs0: int | None = None) -> list[tuple[int, int]]:
    """Steps (root, level), each group's in level order, the least loss per MAC removed first
    among the groups' next steps; levels past the tolerance alone are left out."""
    heads = {r: 1 for r in groups}
    order = []
    while heads:
        ready = [r for r in heads if heads[r] <= len(groups[r].losses) and groups[r].losses[heads[r] - 1] <= tolerance]
        for r in set(heads) - set(ready):
            del heads[r]
        if not ready:
            break
        r = min(ready, key=lambda r: _priority(groups[r], heads[r], params0, macs0))
        order.append((r, heads[r]))
        heads[r] += 1
    return order



def _apply(steps: Sequence[tuple[int, int]], choice: Choice | None = None) -> Choice:
    out = dict(choice or {})
    for r, i in steps:
        out[r] = i
    return out



def _search(search: _Search, order: list[tuple[int, int]]) -> Choice:
    """The deepest combined cut within the tolerance (step 4 of the module docstring); {} if none."""
    lo, hi = 0, None  # prefix lengths: lo within the tolerance, hi past it (or unmeasured)
    k = 1
    while k <= len(order):
        if not search.within(_apply(order[:k])):
            hi = k
            break
        lo, k = k, 2 * k
    else:
        if lo < len(order):
            hi = len(order) if not search.within(_apply(order)) else None
            lo = len(order) if hi is None else lo
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        if search.within(_apply(order[:mid])):
            lo = mid
        else:
            hi = mid
    choice = _apply(order[:lo])
    frozen = {order[hi - 1][0]} if hi is not None else set()
    for r, i in order[lo + (hi is not None):]:
        if r in frozen or search.spent():
            continue
        trial = _apply([(r, i)], choice)
        if search.within(trial):
            choice = trial
        else:
            frozen.add(r)
    return choice



def _fallback(search: _Search) -> Choice:
    """The single-group cut with the least loss measured (the smaller model breaking ties)."""
    best = min(((g.losses[i], g.params[i], g.root, i + 1) for g in search.groups.values() for i in range(len(g.losses))),
               default=None)
    return {} if best is None else {best[2]: best[3]}



def _group_rows(plan: PrunePlan, groups: dict[int, _Group], choice: Choice, levels: Sequence[float],
                tolerance: float, spent: bool) -> list[dict[str, Any]]:
    """The plan's rows with the sparsity reached, the loss of each level cut alone (None: not
    measured, or rounded to a shallower level's count), and why a prunable group stayed whole."""
    rows = []
    for row, root in zip(plan.rows, plan.analysis.groups()):
        row = dict(row)
        g = groups.get(root)
        measured = {} if g is None else {g.levels[i][0]: loss for i, loss in enumerate(g.losses)}
        row["sparsity"] = round(1 - row["after"] / row["before"], 4) if row["before"] else 0.0
        for s in levels:
            row[f"loss at {s:.0%}"] = measured.get(s)
        if g is not None and not choice.get(root):
            if not g.losses:
                row["status"] = "kept whole: not measured (evaluation budget spent)"
            elif g.losses[0] > tolerance:
                row["status"] = "kept whole: its smallest cut alone exceeds the tolerance"
            else:
                row["status"] = ("kept whole: not tried (evaluation budget spent)" if spent else
                                 "kept whole: its smallest cut exceeds the tolerance with the other cuts")
        rows.append(row)
    return rows



def _check(opts: PruneOptions, metric: str, tolerance: float, eval_data: Dataset | None, levels: Sequence[float],
           max_evaluations: int | None) -> None:
    from edgecomp.measure.metrics import METRICS

    opts.validate()
    if not opts.structured:
        raise OptionError("structured", "must be on with a tolerance (the search removes whole channels); "
                                        "drop the tolerance for unstructured pruning")
    if opts.scope == "global":
        raise OptionError("scope", "has no effect with a tolerance (the search sets each group's sparsity); drop it")
    if metric not in METRICS:
        raise OptionError("metric", f"must be one of {', '.join(METRICS)}, got {metric!r}")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise OptionError("tolerance", f"must be a number >= 0 (the loss allowed on eval data), got {tolerance!r}")
    if not levels or any(not 0 < s < 1 for s in levels):
        raise OptionError("levels", f"must be sparsities in (0, 1), got {list(levels)!r}")
    if max_evaluations is not None and max_evaluations < 1:
        raise OptionError("max_evaluations", f"must be >= 1, got {max_evaluations}")
    if eval_data is None:
        raise DataNeeded("eval", "tolerance", option="tolerance")



def prune_to_tolerance(model: ir.Model, opts: PruneOptions, data: Dataset | None, eval_data: Dataset, *,
                       metric: str = "cosine", tolerance: float, labels: np.ndarray | None = None,
                       levels: Sequence[float] = LEVELS, max_evaluations: int | None = None,
                       progress: bool = False) -> tuple[PruneResult, bool]:
    """Cut each group as far as the loss on ``eval_data`` allows (see the module docstring).

    ``data`` (calibration, optional) feeds activation importance and the repair, as in
    :func:`prune_model`; ``opts.sparsity`` is not read: the search sets each group's. ``model`` is
    left as it is. Returns the result and whether its loss is within ``tolerance``: when no cut is,
    the result is the least harmful single-group cut found. The group rows add the sparsity reached
    and ``loss at 25%`` … (each level cut alone); the summary adds ``metric``, ``tolerance``,
    ``loss``, ``met tolerance``, ``eval samples``, ``loss 95% upper bound`` and ``evaluations``.
    Raises :class:`NothingToPrune` when no level of any group cuts a channel.
    """
    from edgecomp.measure.inspect import count_macs, count_parameters
    from edgecomp.prune.result import PruneResult, layer_table, nothing_to_prune_message, probe_shapes, verify_pruned
    from edgecomp.prune.fidelity import below_floor, fidelity_text, held_out_fidelity
    from edgecomp.prune.repair import repair
    from edgecomp.measure.evaluate import Evaluator

    _check(opts, metric, tolerance, eval_data, levels, max_evaluations)
    t0 = time.perf_counter()
    base = model.clone()
    lift_constants(base)
    ir.passes.common.NameFixPass()(base)  # the plans name their nodes (PruneChannelsPass): unnamed nodes get one
    an = find_groups(base, opts.protect, heads="heads" in opts.kinds)
    want_act = opts.importance in ("activation", "obs") or (opts.importance == "auto" and data is not None)
    stats = (channel_stats(base, an, data, opts.max_samples, opts.threads, grams=opts.importance == "obs", part="fit")
             if (want_act and data is not None) else None)
    plans = {s: plan_pruning(an, dataclasses.replace(opts, sparsity=s, scope="per-layer"), stats)
             for s in sorted(set(levels))}
    groups = _prunable_groups(an, plans)
    if not groups:
        raise NothingToPrune(nothing_to_prune_message(next(iter(plans.values())).rows,
                                                      dataclasses.replace(opts, sparsity=max(levels))))
    evaluator = Evaluator(base, eval_data.reread(input_specs(base)), metric, labels, opts.threads)
    def macs_of(m: ir.Model) -> int | None:
        shapes = probe_shapes(m, evaluator.feeds[0])
        return count_macs(m, shapes)[0] if shapes else None

    search = _Search(base, an, plans, groups, evaluator, tolerance, max_evaluations, macs_of)
    _sweep(search, progress)
    choice = _search(search, _step_order(groups, search.params0, tolerance, search.macs0)) or _fallback(search)
    loss = search.measure(choice)[0]
    pruned, plan, cut_summary = search.build(choice)
    repaired, repair_note = [], None
    if opts.repair and data is not None:
        repaired = repair(base, pruned, plan, data, opts.max_samples, opts.ridge, opts.threads)
        if any(r.get("repair") == "applied" for r in repaired):
            search.evaluations += 1
            repaired_loss = evaluator.drop(pruned)[1]
            if repaired_loss <= loss:
                loss = repaired_loss
            else:
                repair_note = f"dropped: it raised the {metric} loss from {loss:.4g} to {repaired_loss:.4g}"
                pruned, plan, cut_summary = search.build(choice)
                repaired = []
    verify_pruned(pruned, base)
    params1 = count_parameters(pruned)
    if params1 > search.params0:
        raise PassFailed(f"pruning would raise the parameter count ({search.params0:,} → {params1:,}); "
                         "nothing was written (please report this)")
    met = loss <= tolerance
    feed = evaluator.feeds[0]
    shapes_before, shapes_after = probe_shapes(base, feed), probe_shapes(pruned, feed)
    unrepaired = "off (--no-repair)" if data is not None and not opts.repair else "no data"
    layers = layer_table(base, pruned, shapes_before, shapes_after, repaired,
                          "dropped (raised the loss)" if repair_note else unrepaired)
    macs0 = count_macs(base, shapes_before)[0] if shapes_before else None
    macs1 = count_macs(pruned, shapes_after)[0] if shapes_after else None
    fidelity = held_out_fidelity(base, pruned, data, opts.max_samples, opts.threads) if data is not None else None
    warnings = [w for w in [below_floor(fidelity) if fidelity else None] if w]
    if not met:
        warnings.append(f"no cut keeps the {metric} loss within {tolerance:g} on the eval data: the least harmful "
                        f"one found loses {loss:.4g}; raise the tolerance or protect the sensitive layers")
    if search.spent():
        warnings.append(f"the search stopped at its {max_evaluations} evaluations; some cuts were not tried")
    estimate = evaluator.estimate(pruned)  # the model returned: n and the loss's 95% upper bound
    warnings += [w for w in [estimate.warning(tolerance)] if w]
    summary = dict(cut_summary)
    summary.update({"importance": plan.importance, "scope": "per group, fitted to the tolerance",
                    "parameters": f"{search.params0:,} → {params1:,}",
                    "MACs": f"{macs0:,} → {macs1:,}" if macs0 and macs1 else None,
                    "layers repaired": sum(r.get("repair") == "applied" for r in repaired),
                    "repairs skipped": sum(str(r.get("repair")).startswith("skipped") for r in repaired) or None,
                    "repair": repair_note,
                    "fidelity": fidelity_text(fidelity) if fidelity else None,
                    "metric": metric, "tolerance": tolerance, "loss": loss, "met tolerance": met,
                    "eval samples": estimate.n, "loss 95% upper bound": estimate.upper,
                    "evaluations": search.evaluations,
                    "search": f"{len(groups)} groups × up to {len(plans)} levels ({', '.join(f'{s:.0%}' for s in plans)})",
                    "seconds": round(time.perf_counter() - t0, 1)})
    rows = _group_rows(plan, groups, choice, list(plans), tolerance, search.spent())
    return PruneResult(pruned, rows, layers, summary, fidelity, warnings), met
