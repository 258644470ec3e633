"""What a model holds: ops, parameters by dtype, estimated MACs and the share run in int8.

MACs are counted from tensor shapes measured by running the model once in onnxruntime on a
synthesized feed (every intermediate exposed as an output), so contrib ops and symbolic dims are
handled without a shape-inference implementation of our own.

    Conv-like:   MACs = |output| * prod(W.shape[1:])          (Cin/group * kh * kw per output)
    ConvTranspose: MACs = |input| * prod(W.shape[1:])         (W is [Cin, Cout/group, kh, kw])
    MatMul-like: MACs = |output| * K                          (K = the reduced dim of A)
    Attention:   MACs = B*S*H*3H (QKV) + 2*B*S*S*H (scores and context)
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.data import InputSpec, feed_defaults, image_size_hint, input_specs, synthesize_feed
from edgecomp.errors import DataError, ModelLoadError
from edgecomp.graph import INT8_OPS, attribute, count_parameters, histogram, param_tensors
from edgecomp.runtime import make_session, run_feed

__all__ = ["ModelSummary", "summarize", "count_parameters", "count_macs", "node_macs", "probe_shapes", "INT8_OPS"]

CONV_OPS = {"Conv", "ConvInteger", "QLinearConv", "FusedConv", "ConvTranspose"}
MATMUL_OPS = {"MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat",
              "DynamicQuantizeMatMul", "FusedMatMul", "MatMulNBits", "QGemm"}
ATTENTION_OPS = {"Attention", "QAttention"}


@dataclasses.dataclass
class ModelSummary:
    opset: dict[str, int]
    inputs: list[InputSpec]
    outputs: list[tuple[str, str, str]]  # name, dtype, shape
    op_histogram: dict[str, int]
    params_by_dtype: dict[str, tuple[int, int]]  # dtype -> (elements, bytes)
    macs: int | None
    int8_macs: int | None
    probe_shapes: dict[str, list[int]]
    macs_note: str | None = None  # why MACs were not counted
    feed_defaults: list[str] = dataclasses.field(default_factory=list)  # sizes assumed for symbolic dims

    @property
    def params(self) -> int:
        return sum(n for n, _ in self.params_by_dtype.values())

    @property
    def int8_mac_share(self) -> float | None:
        if not self.macs:
            return None
        return self.int8_macs / self.macs


def _is_int8(node: ir.Node) -> bool:
    if node.op_type in INT8_OPS:
        return True
    # QDQ form: onnxruntime fuses DequantizeLinear -> Conv/MatMul into int8 kernels.
    producers = [i.producer() if i is not None else None for i in node.inputs[:2]]
    return (node.op_type in CONV_OPS | MATMUL_OPS and len(producers) == 2
            and all(p is not None and p.op_type == "DequantizeLinear" for p in producers))


def count_macs(model: ir.Model, shapes: Mapping[str, Sequence[int]]) -> tuple[int, int]:
    """(total MACs, int8 MACs) given the measured shape of every value."""
    total = int8 = 0
    for node in model.graph:
        macs = node_macs(node, shapes)
        total += macs
        if _is_int8(node):
            int8 += macs
    return total, int8


def _shape(v: ir.Value | None, shapes: Mapping[str, Sequence[int]]) -> Sequence[int] | None:
    if v is None:
        return None
    if v.name in shapes:
        return shapes[v.name]
    if v.const_value is not None:
        return v.const_value.shape.numpy()
    return None


def node_macs(node: ir.Node, shapes: Mapping[str, Sequence[int]]) -> int:
    out = _shape(node.outputs[0], shapes) if node.outputs else None
    if out is None:
        return 0
    n_out = int(np.prod(out))
    if node.op_type in CONV_OPS:
        w_idx = 3 if node.op_type == "QLinearConv" else 1
        w = _shape(node.inputs[w_idx], shapes)
        if w is None:
            return 0
        if node.op_type == "ConvTranspose":  # W is [Cin, Cout/group, k...]: each input feeds Cout/g * k outputs
            x = _shape(node.inputs[0], shapes)
            return int(np.prod(x)) * int(np.prod(w[1:])) if x is not None else 0
        return n_out * int(np.prod(w[1:]))
    if node.op_type in MATMUL_OPS:
        a = _shape(node.inputs[0], shapes)
        if a is None:
            return 0
        k = a[-1]
        if node.op_type == "Gemm" and attribute(node, "transA", 0):
            k = a[0]
        return n_out * int(k)
    if node.op_type in ATTENTION_OPS:
        x = _shape(node.inputs[0], shapes)
        if x is None or len(x) != 3:
            return 0
        b, s, h = (int(d) for d in x)
        return b * s * h * 3 * h + 2 * b * s * s * h
    return 0


def probe_shapes(model: ir.Model, feed: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
    names = [o.name for node in model.graph for o in node.outputs if o.name]
    session = make_session(model, threads=1, optimization="disable", extra_outputs=names)
    out_names = [o.name for o in session.get_outputs()]
    return {n: list(a.shape) for n, a in zip(out_names, run_feed(session, feed))}


def _load_failure(model: ir.Model, e: ModelLoadError) -> str:
    """Why the probe session did not load: the model itself, or only with every value exposed."""
    try:
        make_session(model, threads=1, optimization="disable")
    except ModelLoadError:
        return f"{e}; the model is invalid whatever the feed: check it with onnx.checker or export it again"
    return f"onnxruntime loads the model but not with its intermediate values exposed as outputs ({e})"


def summarize(model: ir.Model, shapes: Mapping[str, Sequence[int]] | None = None, probe: bool = True,
              values: Mapping[str, np.ndarray] | None = None) -> ModelSummary:
    """Summarize ``model``; with ``probe`` run it once to measure shapes and count MACs.

    Ops, parameters and opsets never need a run; when the probe cannot run MACs are left out
    with the reason: an input the defaults cannot fill or a feed the model rejects (fixed with
    --shape/--value), or a graph onnxruntime cannot load at all (fixed only in the model).
    """
    hist = collections.Counter(histogram(model))
    by_dtype: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for t in param_tensors(model.graph):
        entry = by_dtype[t.dtype.name.lower()]
        entry[0] += int(np.prod(t.shape.numpy()))
        entry[1] += t.nbytes
    specs = input_specs(model)
    seen: dict[str, list[int]] = {}
    macs = int8 = note = None
    assumed: list[str] = []
    if probe:
        image = image_size_hint(model)
        try:
            feed = synthesize_feed(specs, shapes, values=values, image_size=image)
            seen = probe_shapes(model, feed)
        except ModelLoadError as e:  # the graph itself: no --shape/--value makes onnxruntime load it
            note = _load_failure(model, e)
        except DataError as e:  # the synthesized feed does not fit, or the model rejects it when run
            note = f"{e}; give --shape/--value"
        else:
            seen.update({k: list(v.shape) for k, v in feed.items()})
            macs, int8 = count_macs(model, seen)
            assumed = feed_defaults(specs, shapes, values, image)
    outputs = [(o.name, o.dtype.name.lower() if o.dtype else "?",
                "x".join(str(d) for d in o.shape) if o.shape is not None else "?") for o in model.graph.outputs]
    return ModelSummary(
        opset=dict(model.opset_imports), inputs=specs, outputs=outputs,
        op_histogram=dict(hist.most_common()),
        params_by_dtype={k: (v[0], v[1]) for k, v in sorted(by_dtype.items())},
        macs=macs, int8_macs=int8, probe_shapes=seen, macs_note=note, feed_defaults=assumed,
    )
