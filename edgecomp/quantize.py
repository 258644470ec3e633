"""Static int8 quantization: find layers, calibrate, plan, measure, and fall back where needed.

The steps, each a plain function so tests and scripts can drive them one at a time:

0. the model's default opset is raised to 13 (per-channel DequantizeLinear) and the graph
   cleaned up (constants folded, Constant/Identity-fed weights exposed) — before any calibration.
1. :func:`find_layers` — MatMul/Gemm with constant weights and 1-D/2-D Conv; everything else
   stays float, and a layer of a quantizable op that cannot be handled (subgraph layers included)
   is listed with the reason.
2. :func:`calibrate` — streaming activation statistics (:mod:`edgecomp.calibration`).
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
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (not imported by onnx_ir itself)

from edgecomp.calibration import ActivationStats, choose_range, collect_histograms, collect_ranges, uint8_qparams
from edgecomp.data import Dataset, check_label_range, input_specs
from edgecomp.errors import ConfigError, DataError, PassFailed
from edgecomp.passes.base import run_pass
from edgecomp.passes.optimize_graph import OptimizeGraphPass
from edgecomp.passes.quantize_embeddings import QuantizeEmbeddingsPass
from edgecomp.passes.quantize_static import QUANTIZED_OPS, LayerPlan, QuantizeStaticPass, matmul_parts, quantize_weight
from edgecomp.passes.upgrade_opset import UpgradeOpsetPass, new_violations, opset_violations
from edgecomp.runtime import make_session, run_feed
from edgecomp.targets import Isa, host_isa

__all__ = ["QuantizeOptions", "Layer", "QuantizeResult", "Evaluator", "FidelityEvaluator", "find_layers", "calibrate", "make_plan",
           "build", "choose_families", "fit_tolerance", "quantize_model", "quantize_dynamic_ort",
           "compile_patterns", "METRICS", "ALPHAS"]

METRICS = ("cosine", "top1", "mae")
ALPHAS = (0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
FAMILIES = ("matmul", "conv", "conv-depthwise")
MIN_OPSET = 13
OPSET_REASON = "per-channel DequantizeLinear needs 13"


@dataclasses.dataclass
class QuantizeOptions:
    """Every option of static quantization, with its default."""

    method: str = "minmax"  # minmax | percentile | entropy | mse
    percentile: float = 99.99
    per_channel: bool = True
    weight_bits: str | int = "auto"  # auto (from the target ISA) | 7 | 8
    smooth: str | float = "auto"  # auto | off | a fixed alpha
    bias_correction: str = "auto"  # auto | on | off
    families: str = "auto"  # auto (measured) | all | comma list of matmul,conv,conv-depthwise
    exclude: tuple[str, ...] = ()  # regexes of node names kept float
    embeddings: bool = True  # int8 row-wise embedding tables (Gather) of >= 1000 rows
    max_samples: int | None = None
    reservoir: int = 512
    isa: Isa | None = None  # target ISA (default: the host's)
    threads: int = 1
    progress: bool = False
    # without --tolerance: every float output must keep this cosine to float on up to
    # fidelity_samples calibration samples, else the most sensitive layers stay float (None: off)
    min_cosine: float | None = 0.99
    fidelity_samples: int = 32

    def validate(self) -> None:
        from edgecomp.calibration import METHODS

        if self.method not in METHODS:
            raise ConfigError(f"unknown --method {self.method!r}; use one of {', '.join(METHODS)}")
        if not 50 < self.percentile < 100:
            raise ConfigError("--percentile must be in (50, 100), e.g. 99.99")
        if str(self.weight_bits) not in ("auto", "7", "8"):
            raise ConfigError("--weight-bits must be auto, 7 or 8")
        if self.smooth not in ("auto", "off") and not (0.0 < _number(self.smooth) < 1.0):
            raise ConfigError("--smooth must be auto, off, or an alpha in (0, 1)")
        if self.bias_correction not in ("auto", "on", "off"):
            raise ConfigError("--bias-correction must be auto, on or off")
        if self.families not in ("auto", "all"):
            bad = set(self.families.split(",")) - set(FAMILIES)
            if bad:
                raise ConfigError(f"unknown op families {sorted(bad)}; use {', '.join(FAMILIES)}, auto or all")
        compile_patterns(self.exclude, "exclude pattern")
        if self.min_cosine is not None and not 0.0 < _number(self.min_cosine) <= 1.0:
            raise ConfigError("min_cosine must be in (0, 1], or None to skip the fidelity check")


def compile_patterns(patterns: Sequence[str], what: str) -> list[re.Pattern]:
    """``patterns`` compiled, or one line naming the first that is not a valid regular expression."""
    compiled = []
    for p in patterns:
        if not isinstance(p, str):
            raise ConfigError(f"{what} {p!r} is not a string; give regular expressions as text")
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"{what} {p!r} is not a valid regular expression ({e})") from None
    return compiled


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


@dataclasses.dataclass
class Layer:
    node: str
    op: str
    family: str
    act: str
    out_after: str | None = None  # conv: the Relu/Clip whose output gets the output Q
    out_value: str | None = None  # conv: the value the output Q quantizes


@dataclasses.dataclass
class QuantizeResult:
    model: ir.Model
    plan: dict[str, LayerPlan]
    rows: list[dict[str, Any]]  # per layer: decision, reason, sensitivity...
    summary: dict[str, Any]
    families: list[dict[str, Any]]
    met_tolerance: bool | None = None
    embeddings: list[dict[str, Any]] = dataclasses.field(default_factory=list)


# --- 1. layers ---------------------------------------------------------------------------------

LAYER_OPS = ("MatMul", "Gemm", "Conv")
SUBGRAPH_REASON = ("inside {article} {op} subgraph: not quantized (calibration cannot observe values inside "
                   "subgraphs)")


def find_layers(model: ir.Model) -> tuple[list[Layer], list[dict[str, Any]]]:
    """Quantizable layers, and rows for layers of quantizable ops that must stay float (with why),
    including those inside If/Loop/Scan subgraphs."""
    layers, skipped = [], []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in LAYER_OPS:
            continue
        reason = _unsupported(node)
        if reason:
            skipped.append({"layer": node.name, "op": node.op_type, "decision": "float", "reason": reason})
            continue
        if node.op_type == "Conv":
            w = node.inputs[1].const_value.shape.numpy()
            group = node.attributes["group"].as_int() if "group" in node.attributes else 1
            family = "conv-depthwise" if group > 1 and group == w[0] and w[1] == 1 else "conv"
            tail = _activation_after(node)
            out = (tail or node).outputs[0]
            layers.append(Layer(node.name, "Conv", family, node.inputs[0].name, tail.name if tail else None, out.name))
        else:
            layers.append(Layer(node.name, node.op_type, "matmul", node.inputs[0].name))
    layers += _residual_adds(model, layers)
    skipped += _subgraph_layers(model)
    return layers, skipped


def _subgraph_layers(model: ir.Model) -> list[dict[str, Any]]:
    """A row per MatMul/Gemm/Conv inside a subgraph (If branches, Loop/Scan bodies)."""
    rows = []
    for owner in model.graph:
        for attr in owner.attributes.values():
            graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
                list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
            for g in graphs:
                for node in ir.traversal.RecursiveGraphIterator(g):
                    if node.domain in ("", "ai.onnx") and node.op_type in LAYER_OPS:
                        rows.append({"layer": node.name, "op": node.op_type, "decision": "float",
                                     "reason": SUBGRAPH_REASON.format(op=owner.op_type, article="an" if owner.op_type[:1] in "AEIOU" else "a"),
                                     "subgraph": owner.op_type})
    return rows


def _residual_adds(model: ir.Model, layers: Sequence[Layer]) -> list[Layer]:
    """Adds of two conv-branch tensors (residuals): with their output quantized, onnxruntime runs
    DequantizeLinear → Add → QuantizeLinear as one QLinearAdd instead of dequantize + float add.

    A conv-branch tensor is the output of a quantizable Conv (or of the Relu/Clip after it) or of
    such an Add; Adds elsewhere (a transformer's residuals, a MatMul's bias) are not layers."""
    branch = {l.out_value for l in layers if l.op == "Conv" and l.out_value}
    found = []
    for node in model.graph:  # topological: an Add's inputs are classified before it
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        if all(v is not None and v.name in branch for v in node.inputs):
            found.append(Layer(node.name, "Add", "conv", node.outputs[0].name))
            branch.add(node.outputs[0].name)
    return found


def _unsupported(node: ir.Node) -> str | None:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or w.const_value is None:
        return "weight is not a constant initializer (activation x activation product)"
    rank = len(w.const_value.shape)
    if node.op_type == "Conv":
        if rank not in (3, 4):
            return f"{rank - 2}-D convolution (1-D and 2-D are handled)"
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].const_value is None:
            return "bias is not a constant"
        return None
    if rank != 2:
        return f"weight has rank {rank} (batched MatMul)"
    if node.op_type == "Gemm":
        attrs = {k: v.value for k, v in node.attributes.items()}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return "Gemm with transA or alpha/beta != 1"
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].const_value is None:
            return "Gemm bias is not a constant"
    return None


def _activation_after(conv: ir.Node) -> ir.Node | None:
    uses = list(conv.outputs[0].uses())
    if len(uses) == 1 and not conv.outputs[0].is_graph_output():
        nxt = uses[0].node
        if nxt.op_type in ("Relu", "Clip") and nxt.domain in ("", "ai.onnx"):
            return nxt
    return None


# --- 2. calibration ----------------------------------------------------------------------------

def _session_factory(model: ir.Model, threads: int) -> Callable[[Sequence[str]], Any]:
    return lambda names: make_session(model, threads=threads, optimization="basic", extra_outputs=names)


def _feeds(ds: Dataset, specs, limit: int | None) -> list:
    class _Limited:
        def __len__(self):
            return min(len(ds), limit) if limit else len(ds)

        def __iter__(self):
            return ds.feeds_for(specs, limit)

    return _Limited()


def calibrate(model: ir.Model, layers: Sequence[Layer], data: Dataset, opts: QuantizeOptions) -> dict[str, ActivationStats]:
    """Pass 1 statistics of every layer input (and conv output).

    Only a MatMul/Gemm input needs per-channel statistics (SmoothQuant, simulated error), over its
    last axis (K, fixed by the weight). Conv and Add tensors get one range per tensor, so no
    statistic depends on an axis that varies between samples (sequence length, image size) — a
    tensor read by both kinds of layer gets the MatMul's per-channel statistics."""
    axes: dict[str, int | None] = {}
    for layer in layers:
        if layer.family == "matmul":
            axes[layer.act] = -1
        else:
            axes.setdefault(layer.act, None)
        if layer.out_value:
            axes.setdefault(layer.out_value, None)
    return collect_ranges(_session_factory(model, opts.threads), axes, _feeds(data, input_specs(model), opts.max_samples),
                          reservoir=opts.reservoir, progress="calibrating" if opts.progress else None)


