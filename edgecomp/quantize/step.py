"""Static int8 quantization: find layers, calibrate, plan, measure, and fall back where needed.

The steps, each a plain function so tests and scripts can drive them one at a time (a float16
model goes through them lifted to float32 by :func:`run`, and keeps its float16 interface and
float weights: :mod:`edgecomp.passes.float_precision`):

0. the model's default opset is raised to 13 (per-channel DequantizeLinear) and the graph
   cleaned up (constants folded, Constant/Identity-fed weights exposed) — before any calibration.
1. :func:`find_layers` — MatMul/Gemm with constant weights and 1-D/2-D Conv; everything else
   stays float, and a layer of a quantizable op that cannot be handled (subgraph layers included)
   is listed with the reason.
2. :func:`calibrate` — streaming activation statistics (:mod:`edgecomp.quantize.calibration`).
3. :func:`make_plan` — per layer: activation range by the calibration method; weight bits from
   the target ISA (7-bit where u8×s8 can saturate int16, i.e. x86 without VNNI); SmoothQuant
   divisor ``s_k = max|X_k|^α / max|W_k|^(1-α)`` with α chosen per activation from a grid by the
   simulated output error on reservoir rows (no smoothing is a candidate, so it is applied only
   where calibration shows it helps); bias correction ``b' = b - E[X̂Ŵ - XW]`` kept only if it
   lowers the error on held-back rows.
4. :func:`choose_families` — each op family (matmul, conv, depthwise conv) is quantized alone
   and timed interleaved against the float model on the target; a family that is not measurably
   faster in int8 stays float, and the report says so.
5. :func:`fit_tolerance` — with evaluation data, rank layers by sensitivity (quantize one at a
   time) and keep the most sensitive float until the metric is within tolerance of fp32.
   Without a tolerance, the same search runs on calibration samples whenever an output's cosine
   to float falls below ``min_cosine`` (0.99; :class:`FidelityEvaluator`, every float output).
   Then each int8 attention product's one-ulp rounding drift is measured on 16 of those samples
   (:mod:`edgecomp.quantize.attention_rounding`); one over 0.1 of the cosine budget stays float.
6. with ``int4`` (auto or regexes), :func:`edgecomp.quantize.int4.int4_step` — the planned MatMuls
   whose int4 codes (fitted to calibration data) cost least move to ``MatMulNBits`` while the same
   bound holds; the report lists them, the measured fidelity and the latency vs the int8 model.
6b. embedding tables (:mod:`edgecomp.quantize.cost_aware`): int8 rows unless their dequantizing
   Gather is timed slower beyond noise (and by >= 0.5%), or the fidelity search keeps more layers
   float with them than with float tables; ``--embeddings`` keeps them int8 untimed.
7. never slower: the written model, whole, is timed against the model as given on this host
   or on the target's device (:mod:`edgecomp.quantize.speed`); unless its 95% interval lies below 1.0, ``--families auto``
   writes the float model as given (a warning with both measurements) and forced families keep
   int8 with ``forced_not_faster`` set (the CLI's exit status 5).
"""


from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (not imported by onnx_ir itself)

from edgecomp.data import Dataset, StepData, input_specs, load_data, load_labels
from edgecomp.errors import DataNeeded, PassFailed
from edgecomp.graph import param_tensors
from edgecomp.measure.interface import keeps_interface
from edgecomp.options import compile_patterns, need_data
from edgecomp.passes.base import run_pass
from edgecomp.passes.float_precision import in_float32, refuse_unrunnable_floats
from edgecomp.passes.optimize_graph import OptimizeGraphPass
from edgecomp.passes.upgrade_opset import UpgradeOpsetPass, new_violations, opset_violations
from edgecomp.quantize.attention_rounding import drift_budget, keep_stable_attention
from edgecomp.quantize.calibration import calibrate
from edgecomp.quantize.cost_aware import fit_with_tables, int8_tables_if_they_pay, unsmoothed_if_faster
from edgecomp.quantize.families import choose_families
from edgecomp.quantize.int4 import describe, int4_step, latency_vs_int8, write_int4
from edgecomp.quantize.layers import find_layers, no_layer_message
from edgecomp.quantize.options import DATA_NEEDED, MIN_OPSET, OPSET_REASON, OPTIONS, QuantizeOptions
from edgecomp.quantize.outputs import calibrate_outputs, plan_outputs
from edgecomp.quantize.plan import bits_reason, build, make_plan
from edgecomp.quantize.quantize_static import QUANTIZED_OPS, LayerPlan
from edgecomp.quantize.speed import SpeedCheck, check_written_model
from edgecomp.measure.evaluate import Evaluator, FidelityEvaluator
from edgecomp.step import StepContext, StepResult
from edgecomp.targets import host_isa

