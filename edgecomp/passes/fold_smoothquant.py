"""FoldSmoothQuantPass: fold SmoothQuant's per-channel ``Mul(x, 1/s)`` into the op that produces ``x``.

SmoothQuant divides an activation by ``s`` (per channel, the last axis) before its QuantizeLinear
and multiplies the weights by ``s``; the static int8 pass emits the division as a float ``Mul``
on every smoothed activation. Where ``x``'s producer is linear per channel the division is folded
into it and the ``Mul`` disappears. Only a ``Mul`` every consumer of which is a QuantizeLinear is
considered (the smoothing the quantizer emitted); every fold is the same function in exact
arithmetic (float results differ by rounding only).

Cases handled:

- ``x = LayerNormalization(h, γ, β)`` over the last axis, constant γ (and β):
  ``LN(h)·(1/s) = norm(h)·(γ/s) + β/s``, so γ' = γ/s, β' = β/s. Every reader of ``x`` must want
  ``x/s``: the other readers must be Muls by the same constant (one divisor for the group) or
  ``Shape`` nodes (shape only). A LayerNorm output also read by anything else — the residual Add
  of a post-LN transformer (BERT) — stays as it is: folding would need a ``Mul`` by ``s`` on the
  residual, the same cost.
- ``x`` the attention context ``Reshape(Transpose(MatMul(P, Transpose(Reshape(V)))))`` with
  ``V = x_v·W_v + b_v`` the value projection: attention is linear in V per channel
  (``ctx[…, n] = Σ_t P[…, t]·V[t, n]``), so dividing V's output channels by ``s`` divides the
  context's: ``W_v[:, n] /= s_n``, ``b_v[n] /= s_n``. For an int8 value projection
  (MatMulIntegerToFloat, or a QDQ MatMul reading DequantizeLinear(W_q, w_scale, axis 1)) the per
  column weight scale is divided instead — the int8 codes do not change. The channel mapping is
  checked: the first Reshape's target ends in constants ``H, D`` with ``H·D = N`` (channel
  ``n = h·D + d``), the Transposes are inverse permutations that keep ``d`` last and do not
  contract over ``h``, the second Reshape's target ends in ``N``, V is the MatMul's second operand
  and every value on the chain has one reader. An int8 attention product (MatMulIntegerToFloat)
  quantizes V per tensor and is left alone.
- anything else (a Mul after GELU: a nonlinearity) stays, and the record says why.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (not imported by onnx_ir itself)

from edgecomp.graph import NameAllocator, add_initializer, attribute, const_array, single_use
from edgecomp.passes.base import EdgecompPass, PassReport, one_line_failures

__all__ = ["FoldSmoothQuantPass"]


class _Skip(Exception):
    """A Mul that stays, with the reason."""


class FoldSmoothQuantPass(EdgecompPass):
    """Fold SmoothQuant's ``Mul(x, 1/s)`` before QuantizeLinear into LayerNorm γ/β or the value
    projection (see the module docstring). No options: every fold is exact."""

    @one_line_failures
    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        names = NameAllocator(graph)
        rows: list[dict[str, Any]] = []
        done: set[int] = set()
        for mul in list(graph):
            if id(mul) in done or not _is_smoothing(mul):
                continue
            x, c = mul.inputs[0], const_array(mul.inputs[1]).astype(np.float32)
            try:
                producer = x.producer()
                if producer is not None and producer.op_type == "LayerNormalization":
                    muls = _fold_layernorm(graph, names, producer, x, c)
                    into = "LayerNorm γ, β"
                elif producer is not None and producer.op_type == "Reshape":
                    _fold_value_projection(graph, names, x, c)
                    muls, into = [mul], "value projection"
                else:
                    found = "a graph input" if producer is None else producer.op_type
                    raise _Skip(f"the activation comes from {found}: not a LayerNorm or an attention context")
            except _Skip as why:
                rows.append({"mul": mul.name, "folded": False, "reason": str(why)})
                continue
            for m in muls:
                done.add(id(m))
                m.outputs[0].replace_all_uses_with(x)
                graph.remove(m, safe=True)
                rows.append({"mul": m.name, "folded": True, "into": into})
        folded = sum(r["folded"] for r in rows)
        if folded:
            ir.passes.common.RemoveUnusedNodesPass()(model)  # the replaced scales and biases
        return self.report(model, folded > 0, {"folded": folded, "kept": len(rows) - folded}, rows)


def _is_smoothing(node: ir.Node) -> bool:
    """``Mul(x, c)`` with ``c`` a constant vector over the last axis, read only by QuantizeLinear."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    c = const_array(node.inputs[1])
    out = node.outputs[0]
    uses = list(out.uses())
    return (c is not None and c.ndim == 1 and c.size > 1 and c.dtype == np.float32 and bool(uses)
            and not out.is_graph_output() and all(u.node.op_type == "QuantizeLinear" for u in uses))


