"""Static int8 for activation × activation MatMuls: attention's ``Q·Kᵀ`` and ``softmax·V``.

Both operands are activations, so both are quantized per tensor with scales fixed at
calibration (no DynamicQuantizeLinear)::

    A_q = QuantizeLinear(A, s_a, z_a)       uint8, asymmetric; s_a, z_a from A's calibrated range,
                                            or [0, 1] (s_a = 1/255, z_a = 0) when A is a Softmax output
    B_q = QuantizeLinear(B, s_b, 0)         int8, symmetric: s_b = max(|lo_B|, |hi_B|) / qmax
    y   = com.microsoft.MatMulIntegerToFloat(A_q, B_q, s_a, c·s_b, z_a, 0)
        = c · (A_q - z_a)·B_q · s_a s_b

where ``c`` folds a following ``Mul``/``Div`` by a scalar constant (attention's ``1/√d``) into
the output scale (``c = 1`` when there is none: the Mul stays). The weight-bit rule of the target
applies to B as it does to weights: qmax is 127, or 63 where u8×s8 pair sums can saturate int16
(x86 without VNNI); 7-bit activations use [0, 127] of A's grid.

The rewrite itself is :func:`edgecomp.quantize.attention_emit.emit_attention` (the pass calls
it; this module plans). In the QDQ form (``format="qdq"``) the MatMul stays and reads ``DequantizeLinear(QuantizeLinear(·))``
of each operand, with the same scales (no scalar is folded; the output gets the QDQ form's output
pair, as every layer there, :mod:`edgecomp.quantize.outputs`): the standard form a mobile EP can
run as an int8 product, and that onnxruntime on CPU runs at about float speed — the family
timing keeps it float there unless it measures faster.

The plan simulates each product's int8 error on a few calibration samples (:func:`simulate_attention`,
the relative squared error the weight layers' ``sim error`` reports); a product whose error exceeds
the worst planned weight layer's stays float with families auto (a family the user names is
quantized whole) — softmax·V often does: the probabilities under half
a step of the [0, 1] grid (1/510) round to zero, and at sequence 128 they can be a third of them.

These layers form the op family ``attention``: :func:`edgecomp.quantize.families.choose_families`
keeps it only where it is measured faster, and the fidelity/tolerance fallback can keep any
one of them float, like any other layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from edgecomp.quantize.calibration import ActivationStats, choose_range, sessions_for
from edgecomp.quantize.layers import Layer
from edgecomp.quantize.qparams import uint8_qparams
from edgecomp.quantize.quantize_static import LayerPlan

__all__ = ["plan_attention", "simulate_attention", "softmax_input"]


def softmax_input(node: ir.Node) -> bool:
    """Whether the MatMul's A operand is a Softmax output, whose values lie in [0, 1] whatever the
    data (and whatever the axis)."""
    p = node.inputs[0].producer()
    return p is not None and p.op_type == "Softmax" and p.domain in ("", "ai.onnx")


def plan_attention(node: ir.Node, layer: Layer, stats: Mapping[str, ActivationStats], method: str, percentile: float,
                   layout: tuple[int, int]) -> tuple[LayerPlan, dict[str, Any]]:
    """The :class:`LayerPlan` of one activation × activation MatMul and its report row.

    ``layout`` is (activation bits, B bits) as for weights (:func:`edgecomp.quantize.plan.bit_layouts`)."""
    ab, bb = layout
    levels = 255 if ab == 8 else 127
    if softmax_input(node):
        lo, hi = 0.0, 1.0
        a_why = "softmax [0, 1]"
    else:
        lo, hi = choose_range(stats[layer.act], method, percentile)
        a_why = f"[{lo:.3g}, {hi:.3g}]"
    scale, zp = uint8_qparams(lo, hi, levels)
    blo, bhi = choose_range(stats[layer.act_b], method, percentile)
    qmax = 127 if bb == 8 else 63
    absmax = max(abs(float(blo)), abs(float(bhi)))
    b_scale = absmax / qmax if absmax > 0 else 1.0
    lp = LayerPlan(layer.node, "attention", layer.act, float(scale), int(zp), weight_bits=bb, act_bits=ab,
                   per_channel=False, b_scale=float(b_scale))
    row = {"layer": layer.node, "op": layer.op, "family": layer.family,
           "act range": f"{a_why} x ±{absmax:.3g}", "bits a/w": f"{ab}/{bb}"}
    return lp, row


def simulate_attention(model: ir.Model, layers: Sequence[Layer], plan: Mapping[str, LayerPlan], feeds,
                       threads: int = 1) -> dict[str, float]:
    """Per planned attention layer, the relative squared error ``‖Q(A)·Q(B) − A·B‖² / ‖A·B‖²`` of
    its int8 product on ``feeds`` (a few calibration samples), the measure the weight layers'
    ``sim error`` uses."""
    mine = [l for l in layers if l.node in plan and plan[l.node].kind == "attention"]
    if not mine:
        return {}
    names = sorted({n for l in mine for n in (l.act, l.act_b)})
    session = sessions_for(model, threads)(names)
    num = dict.fromkeys((l.node for l in mine), 0.0)
    den = dict.fromkeys((l.node for l in mine), 0.0)
    for feed in feeds:
        values = dict(zip(names, session.run(names, dict(feed))))
        for l in mine:
            lp, a, b = plan[l.node], values[l.act].astype(np.float32), values[l.act_b].astype(np.float32)
            qmax_a, qmax_b = (255 if lp.act_bits == 8 else 127), (127 if lp.weight_bits == 8 else 63)
            aq = (np.clip(np.round(a / lp.act_scale) + lp.act_zp, 0, qmax_a) - lp.act_zp) * lp.act_scale
            bq = np.clip(np.round(b / lp.b_scale), -qmax_b, qmax_b) * lp.b_scale
            y = np.matmul(a, b)
            num[l.node] += float(((np.matmul(aq, bq) - y) ** 2).sum())
            den[l.node] += float((y ** 2).sum())
    return {n: num[n] / max(den[n], 1e-30) for n in num}
