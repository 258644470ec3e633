"""The per-layer plan: bit widths by target ISA, SmoothQuant alpha chosen by simulated error,
bias correction, and the quantized model built from it.

The simulation fake-quantizes activations ``x`` and weights ``W`` on the calibration ranges and
measures ``‖xW − Q(x/s) Q(sW)‖² / ‖xW‖²`` for each smoothing vector ``s = max|x|^α / max|W|^(1−α)``;
the α with the least error wins (α = none when smoothing does not help).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.data import Dataset, input_specs
from edgecomp.embeddings.quantize_embeddings import QuantizeEmbeddingsPass
from edgecomp.graph import attribute
from edgecomp.passes.base import run_pass
from edgecomp.passes.fold_smoothquant import FoldSmoothQuantPass
from edgecomp.passes.keep_layernorm import KeepLayerNormPass
from edgecomp.quantize.attention import plan_attention, simulate_attention
from edgecomp.quantize.calibration import (
    ActivationStats,
    calibration_feeds,
    choose_range,
    collect_histograms,
    sessions_for,
)
from edgecomp.quantize.layers import Layer
from edgecomp.quantize.options import QuantizeOptions
from edgecomp.quantize.qparams import quantize_weight, uint8_qparams
from edgecomp.quantize.quantize_static import LayerPlan, QuantizeStaticPass, matmul_parts
from edgecomp.targets import host_isa

__all__ = ["ALPHAS", "make_plan", "build"]


ALPHAS = (0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)



def bit_layouts(opts: QuantizeOptions) -> list[tuple[int, int]]:
    """Candidate (activation bits, weight bits) per activation, safest first."""
    isa = opts.isa or host_isa()
    if str(opts.weight_bits) != "auto":
        wb = int(opts.weight_bits)
        return [(8 if (wb == 7 or not isa.u8s8_saturates) else 7, wb)]
    if isa.u8s8_saturates:
        return [(8, 7), (7, 8)]
    return [(8, 8)]



def bits_reason(opts: QuantizeOptions) -> str:
    isa = opts.isa or host_isa()
    if str(opts.weight_bits) != "auto":
        return f"--weight-bits {opts.weight_bits} ({isa.describe()})"
    if isa.u8s8_saturates:
        return (f"{isa.describe()}: u8×s8 pairs are summed in int16 (VPMADDUBSW) and can saturate; each activation "
                "uses either 7-bit weights or 7-bit activations, whichever simulates lower error")
    return f"{isa.describe()}: int8 dot products accumulate in int32, full 8-bit activations and weights"



def _matmul_weight(nodes: Mapping[str, ir.Node], layer: Layer) -> np.ndarray:
    return matmul_parts(nodes[layer.node])[0]



def _fake_quant_act(x: np.ndarray, lo: float, hi: float, levels: int = 255) -> np.ndarray:
    scale, zp = uint8_qparams(lo, hi, levels)
    return (np.clip(np.round(x / scale) + int(zp), 0, levels) - int(zp)) * scale



def _simulate(x: np.ndarray, ws: Sequence[np.ndarray], s: np.ndarray | None, st: ActivationStats, act_bits: int,
              w_bits: int, per_channel: bool, deltas: Sequence[np.ndarray] | None = None) -> tuple[float, list[np.ndarray]]:
    """Relative squared error of the int8 products x·W over all consumers W (minus ``deltas``,
    the bias corrections), and each consumer's mean output error.

    The activation grid spans the (smoothed) per-channel min/max: the histogram methods' ranges
    depend on the smoothing being chosen here, so candidates are compared on the minmax grid."""
    div = np.ones(x.shape[1], np.float32) if s is None else s
    lo, hi = float((st.ch_min / div).min()), float((st.ch_max / div).max())
    xq = _fake_quant_act(x / div, lo, hi, 255 if act_bits == 8 else 127)
    num = den = 0.0
    means = []
    for i, w in enumerate(ws):
        y = x @ w
        wq, sc = quantize_weight(w * div[:, None], w_bits, axis=1, per_channel=per_channel)
        diff = xq @ (wq.astype(np.float32) * sc) - y
        if deltas is not None:
            diff -= deltas[i]
        num += float((diff ** 2).sum())
        den += float((y ** 2).sum())
        means.append(diff.mean(0))
    return num / max(den, 1e-30), means



def _smoothing(alpha: float, st: ActivationStats, ws: Sequence[np.ndarray]) -> np.ndarray:
    wmax = np.max([np.abs(w).max(1) for w in ws], axis=0)
    s = np.maximum(st.ch_absmax, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)
    return np.clip(s, 1e-2, 1e2).astype(np.float32)



def make_plan(model: ir.Model, layers: Sequence[Layer], stats: Mapping[str, ActivationStats], opts: QuantizeOptions,
              data: Dataset | None = None) -> tuple[dict[str, LayerPlan], list[dict[str, Any]]]:
    """Per-layer parameters and a row per layer saying what was chosen and why."""
    layouts = bit_layouts(opts)
    nodes = {n.name: n for n in model.graph}
    by_act: dict[str, list[Layer]] = {}
    for layer in layers:
        by_act.setdefault(layer.act, []).append(layer)
    smooth: dict[str, np.ndarray] = {}
    layout: dict[str, tuple[int, int]] = {}
    info: dict[str, dict[str, Any]] = {}
    tied = _weight_tied_activations(nodes, layers)
    for act, group in by_act.items():
        mm = [l for l in group if l.family == "matmul"]
        if not mm or act in tied:
            continue
        st = stats[act]
        ws = [_matmul_weight(nodes, l) for l in mm]
        alphas = (None, *ALPHAS) if opts.smooth == "auto" else (None,) if opts.smooth == "off" else (float(opts.smooth),)
        best = (np.inf, None, None, layouts[0])
        base = None
        for ab, wb in layouts:
            for a in alphas:
                s_ = None if a is None else _smoothing(a, st, ws)
                err, _ = _simulate(st.rows, ws, s_, st, ab, wb, opts.per_channel)
                if a is None and base is None:
                    base = err
                if err < best[0]:
                    best = (err, a, s_, (ab, wb))
        if best[2] is not None:
            smooth[act] = best[2]
        layout[act] = best[3]
        info[act] = {"sim error": best[0], "sim error unsmoothed": base, "alpha": best[1]}
    for acts in {id(c): c for c in tied.values()}.values():
        # one weight read by several layers is stored once: no smoothing (it would scale each call
        # site's copy differently) and one bit layout for all of its activations
        ws = {a: [_matmul_weight(nodes, l) for l in by_act[a] if l.family == "matmul"] for a in acts}
        errs = {(ab, wb): {a: _simulate(stats[a].rows, ws[a], None, stats[a], ab, wb, opts.per_channel)[0] for a in acts}
                for ab, wb in layouts}
        choice = min(layouts, key=lambda lw: sum(errs[lw].values()))
        for a in acts:
            layout[a] = choice
            info[a] = {"sim error": errs[choice][a], "sim error unsmoothed": errs[choice][a], "alpha": None}
    if opts.method != "minmax" and data is not None:
        collect_histograms(sessions_for(model, opts.threads), stats,
                           calibration_feeds(data, input_specs(model), opts.max_samples), smooth,
                           progress="histograms" if opts.progress else None)
    plan: dict[str, LayerPlan] = {}
    rows: list[dict[str, Any]] = []
    for layer in layers:
        if layer.family == "attention":
            plan[layer.node], row = plan_attention(nodes[layer.node], layer, stats, opts.method, opts.percentile,
                                                   layouts[0])
            rows.append(row)
            continue
        st = stats[layer.act]
        s = smooth.get(layer.act)
        lo, hi = choose_range(st, opts.method, opts.percentile, s)
        ab, wb = layout.get(layer.act, layouts[0])
        scale, zp = uint8_qparams(lo, hi, 255 if ab == 8 else 127)
        kind = {"Conv": "conv", "Gemm": "gemm", "Add": "add"}.get(layer.op, "matmul")
        lp = LayerPlan(layer.node, kind, layer.act, float(scale), int(zp), weight_bits=wb, act_bits=ab,
                       per_channel=opts.per_channel, smooth=s)
        row = {"layer": layer.node, "op": layer.op, "family": layer.family, "act range": f"[{lo:.3g}, {hi:.3g}]",
               "bits a/w": f"{ab}/{wb}"}
        if layer.family == "matmul":
            row.update(_plan_bias_correction(lp, nodes, layer, st, opts))
            row["smoothquant α"] = info.get(layer.act, {}).get("alpha")
            row["sim error"] = info.get(layer.act, {}).get("sim error")
        elif layer.op == "Conv":
            ost = stats[layer.out_value]
            olo, ohi = choose_range(ost, opts.method, opts.percentile)
            lp.out_scale, lp.out_zp = (float(v) for v in uint8_qparams(olo, ohi))
            lp.out_after = layer.out_after
        plan[layer.node] = lp
        rows.append(row)
    _gate_attention(model, layers, plan, rows, opts, data)
    return plan, rows


def _gate_attention(model: ir.Model, layers: Sequence[Layer], plan: dict[str, LayerPlan], rows: list[dict[str, Any]],
                    opts: QuantizeOptions, data: Dataset | None) -> None:
    """With families auto, attention products whose simulated int8 error exceeds the worst planned
    weight layer's stay float (:mod:`edgecomp.quantize.attention`); a family named by the user is
    quantized whole (the fidelity floor and the tolerance still apply)."""
    weight_errors = [r["sim error"] for r in rows if r.get("sim error") is not None]
    if (opts.families != "auto" or data is None or not weight_errors
            or not any(p.kind == "attention" for p in plan.values())):
        return
    errors = simulate_attention(model, layers, plan, calibration_feeds(data, input_specs(model), 4), opts.threads)
    worst = max(weight_errors)
    for row in rows:
        err = errors.get(row["layer"])
        if err is None:
            continue
        row["sim error"] = err
        if err > worst:
            del plan[row["layer"]]
            row["float reason"] = f"simulated int8 error {err:.2g} above the worst weight layer's {worst:.2g}"



def _weight_tied_activations(nodes: Mapping[str, ir.Node], layers: Sequence[Layer]) -> dict[str, list[str]]:
    """Activations linked through MatMul/Gemm layers that share one weight initializer (ALBERT's
    shared layers), each mapped to its connected group; activations of unshared weights are absent."""
    by_weight: dict[tuple, list[str]] = {}
    for l in layers:
        if l.family != "matmul":
            continue
        node = nodes[l.node]
        trans = node.op_type == "Gemm" and attribute(node, "transB", 0)
        by_weight.setdefault((node.inputs[1].name, bool(trans)), []).append(l.act)
    group: dict[str, list[str]] = {}
    for acts in by_weight.values():
        if len(acts) < 2:
            continue
        merged = list(dict.fromkeys(acts))
        for a in acts:
            if a in group and group[a] is not merged:
                merged += [b for b in group[a] if b not in merged]
        for a in merged:
            group[a] = merged
    return group



def _plan_bias_correction(lp: LayerPlan, nodes, layer: Layer, st: ActivationStats, opts: QuantizeOptions) -> dict[str, Any]:
    if opts.bias_correction == "off" or st.rows is None or len(st.rows) < 4:
        return {"bias corrected": False}
    w = _matmul_weight(nodes, layer)
    fit, check = st.rows[0::2], st.rows[1::2]
    args = (lp.smooth, st, lp.act_bits, lp.weight_bits, lp.per_channel)
    _, (delta,) = _simulate(fit, [w], *args)
    if opts.bias_correction == "auto":
        before, _ = _simulate(check, [w], *args)
        after, _ = _simulate(check, [w], *args, deltas=[delta])
        if after >= before:
            return {"bias corrected": False}
    lp.bias_delta = delta.astype(np.float32)
    return {"bias corrected": True}



def build(model: ir.Model, plan: Mapping[str, LayerPlan], embeddings: bool = False,
          format: str = "contrib") -> ir.Model:
    """A quantized copy of ``model`` (the float model is untouched) in ``format`` (contrib | qdq);
    ``embeddings`` also stores embedding tables in row-wise int8."""
    out = run_pass(QuantizeStaticPass(plan=plan, format=format), model.clone()).model
    if any(p.smooth is not None for p in plan.values()):  # SmoothQuant's Muls folded where exact
        out = run_pass(FoldSmoothQuantPass(), out).model
    if format == "contrib":  # onnxruntime's CPU form: no re-fusion into the slow SkipLayerNormalization
        out = run_pass(KeepLayerNormPass(), out).model
    if embeddings:
        out = run_pass(QuantizeEmbeddingsPass(bits=8), out).model
    return out
