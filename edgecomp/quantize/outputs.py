"""Output grids for the QDQ form: each quantized MatMul/Gemm (and activation × activation MatMul)
output gets its own calibrated uint8 grid, so a mobile execution provider (XNNPACK, NNAPI, QNN)
sees whole node units ``DequantizeLinear → op → QuantizeLinear`` and runs the layer in int8,
instead of a float op between a DequantizeLinear and whatever reads it.

For a MatMul with a bias ``Add`` two grids are calibrated: the MatMul's own output ``h`` and the
layer's output ``y = h + b``; the Add is then a node unit too (``b`` a uint8 constant)::

    h_q = QuantizeLinear(MatMul(DQ(x_q), DQ(W_q)), h_scale, h_zp)
    y_q = QuantizeLinear(Add(DQ(h_q), DQ(b_q)), y_scale, y_zp)          b_q: uint8 over [min b, max b] ∋ 0

Each range is chosen from calibration statistics of that tensor by the layer's method
(:func:`edgecomp.quantize.calibration.choose_range`), as the conv outputs' are. The contrib form
needs none of this (MatMulIntegerToFloat returns float) and is not touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx_ir as ir

from edgecomp.data import Dataset, input_specs
from edgecomp.quantize.calibration import (
    ActivationStats,
    calibration_feeds,
    choose_range,
    collect_ranges,
    sessions_for,
)
from edgecomp.quantize.layers import Layer
from edgecomp.quantize.options import QuantizeOptions
from edgecomp.quantize.qparams import uint8_qparams
from edgecomp.quantize.quantize_static import LayerPlan, matmul_parts

__all__ = ["calibrate_outputs", "output_values", "plan_outputs"]


def output_values(model: ir.Model, layers: Sequence[Layer]) -> dict[str, tuple[str, str | None]]:
    """Per MatMul/Gemm/attention layer: (the layer's output, the MatMul's own output when a bias
    Add follows it, else None)."""
    nodes = {n.name: n for n in model.graph}
    out = {}
    for layer in layers:
        node = nodes.get(layer.node)
        if node is None or node.op_type not in ("MatMul", "Gemm"):
            continue
        if layer.family == "attention":
            out[layer.node] = (node.outputs[0].name, None)
            continue
        value = matmul_parts(node)[2]
        out[layer.node] = (value.name, node.outputs[0].name if value is not node.outputs[0] else None)
    return out


def calibrate_outputs(model: ir.Model, layers: Sequence[Layer], data: Dataset, opts: QuantizeOptions,
                      known: Mapping[str, ActivationStats]) -> dict[str, ActivationStats]:
    """Range statistics (one range per tensor) of the outputs :func:`output_values` names that
    calibration has not seen yet (one more pass over the calibration samples)."""
    names = {v for pair in output_values(model, layers).values() for v in pair if v is not None and v not in known}
    if not names:
        return {}
    return collect_ranges(sessions_for(model, opts.threads), dict.fromkeys(sorted(names)),
                          calibration_feeds(data, input_specs(model), opts.max_samples), reservoir=0,
                          progress="output ranges" if opts.progress else None)


def plan_outputs(model: ir.Model, plan: Mapping[str, LayerPlan], layers: Sequence[Layer],
                 stats: Mapping[str, ActivationStats], opts: QuantizeOptions) -> None:
    """Set ``out_scale``/``out_zp`` (and ``mid_scale``/``mid_zp`` for a bias Add) of the planned
    MatMul/Gemm/attention layers from the statistics of their outputs."""
    for node, (value, mid) in output_values(model, layers).items():
        lp = plan.get(node)
        if lp is None or lp.kind not in ("matmul", "gemm", "attention"):
            continue
        lp.out_scale, lp.out_zp = (float(v) for v in uint8_qparams(*choose_range(stats[value], opts.method,
                                                                                 opts.percentile)))
        if mid is not None:
            lp.mid_scale, lp.mid_zp = (float(v) for v in uint8_qparams(*choose_range(stats[mid], opts.method,
                                                                                     opts.percentile)))