__all__ = ["LAYER_COLUMNS", "QuantizeResult", "quantize_model", "run", "step_result"]


@dataclasses.dataclass
class QuantizeResult:
    model: ir.Model
    plan: dict[str, LayerPlan]
    rows: list[dict[str, Any]]  # per layer: decision, reason, sensitivity...
    summary: dict[str, Any]
    families: list[dict[str, Any]]
    met_tolerance: bool | None = None
    embeddings: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)  # one line each, for stderr
    attention_rounding: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # per int8 attention product
    forced_not_faster: bool = False  # forced families, written int8 not faster than float here: exit 5



def quantize_model(model: ir.Model, calibration: Dataset, opts: QuantizeOptions, *,
                   eval_data: Dataset | None = None, labels: np.ndarray | None = None,
                   optimized: bool = False) -> QuantizeResult:
    """The whole static quantization of ``model`` (a float model; it is modified in place by the
    opset upgrade and the cleanup, so the fidelity checks measure against a copy taken before).
    With ``opts.tolerance`` and ``eval_data``, the accuracy-aware fallback. Everything that can
    refuse the model — opset, layers — runs before calibration. ``optimized``: the model comes
    straight from :class:`OptimizeGraphPass` with folding on (a recipe's optimize step), so the
    cleanup is not run again unless the opset upgrade changed the graph."""
    opts.validate()
    tables = opts.embeddings  # None: int8 where it pays (cost_aware); the fidelity searches assume int8
    opts = dataclasses.replace(opts, format=opts.resolved_format(), node_units=opts.resolved_node_units(),
                               embeddings=tables is not False)
    if opts.tolerance is not None and eval_data is None:
        raise DataNeeded("eval", "tolerance", option="tolerance")
    if any(n.op_type in QUANTIZED_OPS for n in model.graph):
        raise PassFailed("the model is already quantized; give the float model")
    specs = input_specs(model)
    calibration.check_against(specs)
    if eval_data is not None:
        eval_data.check_against(specs)
    t0 = time.perf_counter()
    as_given = model.clone()
    upgrade = run_pass(UpgradeOpsetPass(min_opset=MIN_OPSET, reason=OPSET_REASON), model)
    invalid_before = opset_violations(model)
    cleanup = ("done by the optimize step before" if optimized and not upgrade.modified
               else run_pass(OptimizeGraphPass(), model).summary)
    ir.passes.common.NameFixPass()(model)
    layers, skipped = find_layers(model)
    exclude = compile_patterns(opts.exclude, "exclude pattern")
    excluded = [l for l in layers if any(p.search(l.node) for p in exclude)]
    layers = [l for l in layers if l not in excluded]
    if not layers:
        raise PassFailed(no_layer_message(model, skipped, excluded))
    stats = calibrate(model, layers, calibration, opts)
    if opts.format == "qdq" and opts.node_units:  # whole node units: every layer's output gets a calibrated grid too
        stats.update(calibrate_outputs(model, layers, calibration, opts, stats))
    plan, rows = make_plan(model, layers, stats, opts, calibration)
    if opts.format == "qdq" and opts.node_units:
        plan_outputs(model, plan, layers, stats, opts)
    feed, *more = calibration.feeds_for(specs, 2)
    families, family_rows = choose_families(model, layers, plan, feed, opts, confirm_feed=next(iter(more), None))
    plan, rows, families, family_rows = unsmoothed_if_faster(model, layers, stats, opts, calibration, plan, rows,
                                                             families, family_rows, feed, next(iter(more), None))
    family = {l.node: l.family for l in layers}  # not family_of per entry: a scan of the layers each
    plan = {k: v for k, v in plan.items() if family[k] in families}
    met, loss, sens, kept = None, None, {}, []
    fidelity, table_line = None, None  # table_line: the int8 tables' decision, when fidelity or timing made it
    kept_why = "among the most sensitive: kept float to meet the tolerance"
    if opts.tolerance is not None and plan:
        evaluator = Evaluator(as_given, eval_data.reread(specs, _target_limit(opts)), opts.metric, labels,
                              opts.threads, runner=opts.target_runner)
        (plan, sens, kept, met, loss), table_line = fit_with_tables(model, plan, evaluator, opts.tolerance, opts, tables)
    elif opts.tolerance is None and opts.min_cosine is not None and plan:
        # no accuracy target given: still never write a model whose outputs drift from float on
        # the calibration samples (a per-tensor output grid can wreck a downstream magnitude or
        # recurrent state that no per-layer statistic shows)
        limit = min(opts.fidelity_samples, _target_limit(opts) or opts.fidelity_samples)
        evaluator = FidelityEvaluator(as_given, list(calibration.feeds_for(specs, limit)), opts.threads,
                                      runner=opts.target_runner)
        floor = float(opts.min_cosine)
        (plan, sens, kept, ok, fid_loss), table_line = fit_with_tables(model, plan, evaluator, 1.0 - floor, opts,
                                                                       tables)
        fidelity = {"fidelity": f"lowest output cosine {1.0 - fid_loss:.4f} on {len(evaluator.feeds)} calibration "
                                f"samples (floor {floor:g}{'' if ok else ', not met'})"}
        if kept:
            fidelity["fidelity"] += f"; {len(kept)} most sensitive layer(s) kept float to reach it"
        kept_why = f"among the most sensitive: kept float so every output keeps cosine >= {floor:g} to float"
    if table_line:  # the int8 tables cost fidelity the float ones do not: float tables
        opts = dataclasses.replace(opts, embeddings=False)
    unstable, drift = {}, None
    budget = drift_budget(opts.tolerance, opts.metric, opts.min_cosine)
    if plan and budget is not None:  # the rounding drift of int8 attention products
        stable, drift = keep_stable_attention(model, plan, _first(evaluator.feeds, 16), budget, opts.threads, opts.format)
        unstable = {r["product"]: r["reason"] for r in (drift.rows() if drift else []) if r["decision"] == "float"}
        plan = stable
    int8_plan = plan
    int4 = int4_step(model, plan, calibration, opts, eval_data=eval_data, labels=labels, reference=as_given)
    if int4:
        plan = {k: v for k, v in plan.items() if k not in int4.codes}
    for row in rows:
        name = row["layer"]
        if name in sens:
            row["sensitivity"] = sens[name]
        if name in plan:
            row["decision"], row["reason"] = "int8", "quantized"
        elif name in kept:
            row["decision"], row["reason"] = "float", kept_why
        elif name in unstable:
            row["decision"], row["reason"] = "float", unstable[name]
        else:
            row["decision"], row["reason"] = "float", (row.pop("float reason", None)
                                                       or f"{row['family']} family: int8 not measurably faster here")
    rows += [{"layer": l.node, "op": l.op, "family": l.family, "decision": "float", "reason": "--exclude"}
             for l in excluded]
    rows += skipped
    quantized = build(model, plan, format=opts.format) if plan else model
    if int4 and int4.codes:
        quantized, int4_form = write_int4(model, int8_plan, int4.codes, opts)
    embedding_rows = []
    if opts.embeddings:
        choice = int8_tables_if_they_pay(quantized, feed, opts, tables)
        quantized, embedding_rows, table_line = choice.model, choice.rows, choice.line
    invalid = new_violations(quantized, invalid_before)
    if invalid:
        raise PassFailed(f"the quantized model has a node its opset does not allow: {invalid[0]}")
    check = _check_speed(as_given, quantized, feed, opts, family_rows) if (plan or (int4 and int4.codes)) else None
    if check is not None and check.falls_back:  # never slower than the input: write the float model as given
        quantized, plan, int4, embedding_rows = as_given, {}, None, []
        met = True if met is not None else None
        for row in rows:
            if row["decision"] in ("int8", "int4"):
                row["decision"], row["reason"] = "float", "the whole int8 model was not faster than float here"
    layouts = sorted({f"{p.act_bits}/{p.weight_bits}" for p in plan.values()})
    summary = {"layers int8": len(plan), "layers float": len(rows) - len(plan), "bits a/w": ", ".join(layouts),
               "bits reason": bits_reason(opts), "format": opts.format,
               "activations": "uint8 asymmetric, per tensor, static",
               "method": opts.method, "calibration samples": calibration.describe_used(opts.max_samples),
               "cleanup": cleanup, "seconds": round(time.perf_counter() - t0, 1)}
    if table_line and (embedding_rows or not opts.embeddings):
        summary["embedding tables"] = table_line
    if opts.families == "auto":
        summary["families evidence"] = (opts.table.describe() if opts.table is not None else
                                        next((r["evidence"] for r in family_rows if "evidence" in r), ""))
    if upgrade.modified:
        summary = {"opset": upgrade.summary["opset"], **summary}
    warnings = []
    if loss is not None:
        estimate = evaluator.estimate(quantized)  # the model written: n and the loss's 95% upper bound
        summary.update({"metric": opts.metric, "tolerance": opts.tolerance, "loss": loss, "met tolerance": met,
                        "eval samples": estimate.n, "loss 95% upper bound": estimate.upper})
        warnings += [w for w in [estimate.warning(opts.tolerance)] if w]
    if fidelity:
        summary.update(fidelity)
    if drift is not None and plan:
        summary["attention rounding"] = drift.describe()
    if opts.target_runner is not None and (fidelity or loss is not None):
        summary["numerics judged on"] = opts.target_runner.describe()
    if int4:
        summary.update(describe(int4, rows, len(plan)))
        if int4.codes:
            summary["int4 form"] = int4_form
        summary["layers float"] -= len(int4.codes)
        if int4.codes and opts.isa in (None, host_isa()):
            speed = latency_vs_int8(model, int8_plan, quantized, feed, opts)
            summary["int4 latency vs int8 (this host)"] = speed.text()
            if speed.low > 1.0:
                warnings.append(f"the int4 model runs {speed.ratio:.2f}x the int8 model's latency on this host "
                                f"({speed.text()})" + (": MatMulNBits is slower than MatMulIntegerToFloat here"
                                                       if int4_form == "MatMulNBits" else ""))
    if check is not None:
        summary.update(check.summary())
        warnings += [w for w in [check.warning()] if w]
    elif plan or (int4 and int4.codes):
        target = "runs emulated" if opts.target_runner is not None else f"({opts.isa.describe()}) is not this host"
        summary["latency decision"] = f"not timed: the target {target}"
    if not plan and not (int4 and int4.codes) and not (check and check.falls_back):
        why = ("every planned layer was kept float by the fidelity check" if families else
               next((r["reason"] for r in family_rows if r.get("reason")), "no family was chosen"))
        warnings.append(f"no layer was made int8 ({why}); the weights written are float"
                        + ("" if opts.families != "auto" else " (families all forces int8)"))
    return QuantizeResult(quantized, plan, rows, summary, family_rows, met, embedding_rows, warnings,
                          drift.rows() if drift is not None and plan else [],  # none when float was written
                          forced_not_faster=bool(check and check.forced_not_faster))


