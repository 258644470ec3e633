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

import dataclasses
import re
import time
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (not imported by onnx_ir itself)

from edgecomp.data import Dataset, StepData, input_specs, load_data, load_labels
from edgecomp.errors import EdgecompError, NothingToPrune, OptionError, PassFailed
from edgecomp.graph import const_array, layer_weight
from edgecomp.io import first_line
from edgecomp.measure.interface import keeps_interface
from edgecomp.options import need_data
from edgecomp.passes.specialize_inputs import mode_hint
from edgecomp.prune.fidelity import apply_floor, fidelity_text, held_out_fidelity, synthetic_fidelity
from edgecomp.prune.groups import PRUNABLE_OPS, find_groups, lift_constants
from edgecomp.prune.importance import channel_stats, plan_pruning
from edgecomp.prune.options import OPTIONS, PruneOptions
from edgecomp.prune.repair import bias_of, repair
from edgecomp.prune.samples import feeds

__all__ = ["PruneResult", "verify_pruned", "prune_model", "prune_weights", "run"]


@dataclasses.dataclass
class PruneResult:
    model: ir.Model
    groups: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    summary: dict[str, Any]
    fidelity: dict[str, Any] | None = None  # held_out_fidelity with data, else synthetic_fidelity
    warnings: list[str] = dataclasses.field(default_factory=list)  # one line each, for stderr
    met_tolerance: bool | None = None  # with a tolerance: whether the result is within it
    degraded: bool = False  # below the fidelity floor, written because allow_degraded (apply_floor)



def _probe(model: ir.Model, feed: Mapping[str, np.ndarray] | None) -> dict[str, list[int]] | None:
    from edgecomp.data import synthesize_feed
    from edgecomp.measure.inspect import probe_shapes

    try:
        feed = dict(feed) if feed is not None else synthesize_feed(input_specs(model))
        shapes = probe_shapes(model, feed)
    except EdgecompError:  # MACs are informative only: a model we cannot probe (symbolic dims, no data) has none
        return None
    shapes.update({k: list(v.shape) for k, v in feed.items()})
    return shapes



def _layer_table(before: ir.Model, after: ir.Model, sb, sa, repaired: list[dict[str, Any]],
                 unrepaired: str = "no data") -> list[dict[str, Any]]:
    from edgecomp.measure.inspect import node_macs

    old = {n.name: n for n in before.graph if n.op_type in PRUNABLE_OPS}
    fits = {r["layer"]: r for r in repaired}
    rows = []
    for node in after.graph:
        ref = old.get(node.name)
        if ref is None or ref.op_type != node.op_type or len(node.inputs) < 2:  # unnamed nodes share the name ""
            continue
        if const_array(ref.inputs[1]) is None or const_array(node.inputs[1]) is None:
            continue
        w0, w1 = const_array(ref.inputs[1]), const_array(node.inputs[1])
        if w0.shape == w1.shape and node.name not in fits:
            continue
        k0, n0 = layer_weight(ref).shape if ref.op_type != "Conv" else (w0.shape[1], w0.shape[0])
        k1, n1 = layer_weight(node).shape if node.op_type != "Conv" else (w1.shape[1], w1.shape[0])
        b0, b1 = bias_of(ref, n0), bias_of(node, n1)
        fit = fits.get(node.name, {})
        rows.append({"layer": node.name, "op": node.op_type, "in": f"{k0}→{k1}", "out": f"{n0}→{n1}",
                     "params before": int(w0.size + np.count_nonzero(b0)), "params after": int(w1.size + np.count_nonzero(b1)),
                     "MACs before": node_macs(ref, sb) if sb else None, "MACs after": node_macs(node, sa) if sa else None,
                     "repair": fit.get("repair", "-" if k0 == k1 else unrepaired),
                     "rel err before": fit.get("rel err before"), "rel err after": fit.get("rel err after"),
                     "held-out err before": fit.get("held-out err before"),
                     "held-out err after": fit.get("held-out err after")})
    return rows