# --- 3. plan -----------------------------------------------------------------------------------

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
        collect_histograms(_session_factory(model, opts.threads), stats,
                           _feeds(data, input_specs(model), opts.max_samples), smooth,
                           progress="histograms" if opts.progress else None)
    plan: dict[str, LayerPlan] = {}
    rows: list[dict[str, Any]] = []
    for layer in layers:
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
    return plan, rows


def _weight_tied_activations(nodes: Mapping[str, ir.Node], layers: Sequence[Layer]) -> dict[str, list[str]]:
    """Activations linked through MatMul/Gemm layers that share one weight initializer (ALBERT's
    shared layers), each mapped to its connected group; activations of unshared weights are absent."""
    by_weight: dict[tuple, list[str]] = {}
    for l in layers:
        if l.family != "matmul":
            continue
        node = nodes[l.node]
        trans = node.op_type == "Gemm" and "transB" in node.attributes and node.attributes["transB"].as_int()
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


def build(model: ir.Model, plan: Mapping[str, LayerPlan], embeddings: bool = False) -> ir.Model:
    """A quantized copy of ``model`` (the float model is untouched); ``embeddings`` also stores
    embedding tables in row-wise int8."""
    out = run_pass(QuantizeStaticPass(plan=plan), model.clone()).model
    if embeddings:
        out = run_pass(QuantizeEmbeddingsPass(bits=8), out).model
    return out


