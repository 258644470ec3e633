"""QuantizeMatMulNBitsPass: int4 weights for MatMul, run by onnxruntime's ``MatMulNBits``.

A ``MatMul(A, W)`` whose ``W`` is a constant float ``[K, N]`` initializer becomes
``com.microsoft.MatMulNBits(A, B, scales, zero_points)`` with ``bits=4``. Each column ``n`` of
``W`` is cut along ``K`` into blocks of ``block_size`` values (``K`` padded with zeros to a
whole block); each block gets an asymmetric 4-bit code::

    lo = min(min(w), 0),  hi = max(max(w), 0),  scale = (hi - lo) / 15
    zp = clip(round(-lo / scale), 0, 15),  q = clip(round(w / scale) + zp, 0, 15),  w ≈ (q - zp) * scale

(the range always holds 0, as onnxruntime's own blockwise quantizer does, so zeros and the
padding are exact; a block of zeros stores scale 1). Storage, as
the contrib op defines it: ``B`` uint8 ``[N, n_blocks, block_size / 2]`` with the first value
of each pair in the low nibble, ``scales`` ``[N * n_blocks]``, ``zero_points`` uint8
``[N * ceil(n_blocks / 2)]`` packed the same way. ``accuracy_level`` 4 lets onnxruntime's CPU
kernel compute in int8 (activations quantized per block at run time), the fast path on AVX2,
AVX-512 and ARM; 0 dequantizes to float.

``codes`` maps node names to codes computed elsewhere (``(B, scales, zero_points)`` in the
layout above; :mod:`edgecomp.quantize.int4` fits them to calibration data), stored as given
instead of the round-to-nearest codes.

Layers whose node name matches ``exclude`` (or whose weights are not a 2-D float constant, or
whose ``K`` is smaller than one block) are left alone and listed with the reason. A bias Add
after the MatMul stays as it is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.errors import ConfigError
from edgecomp.graph import MS_DOMAIN, NameAllocator, add_initializer
from edgecomp.passes.base import EdgecompPass, PassReport

__all__ = ["QuantizeMatMulNBitsPass", "dequantize_blocks_4bit", "quantize_blocks_4bit"]



def quantize_blocks_4bit(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed B [N, n_blocks, block/2], scales [N * n_blocks], packed zero points) for ``w`` [K, N]."""
    k, n = w.shape
    blocks = -(-k // block_size)
    wt = np.zeros((n, blocks * block_size), np.float32)
    wt[:, :k] = w.T
    wb = wt.reshape(n, blocks, block_size)
    lo, hi = np.minimum(wb.min(-1), 0.0), np.maximum(wb.max(-1), 0.0)  # 0 representable: padding stays exact
    scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32)
    zp = np.clip(np.round(-lo / scale), 0, 15).astype(np.uint8)
    q = np.clip(np.round(wb / scale[..., None]) + zp[..., None], 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    zp_flat = zp.reshape(n, blocks)
    if blocks % 2:
        zp_flat = np.concatenate([zp_flat, np.zeros((n, 1), np.uint8)], axis=1)
    zp_packed = (zp_flat[:, 0::2] | (zp_flat[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
    return packed, scale.reshape(-1), zp_packed


def dequantize_blocks_4bit(packed: np.ndarray, scales: np.ndarray, zp_packed: np.ndarray, k: int) -> np.ndarray:
    """The float ``[K, N]`` weights the stored arrays stand for (the numpy reference)."""
    n, blocks, half = packed.shape
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, 2 * half).astype(np.float32)
    zps = np.stack([zp_packed & 0x0F, zp_packed >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.float32)
    w = (q - zps[..., None]) * scales.reshape(n, blocks)[..., None]
    return w.reshape(n, -1)[:, :k].T


class QuantizeMatMulNBitsPass(EdgecompPass):
    """Replace MatMuls with constant weights by 4-bit ``MatMulNBits`` (see the module docstring)."""

    def __init__(self, block_size: int = 32, accuracy_level: int = 4, exclude: Sequence[str] = (),
                 only: Sequence[str] | None = None,
                 codes: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None):
        if block_size < 16 or block_size & (block_size - 1):
            raise ConfigError(f"int4 block size must be a power of two >= 16, got {block_size}")
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"accuracy_level must be 0..4, got {accuracy_level}")
        self.block_size, self.accuracy_level = block_size, accuracy_level
        self.exclude, self.only = tuple(exclude), None if only is None else tuple(only)
        self._patterns = [re.compile(p) for p in self.exclude]
        self.codes = dict(codes or {})

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        names = NameAllocator(graph)  # one index of the graph's names, not a whole-graph scan per weight
        rows, replaced, before, after = [], 0, 0, 0
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
                continue
            reason = self._skip_reason(node)
            if reason:
                rows.append({"layer": node.name, "decision": "float", "reason": reason})
                continue
            w = node.inputs[1].const_value.numpy().astype(np.float32)
            k, n = w.shape
            packed, scales, zps = self.codes.get(node.name) or quantize_blocks_4bit(w, self.block_size)
            if packed.shape != (n, -(-k // self.block_size), self.block_size // 2):
                raise ConfigError(f"int4 codes for {node.name!r} have shape {packed.shape}, not those of a {k}x{n} "
                                  f"weight in blocks of {self.block_size}")
            name = node.name or f"matmul_{replaced}"
            b = add_initializer(graph, names.unique(f"{name}_w_int4"), packed)
            s = add_initializer(graph, names.unique(f"{name}_w_scales"), scales)
            z = add_initializer(graph, names.unique(f"{name}_w_zero_points"), zps)
            new = ir.Node(MS_DOMAIN, "MatMulNBits", [node.inputs[0], b, s, z], name=f"{name}_int4",
                          attributes=[ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", 4),
                                      ir.AttrInt64("block_size", self.block_size),
                                      ir.AttrInt64("accuracy_level", self.accuracy_level)])
            graph.insert_before(node, new)
            names.claim(new.name)
            out = new.outputs[0]
            out.name, out.type, out.shape = node.outputs[0].name, node.outputs[0].type, node.outputs[0].shape
            old = node.outputs[0]
            old.name = None
            old.replace_all_uses_with(out, replace_graph_outputs=True)
            weight = node.inputs[1]
            graph.remove(node, safe=True)
            if not weight.uses() and not weight.is_graph_output():
                graph.initializers.pop(weight.name, None)
            replaced += 1
            before += w.nbytes
            after += packed.nbytes + scales.nbytes + zps.nbytes
            err = float(np.abs(dequantize_blocks_4bit(packed, scales, zps, k) - w).max())
            rows.append({"layer": node.name, "decision": "int4", "K x N": f"{k}x{n}", "max abs weight err": err})
        if replaced and MS_DOMAIN not in model.opset_imports:
            model.opset_imports[MS_DOMAIN] = 1
        summary = {"int4 layers": replaced, "weight bytes": f"{before} -> {after}"}
        return self.report(model, replaced > 0, summary, rows)

    def _skip_reason(self, node: ir.Node) -> str | None:
        if self.only is not None and node.name not in self.only:
            return "not selected"
        if any(p.search(node.name or "") for p in self._patterns):
            return "excluded"
        w = node.inputs[1]
        if w is None or w.const_value is None or w.is_graph_input():
            return "weights are not a constant initializer"
        arr = w.const_value
        if len(arr.shape) != 2 or not np.issubdtype(arr.dtype.numpy(), np.floating):
            return "weights are not a 2-D float matrix"
        if arr.shape[0] < self.block_size:
            return f"K = {arr.shape[0]} is smaller than one block ({self.block_size})"
        if node.inputs[0].dtype not in (None, ir.DataType.FLOAT):
            return "activation is not float32"
        return None