def verify_pruned(model: ir.Model, reference: ir.Model) -> None:
    """onnx.checker, onnxruntime load, and the graph's inputs and outputs unchanged — or PassFailed."""
    from edgecomp.io import check_model
    from edgecomp.runtime import make_session

    def io(m: ir.Model):
        return [(v.name, v.dtype, None if v.shape is None else tuple(str(d) for d in v.shape))
                for v in [*m.graph.inputs, *m.graph.outputs]]

    if io(model) != io(reference):
        raise PassFailed("pruning changed the graph's inputs or outputs; nothing was written (please report this)")
    try:
        check_model(model)
    except Exception as e:
        raise PassFailed(f"the pruned model fails onnx.checker ({first_line(e)}); nothing was written") from e
    try:
        make_session(model, optimization="disable")
    except Exception as e:
        raise PassFailed(f"onnxruntime cannot load the pruned model ({first_line(e)}); nothing was written") from e



def _reason_key(status: str) -> str:
    """'kept whole: LSTM (lstm_1); graph output y' → 'LSTM' (the first reason, node names dropped)."""
    first = status.removeprefix("kept whole: ").split("; ")[0].rstrip(" …")
    return re.sub(r" \([^()]*\)", "", first).strip() or "kept whole"



def nothing_to_prune_message(rows: Sequence[Mapping[str, Any]], opts: PruneOptions, computed: int = 0,
                             subgraph_hint: str = "") -> str:
    """One line naming the commonest reasons every group was kept whole (``computed``: layers
    whose weight is computed, e.g. a Transpose of an initializer; ``subgraph_hint``: said when layers sit in subgraphs)."""
    counts: dict[str, int] = {}
    for r in rows:
        key = _reason_key(str(r["status"]))
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        why = (f" ({computed} layer{'s' if computed > 1 else ''} compute their weights from constants: "
               "`edgecomp optimize` folds them)" if computed else "")
        return f"nothing to prune: no Conv, MatMul or Gemm layer with a constant weight was found{why}; nothing was written"
    top = sorted(counts.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{k}: {n} group{'s' if n > 1 else ''}" for k, n in top[:3])
    if len(top) > 3:
        text += f", {len(top) - 3} more reason{'s' if len(top) > 4 else ''}"
    hint = ""
    if "nothing below the threshold" in counts:
        hint = f"; at sparsity {opts.sparsity} the rounded channel counts keep every channel (raise sparsity or set round_to 1)"
    if "layers in subgraphs are not pruned" in text:
        hint += subgraph_hint
    return f"nothing to prune: every channel group is kept whole ({text}){hint}; nothing was written"



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
    shapes_before = _probe(original, feed)
    result = run_pass(PruneChannelsPass(plan=plan), model)
    repaired = []
    if opts.repair and data is not None and result.modified:
        repaired = repair(original, model, plan, data, opts.max_samples, opts.ridge, opts.threads)
    verify_pruned(model, original)
    params1 = count_parameters(model)
    if params1 > params0:
        raise PassFailed(f"pruning would raise the parameter count ({params0:,} → {params1:,}); nothing was written "
                         "(please report this)")
    shapes_after = _probe(model, feed)
    layers = _layer_table(original, model, shapes_before, shapes_after, repaired,
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


@keeps_interface("prune")
def run(model: ir.Model, opts: PruneOptions, data: StepData, progress: bool = False) -> PruneResult:
    """What ``edgecomp prune`` and a recipe's prune step call: structured pruning (with the
    calibration data of ``data``, when given, for importance, repair and held-out fidelity; with
    ``opts.tolerance``, the cut fitted to it on the eval data) or unstructured magnitude pruning.

    Without a tolerance, the result must keep the fidelity floor on the held-out data, or without
    data on synthesized inputs: below it, :class:`~edgecomp.errors.BelowFloor` is raised and nothing
    should be written, unless ``opts.allow_degraded`` (then ``result.degraded`` and a warning)."""
    from edgecomp.passes.float_precision import refuse_unrunnable_floats

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
        return _floored(prune_weights(model, opts), opts, offer_data=False)  # magnitude alone: data cannot help
    calibration = load_data(data.calibration, input_specs(model)) if data.calibration else None  # checked up front
    if opts.tolerance is None:
        return _floored(prune_model(model, opts, calibration), opts, offer_data=calibration is None)
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
    return result