# --- 4. op families by measured latency -----------------------------------------------------

def choose_families(model: ir.Model, layers: Sequence[Layer], plan: Mapping[str, LayerPlan], feed,
                    opts: QuantizeOptions, timer: Callable[[], float] = time.perf_counter,
                    ) -> tuple[set[str], list[dict[str, Any]]]:
    """Families to quantize, and a row per measured combination with its latency ratio.

    Every non-empty combination of the families present is built and timed interleaved with the
    float model (families interact: a lone int8 family pays quantize/dequantize at its borders,
    which int8 neighbours would share) in rounds, until each ratio's 95% interval excludes 1.0
    or ten rounds are spent (:func:`edgecomp.bench.compare_latency`). The fastest combination
    wins only if its whole interval lies below 1.0 and its ratio is at most 0.97; otherwise
    everything stays float, so a busy machine cannot talk edgecomp into a slower model.
    """
    from itertools import combinations

    from edgecomp.bench import compare_latency

    present = [f for f in FAMILIES if any(l.family == f for l in layers)]
    if opts.families == "all":
        return set(present), [{"families": ",".join(present), "decision": "int8", "reason": "--families all"}]
    if opts.families != "auto":
        wanted = set(opts.families.split(",")) & set(present)
        return wanted, [{"families": ",".join(sorted(wanted)), "decision": "int8", "reason": "--families"}]
    combos = [c for k in range(1, len(present) + 1) for c in combinations(present, k)]
    variants = [model] + [build(model, {n: p for n, p in plan.items() if _family(layers, n) in c}) for c in combos]
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
                     "decision": "chosen" if win else "-", "reason": reason})
    return chosen, rows


