"""int4 at rest, int8 speed: the 4-bit weight codes stored in the file, the int8 kernel at run time.

onnxruntime's ``MatMulNBits`` (int4 weights) runs 2.5-3.1x the latency of the int8
``MatMulIntegerToFloat`` on x86 (onnxruntime issue 23004; BENCHMARKS.md, int4), so on x86 int4 is
worth having for size only. This form keeps the size and the int8 speed: each int4 layer is an int8
layer (the contrib form's ``MatMulIntegerToFloat``, the same activation grid, smoothing and bias)
whose int8 weight is not stored but computed from the stored int4 codes by a chain of constant
ops, which onnxruntime's constant folding evaluates once when the session is created::

    q   = codes unpacked from two per byte, in float:  hi = floor(p / 16),  lo = p - 16 hi
    Ŵ   = (float(q) - zp[block]) · float(scale[block])          (per block of B rows along K, per column;
                                                                 scale stored as float16)
    W_q = int8(clip(round(diag(s) Ŵ / w_scale), -qmax, qmax))   (s: the SmoothQuant divisor, or 1)

``w_scale`` (per column, stored beside the codes: the op's own scale input may have been rescaled
since, by a SmoothQuant fold into the value projection) and ``W_q`` are exactly what the int8 form
computes from ``Ŵ`` (the pass checks the stored int8 weight against them)
(:func:`edgecomp.quantize.quantize_static.quantize_weight`: float32 IEEE ops, Round half to
even in both), so after the fold the session holds the same int8 weight as an int8 model built
from ``Ŵ``, and runs the same kernels. At rest a weight costs 4 bits plus its block's float16
scale and uint8 zero point (B = 32: 4.75 bits, 0.59 of int8); a symmetric grid (every zero point 8)
stores no zero points (B = 32: 4.5 bits; B = 128: 4.125 bits); each layer has its own block and grid. Every op is ai.onnx at opset 13 or older (Round 11,
Clip 11 with min/max inputs), so no model has to move to opset 21 for a native int4 tensor.

Load time grows by the fold (one pass over the weights); steady-state latency is the int8 model's.
Where ``MatMulNBits`` is the faster kernel (ARM with KleidiAI) the ``nbits`` form stays the choice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (not imported by onnx_ir itself)

from edgecomp.errors import PassFailed
from edgecomp.graph import NameAllocator, add_initializer
from edgecomp.passes.base import EdgecompPass, PassReport, run_pass
from edgecomp.quantize.qparams import quantize_weight

__all__ = ["Int4AtRestPass", "apply_int4_at_rest", "bytes_by_kind", "BYTE_KINDS", "at_rest_codes", "pack_codes", "unpacked_codes", "int4_weights",
           "FOLDED_OPS"]

#: the ops of the weight chain, which onnxruntime folds away at session creation
FOLDED_OPS = frozenset({"Floor", "Sub", "Concat", "Reshape", "Cast", "Mul", "Div", "Round", "Clip", "Slice"})
FLOAT = int(ir.DataType.FLOAT)


def pack_codes(q: np.ndarray) -> np.ndarray:
    """4-bit codes ``q`` [R, N] (0..15, R even) as [R/2, N] bytes: row 2i in the low nibble, 2i+1 high."""
    return (q[0::2] | (q[1::2] << 4)).astype(np.uint8)


def unpacked_codes(p: np.ndarray) -> np.ndarray:
    """The inverse of :func:`pack_codes` (what the graph's chain computes)."""
    lo, hi = p & 15, p >> 4
    return np.stack([lo, hi], axis=1).reshape(2 * p.shape[0], p.shape[1])


def at_rest_codes(c: Any) -> Any:
    """``c`` with its scales rounded to float16, as they are stored (half the bytes; the int8 weight
    is computed from these, so the model's fidelity check sees exactly what is written)."""
    return dataclasses.replace(c, scale=c.scale.astype(np.float16).astype(np.float32))


def int4_weights(model: ir.Model, codes: Mapping[str, Any]) -> ir.Model:
    """A copy of the float ``model`` whose MatMuls named in ``codes`` read their dequantized int4
    weight ``Ŵ`` (so the int8 plan built on it quantizes ``Ŵ``, as the chain will)."""
    out = model.clone()
    nodes = {n.name: n for n in out.graph}
    names = NameAllocator(out.graph)
    for name, c in codes.items():
        node = nodes.get(name)
        if node is None or node.op_type != "MatMul":
            raise PassFailed(f"int4 layer {name!r} is not a MatMul of the model")
        node.replace_input_with(1, add_initializer(out.graph, names.unique(f"{name}_int4_weight"),
                                                   at_rest_codes(c).dequantize()))
    return out


class Int4AtRestPass(EdgecompPass):
    """Replace the stored int8 weight of each int4 layer's ``MatMulIntegerToFloat`` by the int4 chain
    (see the module docstring). Run on the contrib int8 model built from :func:`int4_weights`.

    Args:
        codes: per layer (the float model's MatMul name), its ``Int4Codes``.
        smooth: per layer, the SmoothQuant divisor its int8 plan applies (absent or None: none).
        weight_bits: per layer, the int8 plan's weight bits (qmax 127 for 8, 63 for 7).
        per_channel: per layer, the int8 plan's per_channel (default True).
    """

    def __init__(self, *, codes: Mapping[str, Any], smooth: Mapping[str, np.ndarray | None] | None = None,
                 weight_bits: Mapping[str, int] | None = None, per_channel: Mapping[str, bool] | None = None):
        self.codes = dict(codes)
        self.smooth = dict(smooth or {})
        self.weight_bits = dict(weight_bits or {})
        self.per_channel = dict(per_channel or {})

    def options(self) -> dict[str, Any]:
        return {"layers": len(self.codes)}

    def call(self, model: ir.Model) -> PassReport:
        by_weight = {}
        for n in model.graph:
            if n.op_type == "MatMulIntegerToFloat" and n.domain == "com.microsoft":
                by_weight.setdefault(n.name.removesuffix("_int8"), n)
        names = NameAllocator(model.graph)
        rows, constants = [], {}
        for name, c in self.codes.items():
            node = by_weight.get(name)
            if node is None or node.inputs[1].const_value is None:
                raise PassFailed(f"int4 layer {name!r} has no int8 MatMulIntegerToFloat to store at rest")
            stored = node.inputs[1].const_value.numpy()
            # the int8 codes as the int8 pass made them from Ŵ (its scale, recomputed: the op's own scale input
            # may since have been rescaled by a fold, FoldSmoothQuantPass's value projection)
            smooth = self.smooth.get(name)
            w_hat = at_rest_codes(c).dequantize()
            bits = self.weight_bits.get(name, 8)
            q8, w_scale = quantize_weight(w_hat if smooth is None else w_hat * smooth[:, None], bits, axis=1,
                                          per_channel=self.per_channel.get(name, True))
            if q8.shape != stored.shape or not np.array_equal(q8, stored):
                raise PassFailed(f"int4 layer {name!r}: its stored int8 weight was not made from these int4 codes")
            chain = _Chain(model.graph, names, name, f"int4_{len(rows)}", constants)
            # the op's own weight scale is the chain's divisor unless a fold rescaled it: then a second copy
            op_scale = node.inputs[3]
            scale_value = op_scale if _holds(op_scale, w_scale) else chain.const("w_scale", w_scale)
            wq = chain.int8_weight(c, smooth, scale_value, 127 if bits == 8 else 63)
            if wq.shape != stored.shape:
                raise PassFailed(f"int4 layer {name!r}: the chain's weight {list(wq.shape)} is not the stored "
                                 f"{list(stored.shape)}")
            node.replace_input_with(1, wq.value)
            rows.append({"layer": name, "chain": chain.short, "block": c.block, "bytes at rest": chain.bytes, "bytes int8": stored.nbytes})
        if rows:
            model.graph.sort()  # the chains were appended after their readers
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return self.report(model, bool(rows), {"int4 at rest": len(rows),
                                               "bytes at rest": sum(r["bytes at rest"] for r in rows),
                                               "bytes int8": sum(r["bytes int8"] for r in rows)}, rows)


def _holds(value: ir.Value | None, a: np.ndarray) -> bool:
    """Whether ``value`` is a constant equal to ``a`` (float32, the same number of elements)."""
    if value is None or value.const_value is None or value.const_value.size != np.size(a):
        return False
    stored = value.const_value.numpy()
    return stored.dtype == np.float32 and np.array_equal(stored.reshape(-1), np.asarray(a, np.float32).reshape(-1))


class _Value:
    def __init__(self, value: ir.Value, shape: tuple[int, ...]):
        self.value, self.shape = value, shape


class _Chain:
    """Builds the constant chain of one layer into the graph."""

    def __init__(self, graph: ir.Graph, names: NameAllocator, base: str, short: str, constants: dict):
        # stored arrays are named for their layer; the chain's ~15 nodes and values get the short prefix
        # (a layer's full name on each costs ~7 kB a layer in the file: 0.26 MB of MiniLM's 12 MB)
        self.graph, self.names, self.base, self.short, self.constants = graph, names, base, short, constants
        self.bytes = 0

    def const(self, tag: str, a: np.ndarray) -> ir.Value:
        self.bytes += a.nbytes
        return add_initializer(self.graph, self.names.unique(f"{self.base}_{tag}"), a)

    def shared(self, tag: str, a: np.ndarray) -> ir.Value:
        """A small constant (a scalar, a shape) stored once for every chain of the pass."""
        a = np.asarray(a)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self.constants:
            self.bytes += a.nbytes
            self.constants[key] = add_initializer(self.graph, self.names.unique(f"int4_shared_{tag}"), a)
        return self.constants[key]

    def op(self, op: str, inputs, tag: str, **attrs) -> ir.Value:
        node = ir.node(op, inputs, attributes=attrs or None, name=self.names.unique(f"{self.short}_{tag}"), num_outputs=1)
        node.outputs[0].name = self.names.unique(f"{self.short}_{tag}_out")
        self.graph.append(node)
        return node.outputs[0]

    def int8_weight(self, c, smooth: np.ndarray | None, w_scale: ir.Value, qmax: int) -> _Value:
        k, n = c.q.shape
        blocks = c.scale.shape[0]
        rows = blocks * c.block
        q = np.repeat(c.zp, c.block, axis=0)  # K padded to whole blocks with the zero point's code (value 0)
        q[:k] = c.q
        p = self.op("Cast", [self.const("int4_codes", pack_codes(q))], "packed_float", to=FLOAT)  # [rows/2, N]
        # the nibbles in float (exact for 0..255): hi = floor(p / 16), lo = p - 16 hi
        hi = self.op("Floor", [self.op("Mul", [p, self.shared("sixteenth", np.float32(1 / 16))], "p16")], "hi")
        lo = self.op("Sub", [p, self.op("Mul", [hi, self.shared("sixteen", np.float32(16))], "hi16")], "lo")
        # rows 2i (lo) and 2i+1 (hi): [rows/2, 1, N] twice, concatenated on axis 1, then [blocks, B, N]
        shape3 = self.shared("pair_shape", np.array([rows // 2, 1, n], np.int64))
        pairs = self.op("Concat", [self.op("Reshape", [lo, shape3], "lo3"), self.op("Reshape", [hi, shape3], "hi3")],
                        "pairs", axis=1)
        qf = self.op("Reshape", [pairs, self.shared("block_shape", np.array([blocks, c.block, n], np.int64))], "blocked")
        if getattr(c, "symmetric", False):  # every zero point is 8: one scalar, no stored array
            zp = self.shared("int4_zero_point", np.float32(8))
        else:
            zp = self.op("Cast", [self.const("int4_zero_point", c.zp.reshape(blocks, 1, n))], "zp_float", to=FLOAT)
        scale = self.op("Cast", [self.const("int4_scale", c.scale.astype(np.float16).reshape(blocks, 1, n))],
                        "scale_float", to=FLOAT)
        w = self.op("Mul", [self.op("Sub", [qf, zp], "centered"), scale], "dequantized")
        w = self.op("Reshape", [w, self.shared("weight_shape", np.array([rows, n], np.int64))], "weight_padded")
        if rows != k:
            w = self.op("Slice", [w, self.shared("start", np.array([0], np.int64)), self.shared("end", np.array([k], np.int64)),
                                  self.shared("axes", np.array([0], np.int64))], "weight")
        if smooth is not None:
            w = self.op("Mul", [w, self.const("smooth", smooth.astype(np.float32).reshape(k, 1))], "smoothed")
        w = self.op("Round", [self.op("Div", [w, w_scale], "scaled")], "rounded")
        w = self.op("Clip", [w, self.shared("qmin", np.float32(-qmax)), self.shared("qmax", np.float32(qmax))], "clipped")
        return _Value(self.op("Cast", [w], "int8_weight", to=int(ir.DataType.INT8)), (k, n))


def apply_int4_at_rest(int8_model: ir.Model, codes: Mapping[str, Any], plan: Mapping[str, Any]) -> ir.Model:
    """:class:`Int4AtRestPass` on ``int8_model`` with the plan's smoothing and weight bits."""
    smooth = {k: plan[k].smooth for k in codes if k in plan}
    bits = {k: plan[k].weight_bits for k in codes if k in plan}
    per_channel = {k: plan[k].per_channel for k in codes if k in plan}
    return run_pass(Int4AtRestPass(codes=codes, smooth=smooth, weight_bits=bits, per_channel=per_channel),
                    int8_model).model


#: the initializer kinds :func:`bytes_by_kind` reports, in its order
BYTE_KINDS = ("int4 codes (MatMul weights)", "int4 scales", "int4 zero points", "int8 weights",
              "int4 chain vectors (int8 weight scale, smoothing)", "table int4 codes", "table int8 codes",
              "table scales and offsets", "float weights (2-D and up)", "float vectors (bias, LayerNorm, grids, zero points)",
              "integer (id maps, shapes)", "other")
_CHAIN_TAGS = {"_int4_codes": 0, "_int4_scale": 1, "_int4_zero_point": 2, "_w_scale": 4, "_smooth": 4}


def _kind(value: ir.Value) -> str:
    tensor = value.const_value
    dtype = tensor.dtype
    uses = [(u.node.op_type, u.idx) for u in value.uses()]
    for u in value.uses():  # a float16 array read through a Cast to float: its reader counts
        if u.node.op_type == "Cast":
            uses += [(v.node.op_type, v.idx) for v in u.node.outputs[0].uses()]
    if any(op == "MatMulNBits" for op, _ in uses):
        idx = next(i for op, i in uses if op == "MatMulNBits")
        return BYTE_KINDS[{1: 0, 2: 1, 3: 2}.get(idx, 11)]
    base = (value.name or "").removesuffix("_float16").rstrip("0123456789_")
    tag = next((t for t in _CHAIN_TAGS if base.endswith(t)), None)
    if tag:
        return BYTE_KINDS[_CHAIN_TAGS[tag]]
    gathered = any(op == "Gather" and i == 0 for op, i in uses)
    if gathered and dtype == ir.DataType.UINT8:
        return BYTE_KINDS[5]
    if gathered and dtype == ir.DataType.INT8:
        return BYTE_KINDS[6]
    if gathered and dtype in (ir.DataType.FLOAT16, ir.DataType.FLOAT) and base.endswith(("_scale", "_lo")):
        return BYTE_KINDS[7]
    if dtype == ir.DataType.INT8 and len(tensor.shape) >= 2:
        return BYTE_KINDS[3]
    if dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE):
        return BYTE_KINDS[8] if len(tensor.shape) >= 2 and tensor.size >= 1024 else BYTE_KINDS[9]
    if dtype in (ir.DataType.INT8, ir.DataType.UINT8) and len(tensor.shape) < 2:
        return BYTE_KINDS[9]  # the int8 ops' zero points
    if dtype in (ir.DataType.INT32, ir.DataType.INT64):
        return BYTE_KINDS[10]
    return BYTE_KINDS[11]


def bytes_by_kind(model: ir.Model) -> list[dict[str, Any]]:
    """Where a model's bytes go: its initializers summed by kind (:data:`BYTE_KINDS`: int4 codes,
    scales and zero points of MatMul weights, int8 weights, embedding table codes and scales, float
    weights and vectors, integer maps), largest kind first, with the largest initializer of each."""
    rows: dict[str, dict[str, Any]] = {}
    for value in model.graph.initializers.values():
        if value.const_value is None:
            continue
        kind = _kind(value)
        n = value.const_value.nbytes
        row = rows.setdefault(kind, {"kind": kind, "bytes": 0, "initializers": 0, "largest": "", "largest bytes": 0})
        row["bytes"] += n
        row["initializers"] += 1
        if n > row["largest bytes"]:
            row["largest"], row["largest bytes"] = value.name, n
    return sorted(rows.values(), key=lambda r: -r["bytes"])