def _fold_layernorm(graph: ir.Graph, names: NameAllocator, ln: ir.Node, x: ir.Value, c: np.ndarray) -> list[ir.Node]:
    """γ' = γ·c, β' = β·c; returns the Muls made redundant (every reader of ``x`` wanting ``x·c``)."""
    if x is not ln.outputs[0] or x.is_graph_output():
        raise _Skip("the LayerNorm output is a graph output")
    axis = attribute(ln, "axis", -1)
    if axis != -1 and not (x.shape is not None and axis == len(x.shape) - 1):
        raise _Skip(f"the LayerNorm normalizes from axis {axis}, not over the last axis only")
    muls = []
    for use in x.uses():
        n = use.node
        if n.op_type == "Shape":
            continue
        other = const_array(n.inputs[1]) if n.op_type == "Mul" and len(n.inputs) == 2 and use.idx == 0 else None
        if other is None or not _is_smoothing(n) or other.shape != c.shape or not np.array_equal(other, c):
            raise _Skip(f"the LayerNorm output is also read by {n.op_type} {n.name!r} (folding would need "
                        "a Mul on that path)")
        muls.append(n)
    gamma = const_array(ln.inputs[1])
    beta = const_array(ln.inputs[2]) if len(ln.inputs) > 2 and ln.inputs[2] is not None else None
    if gamma is None or (len(ln.inputs) > 2 and ln.inputs[2] is not None and beta is None):
        raise _Skip("the LayerNorm's scale or bias is not a constant")
    if np.broadcast_shapes(gamma.shape, c.shape) != c.shape:
        raise _Skip("the LayerNorm's scale does not broadcast over the channels")
    base = ln.name or "layernorm"
    ln.replace_input_with(1, add_initializer(graph, names.unique(f"{base}_scale_smoothed"),
                                             (gamma.astype(np.float32) * c).astype(gamma.dtype)))
    if beta is not None:
        ln.replace_input_with(2, add_initializer(graph, names.unique(f"{base}_bias_smoothed"),
                                                 (beta.astype(np.float32) * c).astype(beta.dtype)))
    return muls


def _fold_value_projection(graph: ir.Graph, names: NameAllocator, x: ir.Value, c: np.ndarray) -> None:
    n_ch = c.size
    reshape2 = _one_reader_producer(x, "Reshape", "the smoothed activation")
    t2 = _one_reader_producer(reshape2.inputs[0], "Transpose", "the context Reshape's input")
    matmul = _one_reader_producer(t2.inputs[0], "MatMul", "the context Transpose's input")
    t1 = _one_reader_producer(matmul.inputs[1], "Transpose", "the attention product's second operand")
    reshape1 = _one_reader_producer(t1.inputs[0], "Reshape", "the value Transpose's input")
    if not _splits_and_merges_channels(_target_entries(reshape1), _target_entries(reshape2), n_ch):
        raise _Skip("the Reshapes around the attention product do not split the channels into heads and back")
    p1, p2 = attribute(t1, "perm"), attribute(t2, "perm")
    r = len(p1) if p1 is not None else 0
    if (p1 is None or p2 is None or len(p2) != r or r < 3 or [p1[i] for i in p2] != list(range(r))
            or p1[-1] != r - 1 or p1[-2] == r - 2):
        raise _Skip("the attention Transposes do not keep the head channels in place")
    _divide_projection_channels(graph, names, reshape1.inputs[0], c)


def _one_reader_producer(v: ir.Value, op: str, what: str) -> ir.Node:
    p = v.producer()
    if p is None or p.op_type != op or p.domain not in ("", "ai.onnx"):
        found = "a graph input or constant" if p is None else f"{p.domain + '.' if p.domain else ''}{p.op_type}"
        raise _Skip(f"{what} comes from {found}, not {op}" + (" (an int8 attention product quantizes V per tensor)"
                                                              if p is not None and p.op_type == "MatMulIntegerToFloat"
                                                              and op == "MatMul" else ""))
    if single_use(v) is None:
        raise _Skip(f"{what} has other readers")
    return p


def _target_entries(reshape: ir.Node) -> list[int | ir.Value] | None:
    """A Reshape target's entries: ints where constant, the one-element Value otherwise (a Concat
    of parts, as exporters write ``[batch, seq, -1, head_dim]``)."""
    target = reshape.inputs[1]
    if const_array(target) is not None:
        return [int(v) for v in const_array(target).reshape(-1)]
    p = target.producer()
    if p is None or p.op_type != "Concat":
        return None
    entries: list[int | ir.Value] = []
    for part in p.inputs:
        a = const_array(part)
        if a is not None:
            entries += [int(v) for v in a.reshape(-1)]
        elif part is not None and _one_entry(part):
            entries.append(part)
        else:
            return None
    return entries


