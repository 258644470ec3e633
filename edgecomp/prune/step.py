"""Structured pruning: which channels move together, which to cut, and how to repair the cut.

The steps, each a plain function so tests and scripts can drive them one at a time:

1. :func:`find_groups` — dependency analysis. Every Conv (group 1), MatMul or Gemm with a
   constant weight starts an *atom* of output channels. Channel positions are propagated forward
   in graph order through ops that keep them (BatchNorm, activations, per-channel constants,
   pooling, spatial reductions, Transpose, depthwise Conv, Flatten/Reshape into a Linear), and
   stop at *consumers* that reduce over them (Conv, MatMul, Gemm input channels). A residual
   Add/Mul ties its inputs' atoms into one group; a Concat along the channel axis lays several
   atoms side by side. An op not known to keep channel positions (LayerNormalization, a
   head-splitting Reshape, Shape, ...) or a graph output leaves every atom reaching it whole,
   and the report names that op. Attention heads are matched as a pattern (Q/K/V MatMul → Reshape
   to heads → scores → Softmax → context → Reshape → output MatMul) and form one atom per block
   whose unit is a head: ``d`` columns of Q, K and V, ``d`` rows of the output projection, and the
   head count in the Reshape shapes.
2. :func:`channel_stats` — with calibration data, per consumer input feature ``E[x_c²]``
   (streamed, one sample at a time).
3. :func:`plan_pruning` — importance per channel of a group, summed over its layers:
   magnitude ``‖W_c‖₁`` or ``‖W_c‖₂`` of every weight slice the channel owns, or activation-based
   ``sqrt(E[x_c²]) · ‖W_consumer[c, :]‖₂`` (the channel's contribution to each consumer's output);
   per-layer scope removes ``sparsity`` of each group, global scope ranks scores normalized by
   each group's mean across all groups; ``round_to`` keeps channel counts multiples of N.
4. :class:`~edgecomp.prune.prune_channels.PruneChannelsPass` applies the plan.
5. :func:`repair` — ridge least squares re-fit of every consumer whose input channels were
   removed, so its outputs on calibration samples match the unpruned model's. With ``X`` the
   unpruned consumer input (plus a ones column for the bias) and ``X̃`` the pruned model's input
   on the kept channels, streaming over samples::

       A = Σ X̃ᵀX̃,  B = Σ X̃ᵀX,  C = Σ XᵀX
       W' = (A + λI')⁻¹ B W         (λ = ridge · tr(A_K) / K over the K kept features, ridge 1e-3
                                     by default; I' leaves the bias unshrunk)
       err(V) = tr(VᵀAV) − 2 tr(VᵀBW) + tr(WᵀCW),   reported as err / tr(WᵀCW)

   Every 5th sample of the data is held out (once there are 5): importance and the fit use the
   rest. A fit is refused when its rows (positions N·H·W for a conv, tokens for a MatMul) are
   fewer than its unknowns per output (``dim A``), and applied only when it lowers the error on
   the held-out samples; otherwise the layer stays as cut and the report says why.
   Memory is three ``(K+1)²`` matrices per consumer input, whatever the number of samples.
   Conv consumers are repaired only for 1x1 kernels without padding (im2col rows would make ``K``
   grow by the kernel area); larger kernels are left as cut and the report says so.
6. :func:`held_out_fidelity` — with data, the outputs of the result against the unpruned model's
   on the held-out samples (mean cosine; top-1 agreement for logits); without data,
   :func:`synthetic_fidelity` measures the same on synthesized inputs (the ones ``bench`` feeds).
7. :func:`run` applies the fidelity floor (:func:`apply_floor`, the same rule with and without
   data, for structured and unstructured pruning): a result below 0.95 mean cosine or top-1
   agreement is refused (:class:`~edgecomp.errors.BelowFloor`, nothing written) unless
   ``allow_degraded``, which writes it flagged ``degraded`` (the CLI's exit status 3). With a
   tolerance, the tolerance is the floor (unmet: exit status 3).

Before the analysis, :func:`lift_constants` turns Constant-node weights into initializers and
bypasses Identity nodes of constants. Convs of any rank (1-D ``[N, C, L]`` as 2-D) are followed;
layers inside If/Loop/Scan subgraphs are kept whole, and so is every channel a subgraph reads.
When no group can be cut, :class:`NothingToPrune` says why and nothing is written.
"""


from __future__ import annotations

import time

import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (not imported by onnx_ir itself)

from edgecomp.data import Dataset, StepData, input_specs, load_data, load_labels
from edgecomp.errors import NothingToPrune, OptionError, PassFailed
from edgecomp.graph import const_array
from edgecomp.measure.interface import keeps_interface
from edgecomp.options import need_data
from edgecomp.passes.specialize_inputs import mode_hint
from edgecomp.prune.fidelity import apply_floor, fidelity_text, held_out_fidelity, synthetic_fidelity
from edgecomp.prune.groups import PRUNABLE_OPS, find_groups, lift_constants
from edgecomp.prune.importance import channel_stats, plan_pruning
from edgecomp.prune.options import OPTIONS, PruneOptions
from edgecomp.prune.repair import repair
from edgecomp.prune.result import PruneResult, layer_table, nothing_to_prune_message, probe_shapes, verify_pruned
from edgecomp.prune.samples import feeds
from edgecomp.step import StepContext, StepResult

