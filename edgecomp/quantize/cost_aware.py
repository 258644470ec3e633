"""SmoothQuant and int8 embedding tables kept only where they pay for their time.

SmoothQuant lowers the int8 error of a layer by dividing its activation per channel; where the
division cannot be folded into the producer (:mod:`edgecomp.passes.fold_smoothquant`) it is a
float ``Mul`` over the whole activation, on every run. On a large layer that is a few percent of
its int8 GEMM; on a small model (the zoo's tiny encoders: hidden 64, 16 tokens) the extra nodes
cost as much as int8 saves, and the interleaved family timing then finds int8 not faster than
float and writes the model float — so onnxruntime's dynamic mode, which has no such Muls, wins.

The rule, measured: with ``smooth auto`` and ``families auto``, when the family timing keeps every
family float for a plan with SmoothQuant, the same layers are planned without it and timed again;
int8 without SmoothQuant is chosen only when that timing finds it faster than float (beyond noise,
twice, as every family decision), and the fidelity floor or the tolerance is applied to it after,
as to any plan. A model whose int8 is faster with SmoothQuant keeps it (all-MiniLM-L6-v2).

The int8 embedding table (:class:`edgecomp.embeddings.quantize_embeddings.QuantizeEmbeddingsPass`)
shrinks the file (a 1000 x 64 table: 256 KB -> 68 KB) but turns one float ``Gather`` into a
``Gather`` of int8 rows, a ``Gather`` of their scales, a ``Cast`` and a ``Mul``: on a large model
the three extra nodes are lost in the noise, on the zoo's tiny encoders they cost 1-3% of the whole
run (measured: 1.006-1.031x). :func:`int8_tables_if_they_pay` decides, with ``tables`` the user's
``--embeddings`` choice:

- ``True`` (the user asked for size): int8, not timed;
- ``None`` (auto) on this host or the target's device: the model with int8 tables is timed against
  the same model with float tables by the whole-model protocol of :mod:`edgecomp.quantize.speed`
  (interleaved rounds, ratio of medians, Student-t 95% interval, rounds until it excludes 1.0);
  the tables stay float only when the whole interval lies above 1.0 (slower beyond noise) and the
  ratio is at least ``1 + TABLE_MARGIN`` (the families' rule turned round: int8 layers must win by
  3%). An interval on 1.0 keeps int8: the size gain is certain, a slowdown within noise is not,
  so noise can only keep the smaller file, and the whole-model check after still keeps the
  written model faster than its input. The margin keeps a large model's table int8 on an idle
  machine, where tight intervals resolve any cost: all-MiniLM-L6-v2's table is 35 MB of float
  against three elementwise nodes over 128 x 384 values in a 6-layer run (well under 0.5%), while
  the tiny encoders' 1-3% is over it. The float table is exact, so dropping it never costs fidelity; the
  fidelity floor and the tolerance were met with the int8 table, the worse of the two.
- ``None`` on a target that is not timed here (another ISA, an emulated runner): int8, and the
  report says it was not timed.

The reverse, for fidelity: the fidelity floor and the tolerance search
(:func:`edgecomp.quantize.tolerance.fit_tolerance`) judge candidates with the int8 tables. Under
auto, when that search has to keep layers float (or misses the bound), :func:`fit_with_tables`
runs it again with float tables; the float tables are chosen when the bound is then met where it
was missed, or met with fewer layers kept float: a table whose rows int8 cannot hold (an outlier
column flattens a row's other values to zero) must not cost the int8 speed of the layers, nor
break the bound. A user's ``--embeddings`` keeps the int8 tables and the first search.

The report's ``embedding tables`` line states the decision and its measurement; each table's row
carries the same evidence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir

from edgecomp.data import Dataset
from edgecomp.embeddings.quantize_embeddings import QuantizeEmbeddingsPass, find_embedding_tables
from edgecomp.passes.base import run_pass
from edgecomp.quantize import speed
from edgecomp.quantize.calibration import ActivationStats
from edgecomp.quantize.families import choose_families
from edgecomp.quantize.layers import Layer
from edgecomp.quantize.outputs import plan_outputs
from edgecomp.quantize.plan import make_plan
from edgecomp.quantize.quantize_static import LayerPlan
from edgecomp.quantize.tolerance import fit_tolerance
from edgecomp.targets import host_isa

__all__ = ["TABLE_MARGIN", "TableChoice", "fit_with_tables", "int8_tables_if_they_pay", "unsmoothed_if_faster"]

TABLE_MARGIN = 0.005  # int8 tables go float only when at least this much slower (beyond noise too)


def unsmoothed_if_faster(model: ir.Model, layers: Sequence[Layer], stats: Mapping[str, ActivationStats], opts: Any,
                         calibration: Dataset, plan: dict[str, LayerPlan], rows: list[dict[str, Any]],
                         families: set[str], family_rows: list[dict[str, Any]], feed, confirm_feed
                         ) -> tuple[dict[str, LayerPlan], list[dict[str, Any]], set[str], list[dict[str, Any]]]:
    """``(plan, rows, families, family_rows)``: as given, or — when no family was chosen for a plan
    with SmoothQuant under ``smooth auto`` / ``families auto`` — the plan without SmoothQuant if its
    family timing chooses int8 (see the module docstring)."""
    if (families or opts.smooth != "auto" or opts.families != "auto"
            or not any(p.smooth is not None for p in plan.values())):
        return plan, rows, families, family_rows
    plain = dataclasses.replace(opts, smooth="off")
    plan2, rows2 = make_plan(model, layers, stats, plain, calibration)
    if opts.format == "qdq" and opts.node_units:
        plan_outputs(model, plan2, layers, stats, plain)
    families2, family_rows2 = choose_families(model, layers, plan2, feed, plain, confirm_feed=confirm_feed)
    if not families2:  # float either way: the family table already says why
        return plan, rows, families, family_rows
    note = {"families": "(SmoothQuant off)", "decision": "replanned",
            "reason": "every family was float with SmoothQuant's Muls; planned without SmoothQuant, int8 is faster"}
    for row in rows2:
        if row.get("family") == "matmul":
            row["smoothquant α"] = "off: its Muls cost the int8 speed-up (timed)"
    return plan2, rows2, families2, [*family_rows, note, *family_rows2]


@dataclasses.dataclass
class TableChoice:
    """The model with its embedding tables as decided, their rows, and the report's line."""

    model: ir.Model
    rows: list[dict[str, Any]]
    line: str | None = None  # None: no table could be made int8
    estimate: Any = None  # edgecomp.measure.bench.RatioEstimate: int8 tables over float tables, when timed