def _one_entry(v: ir.Value) -> bool:
    """Whether a computed Concat part holds one entry: its shape says so, or it is a Gather of a
    one-element index (or the Unsqueeze of a scalar Gather), as exporters read a dimension."""
    if v.shape is not None and v.shape.dims == (1,):
        return True
    p = v.producer()
    if p is not None and p.op_type == "Unsqueeze":
        g = p.inputs[0].producer()
        idx = const_array(g.inputs[1]) if g is not None and g.op_type == "Gather" else None
        return idx is not None and idx.ndim == 0
    idx = const_array(p.inputs[1]) if p is not None and p.op_type == "Gather" else None
    return idx is not None and idx.shape == (1,)


def _splits_and_merges_channels(first: list | None, second: list | None, n_ch: int) -> bool:
    """Whether the first Reshape splits the last axis (N channels) into [H, D] with channel
    ``n = h·D + d`` and the second merges [H, D] back into N: constant tails ``[H, D]``, ``H·D = N``
    and ``[N]``; or ``[-1, D]`` and ``[-1]`` (or N) after the same leading entries (the batch and
    sequence sizes read once, so ``-1`` resolves to ``H = N / D`` in both)."""
    if first is None or second is None or len(first) != len(second) + 1 or len(second) < 2:
        return False
    if any(isinstance(e, int) and e == 0 for e in first + second):  # 0 copies an input dim: not followed here
        return False
    h, d, n = first[-2], first[-1], second[-1]
    if not (isinstance(d, int) and d > 0 and isinstance(h, int) and isinstance(n, int) and n in (-1, n_ch)):
        return False
    if h > 0 and n == n_ch and h * d == n_ch:
        return True
    same_lead = all(a is b or (isinstance(a, int) and isinstance(b, int) and a == b and a > 0)
                    for a, b in zip(first[:-2], second[:-1]))
    return same_lead and n_ch % d == 0 and h in (-1, n_ch // d)


def _divide_projection_channels(graph: ir.Graph, names: NameAllocator, v: ir.Value, c: np.ndarray) -> None:
    """Multiply the output channels of the projection producing ``v`` by ``c`` (its weight — or its
    per-column int8 weight scale — and its bias)."""
    p = v.producer()
    if p is None:
        raise _Skip("the value is not computed by a projection")
    if single_use(v) is None:
        raise _Skip("the value projection's output has other readers")
    if p.domain == "com.microsoft" and p.op_type == "MatMulIntegerToFloat":
        _scale_input(graph, names, p, 3, c, "the value projection's weight scale")
        if len(p.inputs) > 6 and p.inputs[6] is not None:
            _scale_input(graph, names, p, 6, c, "the value projection's bias")
        return
    if p.op_type == "Add" and p.domain in ("", "ai.onnx"):
        k = next((i for i, x in enumerate(p.inputs) if const_array(x) is not None), None)
        mm = p.inputs[1 - k].producer() if k is not None else None
        if mm is None or mm.op_type != "MatMul" or single_use(p.inputs[1 - k]) is None:
            raise _Skip("the value is not a MatMul plus a constant bias")
        _scale_matmul_weight(graph, names, mm, c)
        _scale_input(graph, names, p, k, c, "the value projection's bias")
        return
    if p.op_type == "MatMul" and p.domain in ("", "ai.onnx"):
        _scale_matmul_weight(graph, names, p, c)
        return
    raise _Skip(f"the value comes from {p.op_type}, not a MatMul projection")


def _scale_matmul_weight(graph: ir.Graph, names: NameAllocator, mm: ir.Node, c: np.ndarray) -> None:
    w = mm.inputs[1]
    if const_array(w) is not None:
        _scale_input(graph, names, mm, 1, c, "the value projection's weight")
        return
    dq = w.producer()
    if (dq is not None and dq.op_type == "DequantizeLinear" and single_use(w) is not None
            and attribute(dq, "axis", 1) in (1, -1) and attribute(dq, "block_size", 0) == 0):
        _scale_input(graph, names, dq, 1, c, "the value projection's weight scale")
        return
    raise _Skip("the value projection's weight is neither a constant nor a per-column DequantizeLinear")


def _scale_input(graph: ir.Graph, names: NameAllocator, node: ir.Node, idx: int, c: np.ndarray, what: str) -> None:
    """Replace ``node.inputs[idx]`` (a constant whose last axis is the channels) by a new constant
    times ``c`` (a new initializer: the old one may have other readers)."""
    a = const_array(node.inputs[idx])
    if a is None or a.ndim == 0 or a.shape[-1] != c.size or a.dtype != np.float32:
        raise _Skip(f"{what} is not a float32 constant with one entry per channel")
    base = node.inputs[idx].name or node.name
    node.replace_input_with(idx, add_initializer(graph, names.unique(f"{base}_smoothed"), (a * c).astype(np.float32)))