__all__ = ["UNSTRUCTURED_DATA", "PruneResult", "nothing_to_prune_message", "prune_model", "prune_weights", "run",
           "step_result", "verify_pruned"]


def prune_model(model: ir.Model, opts: PruneOptions, data: Dataset | None = None) -> PruneResult:
    """Analyse, rank, cut, repair and check (see the module docstring). ``model`` is changed in place.

    Raises :class:`NothingToPrune` when every group is kept whole, and ``PassFailed`` when the
    result fails the checks or would hold more parameters than the input. With ``data``, every 5th
    sample is held out: importance and repair use the rest, and the result's fidelity on the
    held-out samples is reported (with a warning below 0.95 mean cosine or top-1 agreement).
    """
    from edgecomp.measure.inspect import count_macs, count_parameters
    from edgecomp.passes.base import run_pass
    from edgecomp.prune.prune_channels import PruneChannelsPass

    opts.validate()
    t0 = time.perf_counter()
    params0 = count_parameters(model)
    lift_constants(model)
    ir.passes.common.NameFixPass()(model)  # plans and reports key layers by node name: unnamed nodes get one
    original = model.clone()
    an = find_groups(model, opts.protect, heads="heads" in opts.kinds)
    want_act = opts.importance in ("activation", "obs") or (opts.importance == "auto" and data is not None)
    stats = (channel_stats(model, an, data, opts.max_samples, opts.threads, grams=opts.importance == "obs", part="fit")
             if (want_act and data is not None) else None)
    plan = plan_pruning(an, opts, stats)
    if not plan.kept:
        computed = sum(n.op_type in PRUNABLE_OPS and len(n.inputs) > 1 and const_array(n.inputs[1]) is None
                       and n.inputs[1] is not None and n.inputs[1].producer() is not None
                       and all(const_array(v) is not None for v in n.inputs[1].producer().inputs if v is not None)
                       for n in model.graph)
        raise NothingToPrune(nothing_to_prune_message(plan.rows, opts, computed, mode_hint(model)))
    feed = next(iter(feeds(data, model, 1))) if data is not None else None
    shapes_before = probe_shapes(original, feed)
    result = run_pass(PruneChannelsPass(plan=plan), model)
    repaired = []
    if opts.repair and data is not None and result.modified:
        repaired = repair(original, model, plan, data, opts.max_samples, opts.ridge, opts.threads)
    verify_pruned(model, original)
    params1 = count_parameters(model)
    if params1 > params0:
        raise PassFailed(f"pruning would raise the parameter count ({params0:,} → {params1:,}); nothing was written "
                         "(please report this)")
    shapes_after = probe_shapes(model, feed)
    layers = layer_table(original, model, shapes_before, shapes_after, repaired,
                          "off (--no-repair)" if data is not None and not opts.repair else "no data")
    macs0 = count_macs(original, shapes_before)[0] if shapes_before else None
    macs1 = count_macs(model, shapes_after)[0] if shapes_after else None
    fidelity = (held_out_fidelity(original, model, data, opts.max_samples, opts.threads) if data is not None
                else synthetic_fidelity(original, model, threads=opts.threads))
    summary = dict(result.summary)
    summary.update({"importance": plan.importance, "scope": opts.resolved_scope(),
                    "parameters": f"{params0:,} → {params1:,}",
                    "MACs": f"{macs0:,} → {macs1:,}" if macs0 and macs1 else None,
                    "layers repaired": sum(r.get("repair") == "applied" for r in repaired),
                    "repairs skipped": sum(str(r.get("repair")).startswith("skipped") for r in repaired) or None,
                    "fidelity": fidelity_text(fidelity),
                    "data samples": data.describe_used(opts.max_samples) if data is not None else None,
                    "seconds": round(time.perf_counter() - t0, 1)})
    return PruneResult(model, plan.rows, layers, summary, fidelity)


def prune_weights(model: ir.Model, opts: PruneOptions) -> PruneResult:
    """Unstructured pruning: zero the smallest weights (:class:`PruneMagnitudePass`), checked
    against the input like structured pruning. Options that only structured pruning reads are
    refused when they are set."""
    from edgecomp.passes.base import run_pass
    from edgecomp.prune.prune_magnitude import PruneMagnitudePass

    opts.validate()
    for opt in OPTIONS:
        if opt.name in ("importance", "round_to", "kinds", "repair", "max_samples") and \
                getattr(opts, opt.name) != (tuple(opt.default) if isinstance(opt.default, list) else opt.default):
            raise OptionError(opt.name, "has no effect on unstructured pruning (it ranks weights by magnitude alone); "
                                        "drop it")
    reference = model.clone()
    result = run_pass(PruneMagnitudePass(sparsity=opts.sparsity, scope=opts.resolved_scope(), protect=opts.protect),
                      model)
    verify_pruned(result.model, reference)
    fidelity = synthetic_fidelity(reference, result.model, threads=opts.threads)  # zeros can break a model too
    return PruneResult(result.model, [], result.rows, {**result.summary, "fidelity": fidelity_text(fidelity)}, fidelity)