def _family(layers: Sequence[Layer], node: str) -> str:
    return next(l.family for l in layers if l.node == node)


# --- 5. accuracy-aware fallback -------------------------------------------------------------

class Evaluator:
    """Scores a candidate against the float model's first output on evaluation feeds."""

    def __init__(self, model: ir.Model, feeds: list, metric: str, labels: np.ndarray | None, threads: int):
        if metric not in METRICS:
            raise ConfigError(f"unknown --metric {metric!r}; use one of {', '.join(METRICS)}")
        if not feeds:
            raise DataError("--eval DATA holds no samples")
        self.feeds, self.metric, self.labels, self.threads = feeds, metric, labels, threads
        self.ref = self._outputs(model)
        if labels is not None:
            check_label_range(labels, int(np.prod(self.ref[0].shape[1:])), "--labels")
        self.ref_score = self._score(self.ref)

    def _outputs(self, model: ir.Model) -> list[np.ndarray]:
        s = make_session(model, threads=self.threads)
        return [run_feed(s, f)[0] for f in self.feeds]

    def _score(self, outs: list[np.ndarray]) -> float:
        from edgecomp.validate import cosine_rows

        if self.metric == "cosine":
            return float(np.mean(np.concatenate([cosine_rows(r, o) for r, o in zip(self.ref, outs)])))
        if self.metric == "mae":
            return float(np.mean([np.abs(r - o).mean() for r, o in zip(self.ref, outs)]))
        pred = np.concatenate([o.reshape(o.shape[0], -1).argmax(1) for o in outs])
        if self.labels is not None:
            return float(np.mean(pred == self.labels[: len(pred)]))
        ref = np.concatenate([r.reshape(r.shape[0], -1).argmax(1) for r in self.ref])
        return float(np.mean(pred == ref))

    def drop(self, model: ir.Model) -> tuple[float, float]:
        """(score, loss vs fp32) — loss is 1-cos, accuracy points lost, or the MAE itself."""
        score = self._score(self._outputs(model))
        if self.metric == "mae":
            return score, score
        return score, self.ref_score - score


class FidelityEvaluator(Evaluator):
    """Every float output of a candidate against the float model's: the score is the lowest mean
    cosine among the outputs (an output of under 8 values a sample, such as a probability, is
    compared over all samples together: one value's cosine is only its sign). The loss is
    1 - score; the float model scores 1."""

    def __init__(self, model: ir.Model, feeds: list, threads: int):
        if not feeds:
            raise DataError("no samples for the fidelity check")
        self.feeds, self.metric, self.labels, self.threads = feeds, "cosine", None, threads
        self.ref = self._outputs(model)
        self.floats = [i for i, r in enumerate(self.ref[0]) if np.issubdtype(np.asarray(r).dtype, np.floating)]
        self.ref_score = 1.0

    def _outputs(self, model: ir.Model) -> list:
        s = make_session(model, threads=self.threads)
        return [run_feed(s, f) for f in self.feeds]

    def _score(self, outs: list) -> float:
        scores = [_pooled_cosine([r[i] for r in self.ref], [o[i] for o in outs]) for i in self.floats]
        return min(scores, default=1.0)