def _first(feeds, n: int) -> list:
    """The first ``n`` feeds of a list or a lazily read dataset."""
    return [feeds[i] for i in range(min(n, len(feeds)))]


def _target_limit(opts: QuantizeOptions) -> int | None:
    """How many samples an emulated target runs (None: no target runner, every sample)."""
    return opts.target_runner.max_samples if opts.target_runner is not None else None


def _check_speed(given: ir.Model, quantized: ir.Model, feed, opts: QuantizeOptions,
                 family_rows: list[dict[str, Any]]) -> SpeedCheck | None:
    """The written model timed against the float model as given on this host (None when the
    target is another ISA or runs emulated: this host's latency says nothing about it); on the
    target's device when it has one."""
    if opts.device is None and (opts.isa not in (None, host_isa()) or opts.target_runner is not None):
        return None
    chosen = next((r for r in family_rows if r.get("decision") == "chosen"), None)
    evidence = (f"{chosen['families']} at {chosen['latency ratio int8/float']:.3f} {chosen['95% interval']} over "
                f"{chosen['rounds']} rounds" if chosen else "")
    return check_written_model(given, quantized, feed, opts.threads, opts.families, evidence, device=opts.device)


#: What a terminal shows of the per-layer table (--json and report.json get every key).
LAYER_COLUMNS = ("layer", "op", "family", "decision", "reason", "sensitivity", "smoothquant α", "bias corrected",
                 "act range", "sim error")


