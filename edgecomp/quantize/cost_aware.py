"""SmoothQuant kept only where it pays for its time.

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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir

from edgecomp.data import Dataset
from edgecomp.quantize.calibration import ActivationStats
from edgecomp.quantize.families import choose_families
from edgecomp.quantize.layers import Layer
from edgecomp.quantize.outputs import plan_outputs
from edgecomp.quantize.plan import make_plan
from edgecomp.quantize.quantize_static import LayerPlan

__all__ = ["unsmoothed_if_faster"]


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