def _pooled_cosine(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float:
    from edgecomp.validate import cosine_rows

    r = [np.asarray(a, np.float64).reshape(1, -1) for a in ref]
    g = [np.asarray(a, np.float64).reshape(1, -1) for a in got]
    if r[0].size < 8:
        r, g = [np.concatenate(r, axis=1)], [np.concatenate(g, axis=1)]
    return float(np.mean([cosine_rows(a, b)[0] for a, b in zip(r, g)]))


def fit_tolerance(model: ir.Model, plan: dict[str, LayerPlan], evaluator: Evaluator, tolerance: float,
                  progress: bool = False, embeddings: bool = False) -> tuple[dict[str, LayerPlan], dict[str, float], list[str], bool, float]:
    """Keep the most sensitive layers float until the loss is within ``tolerance``.

    Returns (final plan, sensitivity per layer, layers kept float, met, final loss). Sensitivity
    is the loss with only that layer quantized. Float layers are added in order of sensitivity,
    doubling the count, then bisecting to the fewest that meet the tolerance.
    """
    from tqdm import tqdm

    _, loss = evaluator.drop(build(model, plan, embeddings))
    if loss <= tolerance:
        return plan, {}, [], True, loss
    sens = {}
    for name in tqdm(list(plan), desc="sensitivity", disable=None if progress else True, leave=False):
        sens[name] = evaluator.drop(build(model, {name: plan[name]}))[1]
    order = sorted(plan, key=lambda n: -sens[n])

    def trial(k: int) -> float:
        keep = set(order[:k])
        return evaluator.drop(build(model, {n: p for n, p in plan.items() if n not in keep}, embeddings))[1]

    losses = {0: loss}
    k = 1
    while k < len(order):
        losses[k] = trial(k)
        if losses[k] <= tolerance:
            break
        k *= 2
    else:
        k = len(order)
        losses[k] = trial(k)
    lo = max((j for j in losses if j < k), default=0)
    while k - lo > 1 and losses[k] <= tolerance:
        mid = (lo + k) // 2
        losses[mid] = trial(mid)
        if losses[mid] <= tolerance:
            k = mid
        else:
            lo = mid
    met_ks = [j for j, v in losses.items() if v <= tolerance]
    best_k = min(met_ks) if met_ks else min(losses, key=lambda j: losses[j])
    keep = order[:best_k]
    final = {n: p for n, p in plan.items() if n not in set(keep)}
    return final, sens, keep, bool(met_ks), losses[best_k]


# --- all together ---------------------------------------------------------------------------

def quantize_model(model: ir.Model, calibration: Dataset, opts: QuantizeOptions, *,
                   eval_data: Dataset | None = None, metric: str = "cosine", tolerance: float | None = None,
                   labels: np.ndarray | None = None) -> QuantizeResult:
    """The whole static quantization of ``model`` (a float model; it is modified in place by the
    opset upgrade and the cleanup). Everything that can refuse the model — opset, layers — runs
    before calibration."""
    opts.validate()
    if any(n.op_type in QUANTIZED_OPS for n in model.graph):
        raise PassFailed("the model is already quantized; give the float model")
    if tolerance is not None and tolerance < 0:
        raise ConfigError("--tolerance must be >= 0")
    specs = input_specs(model)
    calibration.check_against(specs)
    if eval_data is not None:
        eval_data.check_against(specs)
    t0 = time.perf_counter()
    upgrade = run_pass(UpgradeOpsetPass(min_opset=MIN_OPSET, reason=OPSET_REASON), model)
    invalid_before = opset_violations(model)
    cleanup = run_pass(OptimizeGraphPass(), model)
    ir.passes.common.NameFixPass()(model)
    layers, skipped = find_layers(model)
    exclude = compile_patterns(opts.exclude, "exclude pattern")
    excluded = [l for l in layers if any(p.search(l.node) for p in exclude)]
    layers = [l for l in layers if l not in excluded]
    if not layers:
        raise PassFailed(no_layer_message(model, skipped, excluded))
    stats = calibrate(model, layers, calibration, opts)
    plan, rows = make_plan(model, layers, stats, opts, calibration)
    feed = next(iter(calibration.feeds_for(specs)))
    families, family_rows = choose_families(model, layers, plan, feed, opts)
    plan = {k: v for k, v in plan.items() if _family(layers, k) in families}
    met, loss, sens, kept = None, None, {}, []
    fidelity = None
    kept_why = "among the most sensitive: kept float to meet the tolerance"
    if eval_data is not None and tolerance is not None and plan:
        evaluator = Evaluator(model, list(eval_data.feeds_for(specs)), metric, labels, opts.threads)
        plan, sens, kept, met, loss = fit_tolerance(model, plan, evaluator, tolerance, opts.progress, opts.embeddings)
    elif tolerance is None and opts.min_cosine is not None and plan:
        # no accuracy target given: still never write a model whose outputs drift from float on
        # the calibration samples (a per-tensor output grid can wreck a downstream magnitude or
        # recurrent state that no per-layer statistic shows)
        evaluator = FidelityEvaluator(model, list(calibration.feeds_for(specs, opts.fidelity_samples)), opts.threads)
        floor = float(opts.min_cosine)
        plan, sens, kept, ok, fid_loss = fit_tolerance(model, plan, evaluator, 1.0 - floor, opts.progress,
                                                       opts.embeddings)
        fidelity = {"fidelity": f"lowest output cosine {1.0 - fid_loss:.4f} on {len(evaluator.feeds)} calibration "
                                f"samples (floor {floor:g}{'' if ok else ', not met'})"}
        if kept:
            fidelity["fidelity"] += f"; {len(kept)} most sensitive layer(s) kept float to reach it"
        kept_why = f"among the most sensitive: kept float so every output keeps cosine >= {floor:g} to float"
    for row in rows:
        name = row["layer"]
        if name in sens:
            row["sensitivity"] = sens[name]
        if name in plan:
            row["decision"], row["reason"] = "int8", "quantized"
        elif name in kept:
            row["decision"], row["reason"] = "float", kept_why
        else:
            row["decision"], row["reason"] = "float", f"{row['family']} family: int8 not measurably faster here"
    rows += [{"layer": l.node, "op": l.op, "family": l.family, "decision": "float", "reason": "--exclude"}
             for l in excluded]
    rows += skipped
    quantized = build(model, plan) if plan else model
    embedding_rows = []
    if opts.embeddings:
        emb = run_pass(QuantizeEmbeddingsPass(bits=8), quantized)
        quantized, embedding_rows = emb.model, emb.rows
    invalid = new_violations(quantized, invalid_before)
    if invalid:
        raise PassFailed(f"the quantized model has a node its opset does not allow: {invalid[0]}")
    layouts = sorted({f"{p.act_bits}/{p.weight_bits}" for p in plan.values()})
    summary = {"layers int8": len(plan), "layers float": len(rows) - len(plan), "bits a/w": ", ".join(layouts),
               "bits reason": bits_reason(opts), "activations": "uint8 asymmetric, per tensor, static",
               "method": opts.method, "calibration samples": min(len(calibration), opts.max_samples or 10**9),
               "cleanup": cleanup.summary, "seconds": round(time.perf_counter() - t0, 1)}
    if upgrade.modified:
        summary = {"opset": upgrade.summary["opset"], **summary}
    if loss is not None:
        summary.update({"metric": metric, "tolerance": tolerance, "loss": loss, "met tolerance": met})
    if fidelity:
        summary.update(fidelity)
    return QuantizeResult(quantized, plan, rows, summary, family_rows, met, embedding_rows)


def no_layer_message(model: ir.Model, skipped: Sequence[Mapping[str, Any]], excluded: Sequence[Layer]) -> str:
    """One line: which ops the model has and why each quantizable op family was skipped."""
    ops: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        ops[key] = ops.get(key, 0) + 1
    listing = ", ".join(f"{op} x{n}" if n > 1 else op for op, n in sorted(ops.items(), key=lambda kv: -kv[1])[:12])
    if len(ops) > 12:
        listing += f", ... ({len(ops)} op types)"
    why: dict[tuple[str, str], int] = {}
    for row in skipped:
        why[(row["op"], row["reason"])] = why.get((row["op"], row["reason"]), 0) + 1
    for layer in excluded:
        why[(layer.op, "matches --exclude")] = why.get((layer.op, "matches --exclude"), 0) + 1
    parts = [f"{op} x{n}: {reason}" if n > 1 else f"{op}: {reason}" for (op, reason), n in why.items()]
    if not parts:
        parts = ["the model has no MatMul, Gemm or Conv"]
    return (f"no quantizable layer (MatMul/Gemm with constant weights, 1-D/2-D Conv): {'; '.join(parts)} "
            f"(the model's ops: {listing})")


def quantize_dynamic_ort(src: str, dst: str, isa: Isa | None = None) -> None:
    """onnxruntime's dynamic quantization (per channel; reduce_range where u8s8 saturates), for
    side-by-side comparison only — edgecomp never falls back to it silently."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgecomp.io import atomic_path

    isa = isa or host_isa()
    try:
        with atomic_path(dst, suffix=".onnx") as tmp:
            quantize_dynamic(src, str(tmp), per_channel=True, reduce_range=isa.u8s8_saturates,
                             weight_type=QuantType.QInt8,
                             extra_options={"DefaultTensorType": 1})  # FLOAT when shape inference misses a type
    except Exception as e:
        raise PassFailed(f"onnxruntime quantize_dynamic failed: {type(e).__name__}: {e}") from e
