"""QuantizeStaticPass: rewrite float layers into static int8, in onnxruntime's fast CPU form or
in the standard QDQ form that mobile execution providers consume.

The pass applies a *plan* — per layer, fixed activation scale/zero point, optional SmoothQuant
divisor, weight bits and bias correction — computed beforehand from calibration
(:mod:`edgecomp.quantize`). It makes no data-dependent choice itself.

Cases handled:

- ``MatMul(x, W)`` with a constant 2-D ``W`` [K, N], and an optional following ``Add`` of a
  constant bias [N]; ``Gemm(x, B, C)`` with ``alpha = beta = 1``, no ``transA``, constant B
  (transposed when ``transB``) and constant C. Both become::

      x_s = Mul(x, 1/s)                          (only with SmoothQuant; s per input channel)
      x_q = QuantizeLinear(x_s, a_scale, a_zp)   (uint8, one per activation, shared by consumers)
      y   = com.microsoft.MatMulIntegerToFloat(x_q, W_q, a_scale, w_scale, a_zp, w_zp, bias')

  with ``W_q = round(diag(s) W / w_scale)`` symmetric int8 per output column
  (``w_scale[n] = max_k |s_k W_kn| / qmax``, qmax 127, or 63 for 7-bit weights), and
  ``bias' = bias - delta`` (bias correction). On x86 without VNNI, VPMADDUBSW sums pairs of
  u8×s8 products in int16; a plan keeps every pair sum below 2^15 either with 7-bit weights or
  with 7-bit activations (zero point and scale on [0, 127]).
  The fused op dequantizes and adds the bias inside the int8 GEMM: this is the form
  onnxruntime's dynamic quantization reaches, without the DynamicQuantizeLinear pass over
  every activation.
  With ``format="qdq"`` the same plan becomes standard ai.onnx QuantizeLinear/DequantizeLinear
  pairs around the original float op (XNNPACK, NNAPI, CoreML and QNN take this form; onnxruntime
  on CPU fuses it back into an int8 GEMM)::

      x_s = Mul(x, 1/s)                          (only with SmoothQuant: stays a float Mul)
      x_d = DequantizeLinear(QuantizeLinear(x_s, a_scale, a_zp), a_scale, a_zp)
      y   = MatMul(x_d, DequantizeLinear(W_q, w_scale, 0, axis 1)) + bias'
            (Gemm: Gemm(x_d, DequantizeLinear(W_q^T, w_scale, 0, axis 0), bias', transB) when transB)

  with the same ``a_scale``, ``a_zp``, ``W_q``, ``w_scale`` and ``bias'`` (float), so both forms
  compute ``dequantize(quantize(x_s)) · dequantize(W_q) + bias'``. With the plan's output grids
  (``out_scale``, and ``mid_scale`` for a MatMul's bias Add; :mod:`edgecomp.quantize.outputs`)
  each layer is a whole node unit, ``DQ → MatMul → Q`` then ``DQ, DQ(bias' as uint8) → Add → Q``,
  and the next quantized layer reads that DequantizeLinear: the QDQ form then also rounds each
  output to its grid (one step: its range / 255), which the contrib form does not. 7-bit weights or activations (the VPMADDUBSW rule) mean nothing to a QDQ consumer
  but are kept as planned: the plan's error estimates were made for them.
- ``MatMul(A, B)`` of two activations (attention's Q·Kᵀ and softmax·V, plan kind ``attention``):
  both operands quantized per tensor (uint8 A, symmetric int8 B) into one MatMulIntegerToFloat,
  or DequantizeLinear(QuantizeLinear(·)) on each in the QDQ form (:mod:`edgecomp.quantize.attention`);
- a residual ``Add`` of two quantized conv-branch tensors gets its output quantized too, so
  onnxruntime runs it as QLinearAdd;
- ``Conv(x, W, b)`` (1-D or 2-D, any group) becomes the QDQ form onnxruntime fuses into QLinearConv::

      DequantizeLinear(QuantizeLinear(x)) → Conv(·, DequantizeLinear(W_q, axis 0), DQ(b_q int32))
      → [Relu | Clip] → QuantizeLinear(y) → DequantizeLinear

  with per-output-channel symmetric int8 weights and ``b_q = round(b / (a_scale * w_scale))``.

Layers not in the plan are left float. Outputs keep their names, so the graph's interface is
unchanged (a quantized tensor that is also a graph output: the output moves to its
DequantizeLinear, the QuantizeLinear still reads the float tensor). There is never a
DynamicQuantizeLinear in the result. Every node emitted exists at opset 13 (the pass requires 13
for convolutions and for the QDQ form: per-channel DequantizeLinear needs its ``axis``):
QuantizeLinear and DequantizeLinear with scalar or per-axis scales only (no ``block_size``,
``saturate`` or ``output_dtype``), Mul, Conv, and com.microsoft.MatMulIntegerToFloat — or, in
the QDQ form, MatMul, Gemm and Add instead of the latter: no op outside ai.onnx.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (not imported by onnx_ir itself)

from edgecomp.errors import OptionError, PassFailed
from edgecomp.graph import (INT8_OPS, MS_DOMAIN, NameAllocator, add_initializer, attribute, bias_add, const_array, default_opset,
                            layer_bias, layer_weight, replace_value, sort_graph)
from edgecomp.passes.base import EdgecompPass, PassReport, one_line_failures
from edgecomp.quantize.attention_emit import emit_attention
from edgecomp.quantize.options import FORMATS
from edgecomp.quantize.qparams import quantize_weight, uint8_qparams
from edgecomp.quantize.qdq_form import bias_for_int8_fusion

__all__ = ["LayerPlan", "QuantizeStaticPass", "matmul_parts", "QUANTIZED_OPS"]

QUANTIZED_OPS = INT8_OPS | {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulNBits"}


@dataclasses.dataclass
class LayerPlan:
    """How to quantize one layer (see the module docstring for the math)."""

    node: str
    kind: str  # "matmul" | "gemm" | "conv" | "add" (a residual Add's output)
    act: str
    act_scale: float
    act_zp: int
    weight_bits: int = 8
    act_bits: int = 8  # 7: activations use [0, 127] of uint8 (saturation-safe with 8-bit weights)
    per_channel: bool = True
    smooth: np.ndarray | None = None  # divisor s per input channel (MatMul/Gemm)
    bias_delta: np.ndarray | None = None  # subtracted from the bias (bias correction)
    out_scale: float | None = None  # conv, and every layer in the QDQ form: output QuantizeLinear
    out_zp: int | None = None
    mid_scale: float | None = None  # QDQ MatMul with a bias Add: the MatMul's own output QuantizeLinear
    mid_zp: int | None = None
    out_after: str | None = None  # conv: name of the Relu/Clip node the output Q follows
    b_scale: float | None = None  # attention: the B activation's symmetric int8 scale (zero point 0)


class QuantizeStaticPass(EdgecompPass):
    """Apply a static int8 plan (one :class:`LayerPlan` per layer to quantize).

    Args:
        plan: per-layer quantization parameters, keyed by node name.
        format: ``"contrib"`` (com.microsoft.MatMulIntegerToFloat, onnxruntime's fastest CPU form)
            or ``"qdq"`` (only ai.onnx QuantizeLinear/DequantizeLinear around float ops).
    """

    def __init__(self, *, plan: Mapping[str, LayerPlan], format: str = "contrib"):
        if format not in FORMATS:
            raise OptionError("format", f"must be one of {', '.join(FORMATS)}, got {format!r}")
        self.plan = dict(plan)
        self.format = format

    def options(self) -> dict[str, Any]:
        return {"layers": len(self.plan), "format": self.format}

    def requires(self, model: ir.Model) -> None:
        ops = {n.op_type for n in model.graph} & QUANTIZED_OPS
        if ops:
            raise PassFailed(f"the model is already quantized (it has {', '.join(sorted(ops))}); "
                             "give the float model")
        names = {n.name for n in model.graph}
        missing = sorted(set(self.plan) - names)
        if missing:
            raise PassFailed(f"plan names nodes not in the graph: {missing[:5]}")
        qdq = self.format == "qdq"
        foreign = _foreign_ops(model) if qdq else []
        if foreign:
            raise PassFailed(f"the QDQ form holds only ai.onnx ops, but the model already has {', '.join(foreign)}; "
                             "give a model exported without onnxruntime contrib ops")
        opset = default_opset(model)
        needs_axis = bool(self.plan) if qdq else any(p.kind in ("conv", "add") for p in self.plan.values())
        if opset is not None and opset < 13 and needs_axis:
            raise PassFailed(f"the model declares opset {opset}; {'QDQ layers' if qdq else 'quantized convolutions'} "
                             "use per-channel DequantizeLinear (axis), which needs opset 13: "
                             "run UpgradeOpsetPass(min_opset=13) first")
        if opset is not None and opset < 10:
            raise PassFailed(f"the model declares opset {opset}; QuantizeLinear needs opset 10 or later")

    @one_line_failures
    def call(self, model: ir.Model) -> PassReport:
        builder = _Builder(model)
        nodes = {n.name: n for n in model.graph}
        rows = []
        for name, lp in self.plan.items():
            node = nodes[name]
            if lp.kind in ("matmul", "gemm"):
                builder.matmul_qdq(node, lp) if self.format == "qdq" else builder.matmul(node, lp)
            elif lp.kind == "conv":
                builder.conv(node, lp, nodes.get(lp.out_after) if lp.out_after else None)
            elif lp.kind == "attention":
                emit_attention(builder, node, lp, self.format)
                if self.format == "qdq" and lp.out_scale is not None:
                    builder.quantize_output(node.outputs[0], node.name, lp)
            elif lp.kind == "add":
                if not builder.residual_add(node, lp):
                    rows.append({"layer": name, "kind": "add", "skipped": "an input is not a quantized tensor"})
                    continue
            else:
                raise PassFailed(f"unknown layer kind {lp.kind!r} for {name}")
            rows.append({"layer": name, "kind": lp.kind, "weight bits": lp.weight_bits, "act bits": lp.act_bits,
                         "smoothquant": lp.smooth is not None, "bias corrected": lp.bias_delta is not None,
                         "act scale": float(lp.act_scale), "act zp": int(lp.act_zp)})
        if self.plan:
            if (self.format == "contrib" and MS_DOMAIN not in model.opset_imports
                    and any(p.kind != "conv" for p in self.plan.values())):
                model.opset_imports[MS_DOMAIN] = 1
            sort_graph(model.graph, "quantizing")
            ir.passes.common.RemoveUnusedNodesPass()(model)  # the float weights
        return self.report(model, bool(self.plan), {"quantized layers": len(self.plan), "format": self.format,
                                                    "quantize ops": builder.quantize_ops}, rows)

    def ensures(self, model: ir.Model) -> None:
        if any(n.op_type == "DynamicQuantizeLinear" for n in model.graph):
            raise PassFailed("static quantization produced a DynamicQuantizeLinear")
        foreign = _foreign_ops(model) if self.format == "qdq" else []
        if foreign:
            raise PassFailed(f"the QDQ form produced {', '.join(foreign)}, which is not an ai.onnx op")


class _Builder:
    """Emits nodes and initializers into one graph, sharing QuantizeLinear per activation."""

    def __init__(self, model: ir.Model):
        self.graph = model.graph
        self._qcache: dict[tuple, ir.Value] = {}
        self._wcache: dict[tuple, tuple[ir.Value, ir.Value, ir.Value]] = {}
        self._output_dq: set[str] = set()  # DequantizeLinear nodes after quantized conv outputs
        self._names = NameAllocator(self.graph)
        self.quantize_ops = 0

    def const(self, base: str, array: np.ndarray) -> ir.Value:
        return add_initializer(self.graph, self._names.unique(base), np.asarray(array))

    def add(self, op: str, inputs, name: str, domain: str = "", **attrs) -> ir.Value:
        node = ir.node(op, inputs, attributes=attrs or None, domain=domain, name=self._names.unique(name), num_outputs=1)
        node.outputs[0].name = self._names.unique(f"{name}_out")
        self.graph.append(node)
        return node.outputs[0]

    def quantized_input(self, act: ir.Value, lp: LayerPlan) -> tuple[ir.Value, ir.Value, ir.Value]:
        """(x_q, a_scale, a_zp) for ``act``, created once per (activation, smoothing, qparams)."""
        key = (act.name, None if lp.smooth is None else lp.smooth.tobytes(), float(lp.act_scale), int(lp.act_zp))
        if key not in self._qcache:
            src = act
            if lp.smooth is not None:
                inv = self.const(f"{act.name}_smooth_inv", (1.0 / lp.smooth).astype(np.float32))
                src = self.add("Mul", [act, inv], f"{act.name}_smooth")
            scale = self.const(f"{act.name}_scale", np.float32(lp.act_scale))
            zp = self.const(f"{act.name}_zero_point", np.uint8(lp.act_zp))
            q = self.add("QuantizeLinear", [src, scale, zp], f"{act.name}_quantize")
            self.quantize_ops += 1
            self._qcache[key] = (q, scale, zp)
        return self._qcache[key]

    def matmul(self, node: ir.Node, lp: LayerPlan) -> None:
        w, bias, out, dead = _planned_parts(node, lp)
        trans = node.op_type == "Gemm" and attribute(node, "transB", 0)
        wq_v, ws_v, wzp_v = self.weight(node, ("matmul", bool(trans)), w, lp, axis=1)
        xq, a_scale, a_zp = self.quantized_input(node.inputs[0], lp)
        inputs = [xq, wq_v, a_scale, ws_v, a_zp, wzp_v]
        if bias is not None:
            inputs.append(self.const(f"{node.name}_bias", bias.astype(np.float32)))
        y = self.add("MatMulIntegerToFloat", inputs, f"{node.name}_int8", domain=MS_DOMAIN)
        replace_value(self.graph, out, y)
        for n in dead:
            self.graph.remove(n, safe=True)

    def matmul_qdq(self, node: ir.Node, lp: LayerPlan) -> None:
        """The QDQ form of a MatMul/Gemm layer: float op on DequantizeLinear'd input and weight,
        float bias (see the module docstring)."""
        w, bias, out, dead = _planned_parts(node, lp)
        trans = bool(node.op_type == "Gemm" and attribute(node, "transB", 0))
        stored, axis = (w.T, 0) if trans else (w, 1)  # the output channel's axis in the stored weight
        wd = self.add("DequantizeLinear", list(self.weight(node, ("qdq", trans), stored, lp, axis=axis)),
                      f"{node.name}_w_dq", axis=axis)
        xd, act_scale = self._dequantized_input(node, lp)
        if bias is not None and node.op_type == "MatMul" and lp.mid_scale is None:  # onnxruntime then fuses it to int8
            bias = bias_for_int8_fusion(bias, node.inputs[0])
        b = None if bias is None else self.const(f"{node.name}_bias", bias.astype(np.float32))
        if b is not None and node.op_type == "Gemm" and lp.out_scale is not None:  # the Gemm unit's int32 bias
            b = self._int32_bias(node.name, bias, act_scale, self.weight(node, ("qdq", trans), stored, lp, axis=axis)[1])
        if node.op_type == "Gemm":
            y = self.add("Gemm", [xd, wd] + ([b] if b is not None else []), f"{node.name}_qdq", transB=int(trans))
        else:
            y = self.add("MatMul", [xd, wd], f"{node.name}_qdq")
            if b is not None:
                if lp.mid_scale is not None:  # the MatMul and the bias Add each a node unit
                    y = self._fake_quant(y, f"{node.name}_mm", np.float32(lp.mid_scale), np.uint8(lp.mid_zp))
                    b = self._uint8_constant(f"{node.name}_bias", bias)
                y = self.add("Add", [y, b], f"{node.name}_qdq_bias")
        replace_value(self.graph, out, y)
        for n in dead:
            self.graph.remove(n, safe=True)
        if lp.out_scale is not None:
            self.quantize_output(y, node.name, lp)

    def quantize_output(self, y: ir.Value, name: str, lp: LayerPlan) -> None:
        """The planned output grid on ``y`` (QuantizeLinear → DequantizeLinear, read by every consumer)."""
        self._quantize_output(y, name, np.float32(lp.out_scale), np.uint8(lp.out_zp))

    def _fake_quant(self, y: ir.Value, name: str, scale: np.float32, zp: np.uint8) -> ir.Value:
        """DequantizeLinear(QuantizeLinear(y)) for a tensor read by one node, built here."""
        s, z = self.const(f"{name}_scale", scale), self.const(f"{name}_zero_point", zp)
        self.quantize_ops += 1
        return self.add("DequantizeLinear", [self.add("QuantizeLinear", [y, s, z], f"{name}_quantize"), s, z],
                        f"{name}_dq")

    def _uint8_constant(self, name: str, a: np.ndarray) -> ir.Value:
        """DequantizeLinear of ``a`` stored as uint8 over [min a, max a] ∋ 0 (one scale)."""
        scale, zp = uint8_qparams(float(a.min()), float(a.max()))
        q = np.clip(np.round(a / scale) + int(zp), 0, 255).astype(np.uint8)
        return self.add("DequantizeLinear", [self.const(f"{name}_q", q), self.const(f"{name}_scale", scale),
                                             self.const(f"{name}_zero_point", zp)], f"{name}_dq")

    def weight(self, node: ir.Node, form: tuple, w: np.ndarray, lp: LayerPlan,
               axis: int) -> tuple[ir.Value, ir.Value, ir.Value]:
        """(W_q, w_scale, w_zp) initializers; layers sharing one float weight (ALBERT's shared
        layers, a weight read at several call sites) and quantizing it alike share them too."""
        key = (id(node.inputs[1]), form, None if lp.smooth is None else lp.smooth.tobytes(), lp.weight_bits,
               lp.per_channel)
        if key not in self._wcache:
            wq, ws = quantize_weight(w, lp.weight_bits, axis=axis, per_channel=lp.per_channel)
            self._wcache[key] = (self.const(f"{node.name}_wq", wq), self.const(f"{node.name}_wscale", ws),
                                 self.const(f"{node.name}_wzp", np.zeros(w.shape[axis], np.int8)))
        return self._wcache[key]

    def conv(self, node: ir.Node, lp: LayerPlan, act_node: ir.Node | None) -> None:
        xd, act_scale = self._dequantized_input(node, lp)
        w = node.inputs[1].const_value.numpy().astype(np.float32)
        wq_v, ws_v, wzp_v = self.weight(node, ("conv",), w, lp, axis=0)
        wd = self.add("DequantizeLinear", [wq_v, ws_v, wzp_v], f"{node.name}_w_dq", axis=0)
        inputs = [xd, wd]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            inputs.append(self._int32_bias(node.name, node.inputs[2].const_value.numpy(), act_scale, ws_v))
        for i, v in enumerate(inputs):
            node.replace_input_with(i, v)
        if lp.out_scale is not None:
            self._conv_output(node, lp, act_node)

    def _int32_bias(self, name: str, b: np.ndarray, act_scale: float, ws_v: ir.Value) -> ir.Value:
        """DequantizeLinear(b_q int32, a_scale * w_scale, axis 0) with ``b_q = round(b / (a_scale * w_scale))``."""
        bscale = (np.float64(act_scale) * ws_v.const_value.numpy()).astype(np.float32)
        bq = np.round(b.astype(np.float64) / bscale).astype(np.int32)
        return self.add("DequantizeLinear", [self.const(f"{name}_bq", bq), self.const(f"{name}_bscale", bscale),
                                             self.const(f"{name}_bzp", np.zeros_like(bq))], f"{name}_b_dq", axis=0)

    def _dequantized_input(self, node: ir.Node, lp: LayerPlan) -> tuple[ir.Value, float]:
        """The dequantized input and its scale; an input that is already the DequantizeLinear of
        a quantized producer's output is used as it is (one Q/DQ pair per tensor), unless the
        layer smooths it (the Mul by 1/s must come before the QuantizeLinear)."""
        x = node.inputs[0]
        p = x.producer()
        if lp.smooth is None and p is not None and p.op_type == "DequantizeLinear" and p.name in self._output_dq:
            return x, float(p.inputs[1].const_value.numpy())
        xq, a_scale, a_zp = self.quantized_input(x, lp)
        return self.add("DequantizeLinear", [xq, a_scale, a_zp], f"{node.name}_x_dq"), float(lp.act_scale)

    def residual_add(self, node: ir.Node, lp: LayerPlan) -> bool:
        """Quantize an Add's output when both of its inputs are quantized tensors' DequantizeLinear."""
        if not all(v.producer() is not None and v.producer().name in self._output_dq for v in node.inputs):
            return False
        self._quantize_output(node.outputs[0], node.name, np.float32(lp.act_scale), np.uint8(lp.act_zp))
        return True

    def _quantize_output(self, y: ir.Value, name: str, scale: np.float32, zp: np.uint8, src: ir.Value | None = None) -> None:
        """Insert QuantizeLinear(src or y) → DequantizeLinear and point y's uses at the latter."""
        consumers = list(y.uses())
        q = self.add("QuantizeLinear", [src or y, self.const(f"{name}_out_scale", scale),
                                        self.const(f"{name}_out_zero_point", zp)], f"{name}_out_quantize")
        dq = self.add("DequantizeLinear", [q, q.producer().inputs[1], q.producer().inputs[2]], f"{name}_out_dq")
        self._output_dq.add(dq.producer().name)
        self.quantize_ops += 1
        for use in consumers:
            use.node.replace_input_with(use.idx, dq)
        dq.type, dq.shape = y.type, y.shape
        if y.is_graph_output():
            # only the output slot moves to dq: replacing *every* use of y would also rewire
            # the QuantizeLinear that reads y to its own DequantizeLinear (a cycle)
            _move_graph_output(self.graph, y, dq)

    def _conv_output(self, node: ir.Node, lp: LayerPlan, act_node: ir.Node | None) -> None:
        """QuantizeLinear → DequantizeLinear after the conv (or its Relu/Clip). A Relu/Clip whose
        range contains the quantization range is dropped: saturating at the range ends clips the
        same values, and onnxruntime then fuses DequantizeLinear → Conv → QuantizeLinear."""
        oscale, ozp = np.float32(lp.out_scale), np.uint8(lp.out_zp)
        tail = act_node if act_node is not None else node
        y = tail.outputs[0]
        src = node.outputs[0] if act_node is not None and _clip_covers(act_node, oscale, ozp) else y
        self._quantize_output(y, tail.name, oscale, ozp, src)
        if src is not y:
            self.graph.remove(act_node, safe=True)


def _clip_covers(act: ir.Node, scale: np.float32, zp: np.uint8) -> bool:
    """Whether Relu/Clip(x) is the identity on the uint8 grid's range [-zp*s, (255-zp)*s]."""
    lo, hi = -float(zp) * float(scale), (255 - float(zp)) * float(scale)
    if act.op_type == "Relu":
        return lo >= 0.0
    if any(v is not None and const_array(v) is None for v in act.inputs[1:3]):
        return False  # a computed bound, or one the caller may feed
    ins = list(act.inputs[1:3]) + [None] * (3 - len(act.inputs))
    cmin, cmax = (const_array(v).item() if v is not None else None for v in ins[:2])
    if "min" in act.attributes or "max" in act.attributes:  # opset < 11
        cmin, cmax = attribute(act, "min"), attribute(act, "max")
    return (cmin is None or cmin <= lo + 1e-12) and (cmax is None or cmax >= hi - 1e-6 * max(1.0, abs(hi)))


def _planned_parts(node: ir.Node, lp: LayerPlan) -> tuple[np.ndarray, np.ndarray | None, ir.Value, list[ir.Node]]:
    """:func:`matmul_parts` with the plan applied: ``diag(s) W`` and ``bias - delta``."""
    w, bias, out, dead = matmul_parts(node)
    if lp.smooth is not None:
        w = w * lp.smooth[:, None]
    if lp.bias_delta is not None:
        bias = (bias if bias is not None else np.zeros(w.shape[1], np.float32)) - lp.bias_delta
    return w, bias, out, dead


def _foreign_ops(model: ir.Model) -> list[str]:
    """``domain.op`` of every node outside the default (ai.onnx) domain, subgraphs included."""
    return sorted({f"{n.domain}.{n.op_type}" for n in ir.traversal.RecursiveGraphIterator(model.graph)
                   if n.domain not in ("", "ai.onnx")})


def matmul_parts(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None, ir.Value, list[ir.Node]]:
    """(W [K,N] float32, bias [N] float32 or None, the value the fused op replaces, nodes that become
    dead). Weights and biases are read as :func:`edgecomp.graph.layer_weight` and
    :func:`edgecomp.graph.layer_bias` do: a bias Add reading an initializer that is also a graph input
    (a default the caller may feed) stays an Add after the fused op (:func:`find_layers` keeps a
    layer whose weight is one float)."""
    w = layer_weight(node).astype(np.float32)
    bias = layer_bias(node, w.shape[1])
    bias = None if bias is None else bias.astype(np.float32)
    if node.op_type == "Gemm":
        return w, bias, node.outputs[0], [node]
    add = bias_add(node)
    if add is None:
        return w, None, node.outputs[0], [node]
    return w, bias, add.outputs[0], [add, node]


def _move_graph_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Make ``new`` the graph output ``old`` was (same name); ``old``'s other uses are kept."""
    name = old.name
    for i, v in enumerate(list(graph.outputs)):
        if v is old:
            graph.outputs[i] = new
    old.name = f"{name}__float"
    new.name = name