def int8_tables_if_they_pay(model: ir.Model, feed, opts: Any, tables: bool | None) -> TableChoice:
    """``model`` (the quantized model, float tables) with its embedding tables int8 or float as the
    module docstring says; ``tables`` is the user's ``--embeddings`` (None: auto). ``model`` is
    not modified."""
    emb = run_pass(QuantizeEmbeddingsPass(bits=8), model.clone())
    int8 = [r for r in emb.rows if r.get("decision") == "int8"]
    if not int8:
        return TableChoice(emb.model, emb.rows)
    saved = sum(r["bytes before"] - r["bytes after"] for r in int8) / 1e3
    size = f"{len(int8)} table(s) int8, {saved:.0f} KB smaller"
    if tables:
        return TableChoice(emb.model, emb.rows, f"{size}: --embeddings asked for them (not timed)")
    if opts.device is None and (opts.isa not in (None, host_isa()) or opts.target_runner is not None):
        return TableChoice(emb.model, emb.rows, f"{size}: not timed (the target is not this host)")
    where = opts.device.transport.address if opts.device is not None else "this host"
    est = speed.time_against_input(model, emb.model, feed, opts.threads, device=opts.device)
    measured = f"latency with int8 / with float tables {est.text()} on {where}"
    if est.low <= 1.0:  # not slower beyond noise: the size gain is certain
        return TableChoice(emb.model, emb.rows, f"{size}: {measured}, not slower beyond noise", est)
    if est.ratio < 1.0 + TABLE_MARGIN:
        return TableChoice(emb.model, emb.rows, f"{size}: {measured}, under {TABLE_MARGIN:.1%} slower", est)
    for r in int8:
        r["decision"], r["reason"] = "float", f"its dequantizing Gather is slower: {est.text()} (timed)"
        for key in ("bytes after", "ratio", "max abs err", "rel rms err"):  # what int8 would have been
            r.pop(key, None)
    line = (f"float, kept as given: {measured}, slower beyond noise (int8 would save {saved:.0f} KB; "
            "--embeddings keeps them int8 for size)")
    return TableChoice(model, emb.rows, line, est)


def fit_with_tables(model: ir.Model, plan: dict[str, LayerPlan], evaluator: Any, bound: float, opts: Any,
                    tables: bool | None) -> tuple[tuple, str | None]:
    """:func:`fit_tolerance`'s result with the int8 tables (``opts.embeddings``), or under auto
    (``tables`` None) with float tables where those meet ``bound`` with fewer layers kept float or
    meet it where the int8 tables miss it (see the module docstring); and the report's line when
    the float tables were chosen (None otherwise)."""
    first = fit_tolerance(model, plan, evaluator, bound, opts.progress, opts.embeddings, opts.format)
    _, _, kept, met, loss = first
    if (tables is not None or not opts.embeddings or (met and not kept)
            or not find_embedding_tables(model, QuantizeEmbeddingsPass().min_rows)[0]):
        return first, None
    second = fit_tolerance(model, plan, evaluator, bound, opts.progress, False, opts.format)
    if (second[3], -len(second[2])) <= (met, -len(kept)):
        return first, None
    return second, (f"float, kept as given: with int8 tables the fidelity search kept {len(kept)} layer(s) float "
                    f"(loss {loss:.3g}{'' if met else ', bound ' + format(bound, '.3g') + ' missed'}); with float "
                    f"tables {len(second[2])} (loss {second[4]:.3g}); --embeddings keeps them int8 for size")