def _floored(result: PruneResult, opts: PruneOptions, offer_data: bool) -> PruneResult:
    """``result`` through the fidelity floor (:func:`apply_floor`); the remedies offered on a
    refusal: data (structured pruning without it), a smaller cut, protection, allow_degraded."""
    remedies = {}
    if offer_data:
        remedies["calibration"] = "give calibration data (importance, repair and a check on real inputs)"
    remedies.update(sparsity="lower sparsity", protect="protect the sensitive layers",
                    allow_degraded="allow a degraded result (allow_degraded) to write it anyway")
    apply_floor(result, opts.allow_degraded, remedies)
    return result


#: The one line both the CLI and a recipe give when unstructured pruning is handed calibration data.
UNSTRUCTURED_DATA = ("unstructured pruning ranks weights by magnitude alone: the calibration data is not read "
                     "(drop it, or prune structured to use it)")


@keeps_interface("prune")
def run(model: ir.Model, opts: PruneOptions, data: StepData, context: StepContext | None = None) -> StepResult:
    """What ``edgecomp prune`` and a recipe's prune step call: structured pruning (with the
    calibration data of ``data``, when given, for importance, repair and held-out fidelity; with
    ``opts.tolerance``, the cut fitted to it on the eval data) or unstructured magnitude pruning
    (calibration data given to it is not read, and a warning says so: the same for the CLI and
    a recipe).

    Without a tolerance, the result must keep the fidelity floor on the held-out data, or without
    data on synthesized inputs: below it, :class:`~edgecomp.errors.BelowFloor` is raised and nothing
    should be written, unless ``opts.allow_degraded`` (then status ``degraded`` and a warning)."""
    from edgecomp.passes.float_precision import refuse_unrunnable_floats

    progress = bool(context and context.progress)
    refuse_unrunnable_floats(model)  # float16 models are pruned as they are: cuts and repairs keep their dtype
    need_data(OPTIONS, {o.name: getattr(opts, o.name) for o in OPTIONS}, data.available())
    if opts.tolerance is None:
        for name, unset in (("levels", tuple(map(float, opts.levels)) == tuple(map(float, PruneOptions().levels))),
                            ("max_evaluations", opts.max_evaluations is None)):
            if not unset:
                raise OptionError(name, "applies to the tolerance search only; give a tolerance (with eval data) "
                                        "or drop it")
    if not opts.structured:
        if opts.tolerance is not None:
            raise OptionError("tolerance", "fits structured cuts; unstructured pruning takes sparsity alone")
        result = _floored(prune_weights(model, opts), opts, offer_data=False)  # magnitude alone: data cannot help
        if data.calibration:
            result.warnings.insert(0, UNSTRUCTURED_DATA)
        return step_result(result, structured=False)
    calibration = load_data(data.calibration, input_specs(model)) if data.calibration else None  # checked up front
    if opts.tolerance is None:
        return step_result(_floored(prune_model(model, opts, calibration), opts, offer_data=calibration is None))
    if opts.allow_degraded:
        raise OptionError("allow_degraded", "has no effect with a tolerance (a cut past it is written with exit "
                                            "status 3 already); drop it")
    from edgecomp.prune.tolerance import prune_to_tolerance  # it builds on this module's helpers

    ev = load_data(data.need("eval", "tolerance", "tolerance"))
    labels = load_labels(data.labels, len(ev)) if data.labels else None
    result, met = prune_to_tolerance(model, opts, calibration, ev, metric=opts.metric, tolerance=opts.tolerance,
                                     labels=labels, levels=[float(s) for s in opts.levels],
                                     max_evaluations=opts.max_evaluations, progress=progress)
    result.met_tolerance = met
    return step_result(result)


def step_result(result: PruneResult, structured: bool = True) -> StepResult:
    """``result`` in the shape every capability returns: tables groups and layers (structured) or
    layers (unstructured), the fidelity measured and the tolerance's verdict as evidence; status
    degraded (exit 3) below the floor when allowed, or past the tolerance."""
    tables = {"groups": result.groups, "layers": result.layers} if structured else {"layers": result.layers}
    out = StepResult("prune", result.model, result.summary, tables, result.warnings,
                     {"fidelity": result.fidelity, "met tolerance": result.met_tolerance})
    if result.degraded:
        out.mark("degraded", "below the fidelity floor; written because a degraded result was allowed")
    if result.met_tolerance is False:
        out.mark("degraded", "no cut stays within the tolerance; the best model found was written")
    return out