@keeps_interface("quantize")
def run(model: ir.Model, opts: QuantizeOptions, data: StepData, context: StepContext | None = None) -> StepResult:
    """What ``edgecomp quantize`` and a recipe's quantize step call: :func:`quantize_model` on the
    calibration (and, with a tolerance, eval) data named by ``data``. With ``context.done``
    naming an optimize pass with folding on, the cleanup is not run twice."""
    refuse_unrunnable_floats(model)
    opts.validate()
    need_data(OPTIONS, {o.name: getattr(opts, o.name) for o in OPTIONS}, data.available(), DATA_NEEDED)
    calibration = load_data(data.calibration)
    ev = load_data(data.need("eval", "tolerance", "tolerance")) if opts.tolerance is not None else None
    labels = load_labels(data.labels, len(ev)) if (ev is not None and data.labels) else None
    given = model.clone()  # lifting a float16 model works in place; the clone keeps its tensors
    optimized = bool(context and context.done.get("optimize", {}).get("fold_constants"))
    # a float16 model is quantized in float32 and keeps its float16 interface and float weights
    result = in_float32(model, lambda m: quantize_model(m, calibration, opts, eval_data=ev, labels=labels,
                                                        optimized=optimized))
    return step_result(_never_bigger_when_float(result, given))


def step_result(result: QuantizeResult) -> StepResult:
    """``result`` in the shape every capability returns: tables op families, layers and embedding
    tables; the tolerance's verdict and the layers made int8 as evidence; exit 3 when the
    tolerance was not met, 5 when forced int8 is not faster than its input here."""
    out = StepResult("quantize", result.model, result.summary,
                     {"op families": result.families, "layers": result.rows, "embedding tables": result.embeddings,
                      "attention rounding": result.attention_rounding},
                     result.warnings, {"met tolerance": result.met_tolerance, "int8 layers": sorted(result.plan)},
                     columns={"layers": LAYER_COLUMNS})
    if result.met_tolerance is False:
        out.mark("degraded", "the tolerance was not met; the best model found was written")
    if result.forced_not_faster:
        out.mark("not faster", "the forced families' int8 model is not faster than its input here")
    return out


def _never_bigger_when_float(result: QuantizeResult, given: ir.Model) -> QuantizeResult:
    """A run that left everything float (no int8 or int4 layer, no int8 table) writes the model as
    given when its own float copy would be bigger (a float16 model's weights behind Casts)."""
    changed = any(r.get("decision") in ("int8", "int4") for r in [*result.embeddings, *result.rows])
    if changed or _param_bytes(result.model) <= _param_bytes(given):
        return result
    result.model = given
    result.summary["written"] = "the model as given (nothing was made int8; its float copy would be bigger)"
    return result


def _param_bytes(model: ir.Model) -> int:
    return sum(t.nbytes for t in param_tensors(model.graph))
