"""Multi-head attention as a pruning unit: one 'heads' atom per block, matched back from its Softmax.

    x ─ W_q (+b_q) ─ Reshape [b,s,h,d] ─ Transpose ─┐
    x ─ W_k (+b_k) ─ Reshape [b,s,h,d] ─ Transpose ─┴ MatMul ─ (scale, mask, bias terms) ─ Softmax ─┐
    x ─ W_v (+b_v) ─ Reshape [b,s,h,d] ─ Transpose ──────────────────────────────────────────────── MatMul
      ─ Transpose ─ Reshape [b,s,h·d] ─ W_o

Heads meet only in ``W_o``, so removing head ``j`` is exact for the heads kept: columns
``j·d … j·d+d-1`` of ``W_q``, ``W_k``, ``W_v`` (and their biases), the same rows of ``W_o``, and
the head count / merged width in the Reshape shapes.

Forms followed:

- separate Q/K/V MatMul (+ bias Add) or Gemm, a projection without bias (Whisper's k_proj), a
  scalar scale (Mul/Div) before or after the head Reshape or on the scores (Whisper scales q);
- one fused projection ``[hidden, 3·h·d]`` (GPT-2's Conv1D as Gemm/MatMul + Add, possibly with a
  2-D → 3-D Reshape) cut into q, k, v by Split (sizes as input or attribute) or Slice: the atom
  then edits the three column slices of one weight and the split sizes;
- score terms with a heads axis (T5's position bias, MPNet's relative position bias) keep the
  kept heads through a Gather on that axis (after an Expand to ``[1, h, 1, 1]`` where its size
  there is unknown, 1 or ``h``); a constant one is sliced;
- heads folded into the batch axis (DeBERTa-v2 without relative attention: q·kᵀ of ``[b·h, s, d]``,
  the scores unfolded to ``[-1, h, s, s]`` around Softmax, the context unfolded to ``[-1, h, s, d]``;
  every fold infers its first dim, the unfolds' head counts are rewritten), a scale computed as a
  one-element value (DeBERTa's ``sqrt(d)`` from a Shape);
- rotary position embeddings on q and k (Llama: ``x·cos + rotate_half(x)·sin``, per head);
- Softmax between Cast/Dropout, or wrapped in Flatten/Reshape (``onnx.version_converter``'s
  Softmax 11 → 13 adapter); Reshape shapes as constants or a Concat of pieces (TorchScript);
  a merged context reshaped to 2-D before a Gemm (GPT-2).

A Softmax that reads a product of two computed tensors and feeds a MatMul but matches none of this
(DeBERTa's disentangled c2p/p2c terms, grouped-query attention, a score term on the folded scores, ...) gets a heads group
kept whole whose reason says what stopped the match. Blocks that share weights (ALBERT calls one
layer several times) are tied into one group by :func:`edgecomp.prune.groups.find_groups`, so the
same heads go at every call site.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from edgecomp.graph import attribute, const_array, single_use
from edgecomp.prune.analysis import Edit, Layout

if TYPE_CHECKING:
    from edgecomp.prune.groups import ChannelAnalyzer

__all__ = ["find_heads", "shape_entries"]

_SCORE_OPS = {"Add", "Mul", "Div", "Sub", "Where", "Cast"}
_PASS_THROUGH = {"Cast", "Dropout", "Identity"}
_TO_END = 2 ** 31 - 1  # a Slice end at or past this runs to the end of the axis


class _NoMatch(Exception):
    """Why a Softmax that looks like attention is not followed (the message goes to the report)."""


@dataclasses.dataclass
class _Proj:
    """A projection ``x @ W (+ b)``: the layer, the weight axis of its output columns, its bias."""

    node: ir.Node
    w_axis: int
    width: int
    bias: tuple[ir.Node, int, int] | None  # (node, input index, axis of the columns)
    nodes: list[ir.Node]


@dataclasses.dataclass
class _Fused:
    """Q, K and V cut from one projection: the splitter and what sits between it and the layer."""

    proj: _Proj
    splitter: ir.Node
    reshape: ir.Node | None  # a 2-D → 3-D Reshape between the layer and the splitter
    parts: dict[int, int]  # id of each of the three outputs → its part (0, 1, 2 in column order)


@dataclasses.dataclass
class _Branch:
    reshape: ir.Node  # the Reshape to heads
    entries: list
    nodes: list[ir.Node]
    proj: _Proj | None  # its own projection, or None when fused
    fused: _Fused | None
    part: int = 0


def _scalar(v: ir.Value | None) -> bool:
    c = const_array(v)
    return c is not None and c.size == 1


def shape_entries(reshape: ir.Node) -> list[tuple[ir.Node, int, int, np.ndarray | None]] | None:
    """Per output dim of a Reshape: (node, input index, position, constant or None) to rewrite."""
    shape = reshape.inputs[1]
    c = const_array(shape)
    if c is not None:
        return [(reshape, 1, i, c.reshape(-1)[i:i + 1]) for i in range(c.size)]
    p = shape.producer()
    if p is None or p.op_type != "Concat":
        return None
    out = []
    for i, v in enumerate(p.inputs):
        cv = const_array(v)
        if cv is not None and cv.size != 1:
            return None
        out.append((p, i, 0, cv))
    return out


def _entry(e) -> int | None:
    return None if e[3] is None else int(e[3].reshape(-1)[0])


def _shape_reads_ok(value: ir.Value, node: ir.Node, rank: int | None, last_ok: bool = False) -> bool:
    """``value`` is read by ``node`` and otherwise only by Shape → Gather of a dim other than the
    last (or, with ``last_ok``, any Shape read: the caller rewrites what depends on the last dim)."""
    if value in value.graph.outputs:
        return False
    for use in value.uses():
        if use.node is node:
            continue
        if use.node.op_type != "Shape" or attribute(use.node, "start", 0) != 0:
            return False
        if last_ok:
            continue
        if rank is None:
            return False
        for g in use.node.outputs[0].uses():
            idx = const_array(g.node.inputs[1]) if g.node.op_type == "Gather" else None
            if idx is None or idx.size != 1 or int(idx.reshape(-1)[0]) % rank == rank - 1:
                return False
    return True


def _data_reader(value: ir.Value) -> ir.Node | None:
    """The one node reading ``value`` other than Shape nodes (whose reads the caller rewrites)."""
    data = [u.node for u in value.uses() if u.node.op_type != "Shape"]
    if len(data) != 1 or not _shape_reads_ok(value, data[0], None, last_ok=True):
        return None
    return data[0]


def _layer(value: ir.Value) -> _Proj:
    """The projection producing ``value`` as ``x @ W (+ b)`` (MatMul + Add, or Gemm)."""
    p = value.producer()
    nodes, bias = [], None
    if p is not None and p.op_type == "Add":
        consts = [i for i, v in enumerate(p.inputs) if const_array(v) is not None]
        if len(consts) != 1:
            raise _NoMatch("projection bias is not a constant")
        nodes.append(p)
        bias = (p, consts[0], -1)
        p = p.inputs[1 - consts[0]].producer()
    if p is None or p.op_type not in ("MatMul", "Gemm"):
        raise _NoMatch(f"projection is a {p.op_type if p is not None else 'graph input'}, not a MatMul or Gemm")
    w = const_array(p.inputs[1])
    if w is None or w.ndim != 2:
        raise _NoMatch(f"projection {p.name} has a computed weight")
    if single_use(p.outputs[0]) is None or p.outputs[0] in p.graph.outputs:
        raise _NoMatch(f"projection {p.name} output is read elsewhere")
    w_axis = 1
    if p.op_type == "Gemm":
        if int(attribute(p, "transA", 0)) or float(attribute(p, "alpha", 1.0)) != 1.0:
            raise _NoMatch(f"Gemm {p.name} with transA or alpha")
        w_axis = 0 if int(attribute(p, "transB", 0)) else 1
        if len(p.inputs) > 2 and p.inputs[2] is not None:
            c = const_array(p.inputs[2])
            if c is None or bias is not None:
                raise _NoMatch(f"Gemm {p.name} with a computed or second bias")
            if c.size == w.shape[w_axis] and c.shape[-1] == w.shape[w_axis]:
                bias = (p, 2, c.ndim - 1)
            elif c.size != 1:
                raise _NoMatch(f"Gemm {p.name} bias is not per column")
    if bias is not None and bias[0].op_type == "Add":
        c = const_array(bias[0].inputs[bias[1]])
        if c.size == 1:
            raise _NoMatch("projection bias is a scalar")
        if c.shape[-1] != w.shape[w_axis] or c.size != c.shape[-1]:
            raise _NoMatch("projection bias is not per column")
        bias = (bias[0], bias[1], c.ndim - 1)
    return _Proj(p, w_axis, int(w.shape[w_axis]), bias, [p] + nodes)


def _back_scalars(value: ir.Value, nodes: list[ir.Node], an: ChannelAnalyzer) -> ir.Value:
    """Walk up through Mul/Div by a scalar (a scale: a constant, or a computed value of one element
    such as DeBERTa's sqrt(d) from a Shape); a per-element constant stops the match."""
    p = value.producer()
    while p is not None and p.op_type in ("Mul", "Div") and len(p.inputs) == 2:
        a, b = p.inputs
        one = [_scalar(v) or (const_array(v) is None and (dims := an.dims(v)) is not None
                              and all(d == 1 for d in dims)) for v in (a, b)]
        if one[1] and not one[0]:
            main = a
        elif one[0] and not one[1] and p.op_type == "Mul":
            main = b
        else:
            if any(const_array(v) is not None and const_array(v).size > 1 for v in (a, b)):
                raise _NoMatch(f"{p.op_type} {p.name} by a non-scalar constant inside the block")
            break
        nodes.append(p)
        value = main
        p = value.producer()
    return value


def _slices_last(node: ir.Node | None, x: ir.Value) -> bool:
    """``node`` is a Slice of ``x`` along its last axis (rank 4) with step 1."""
    if node is None or node.op_type != "Slice" or node.inputs[0] is not x or len(node.inputs) < 4:
        return False
    axes = const_array(node.inputs[3])
    steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else np.ones(1)
    return axes is not None and axes.size == 1 and int(axes.reshape(-1)[0]) in (-1, 3) \
        and steps is not None and int(steps.reshape(-1)[0]) == 1


def _back_rotary(value: ir.Value, nodes: list[ir.Node], an: ChannelAnalyzer) -> ir.Value | None:
    """``x·cos + rotate_half(x)·sin`` (rotary position embedding, Llama; rotate_half =
    Concat(-x[..., d/2:], x[..., :d/2])) → ``x``. It works within each head's d, so it follows
    any head count as long as cos and sin broadcast over heads."""
    add = value.producer()
    if add is None or add.op_type != "Add" or len(add.inputs) != 2:
        return None
    muls = [v.producer() for v in add.inputs]
    if any(m is None or m.op_type != "Mul" for m in muls):
        return None
    for direct, rot in (muls, muls[::-1]):
        for j in (0, 1):
            x, cos = direct.inputs[j], direct.inputs[1 - j]
            for k in (0, 1):
                cat, sin = rot.inputs[k].producer(), rot.inputs[1 - k]
                if cat is None or cat.op_type != "Concat" or len(cat.inputs) != 2 \
                        or int(attribute(cat, "axis", 0)) not in (-1, 3):
                    continue
                neg = cat.inputs[0].producer()
                if neg is None or neg.op_type != "Neg" or not _slices_last(neg.inputs[0].producer(), x) \
                        or not _slices_last(cat.inputs[1].producer(), x):
                    continue
                for t in (cos, sin):
                    dims = list(const_array(t).shape) if const_array(t) is not None else an.dims(t)
                    if dims is None or (len(dims) >= 3 and dims[-3] != 1):
                        raise _NoMatch(f"rotary embedding {t.name} not known to broadcast over heads")
                nodes += [add, direct, rot, cat, neg, neg.inputs[0].producer(), cat.inputs[1].producer()]
                return x
    return None


def _transposes(value: ir.Value, nodes: list[ir.Node], an: ChannelAnalyzer) -> tuple[ir.Value, list[list[int]]]:
    """Walk up through scales, rotary embeddings and Transposes; the perms, nearest last."""
    perms = []
    while True:
        value = _back_scalars(value, nodes, an)
        x = _back_rotary(value, nodes, an)
        if x is not None:
            value = x
            continue
        p = value.producer()
        if p is None or p.op_type != "Transpose":
            return value, perms
        nodes.append(p)
        perms.append(list(attribute(p, "perm", list(range(len(value.shape or [0, 0, 0, 0])))[::-1])))
        value = p.inputs[0]


def _fold_entries(node: ir.Node | None, n: int) -> list | None:
    """The shape entries of a Reshape with ``n`` dims whose first is -1 (the batch·heads or batch
    axis inferred, so it follows the kept heads), else None."""
    if node is None or node.op_type != "Reshape":
        return None
    entries = shape_entries(node)
    if entries is None or len(entries) != n or _entry(entries[0]) != -1:
        return None
    return entries


def _splitter(value: ir.Value, an: ChannelAnalyzer, rank: int) -> tuple[_Fused, int]:
    """``value`` (of ``rank`` dims, as the head Reshape it feeds says) is one of three parts that
    Split or Slice cut from a fused projection."""
    sp = value.producer()
    src = sp.inputs[0]
    if sp.op_type == "Split":
        if len(sp.outputs) != 3:
            raise _NoMatch(f"Split {sp.name} into {len(sp.outputs)} parts, not q, k, v")
        axis = int(attribute(sp, "axis", 0))
        if axis % rank != rank - 1:
            raise _NoMatch(f"Split {sp.name} off the last axis")
        part = list(sp.outputs).index(value)
        parts = {id(o): i for i, o in enumerate(sp.outputs)}
    else:  # Slice: three of them read the fused output
        starts = attribute(sp, "starts", None)
        axes = attribute(sp, "axes", None)
        if starts is None:
            c = [const_array(sp.inputs[i]) if len(sp.inputs) > i and sp.inputs[i] is not None else None
                 for i in range(1, 5)]
            if c[0] is None or c[1] is None or (len(sp.inputs) > 3 and sp.inputs[3] is not None and c[2] is None) \
                    or (c[3] is not None and int(c[3].reshape(-1)[0]) != 1) \
                    or (len(sp.inputs) > 4 and sp.inputs[4] is not None and c[3] is None):
                raise _NoMatch(f"Slice {sp.name} with computed starts, ends, axes or steps")
            starts = c[0].reshape(-1).tolist()
            axes = None if c[2] is None else c[2].reshape(-1).tolist()
        axes = list(range(len(starts))) if axes is None else list(axes)
        if len(starts) != 1 or int(axes[0]) % rank != rank - 1:
            raise _NoMatch(f"Slice {sp.name} off the last axis")
        readers = [u.node for u in src.uses()]
        if len(readers) != 3 or any(r.op_type != "Slice" for r in readers):
            raise _NoMatch("fused projection not cut into three Slices")
        starts_of = []
        for r in readers:
            s = attribute(r, "starts", None)
            s = s if s is not None else const_array(r.inputs[1]).reshape(-1).tolist()
            starts_of.append(int(s[0]))
        order = sorted(range(3), key=lambda i: starts_of[i])
        parts = {i: order.index(i) for i in range(3)}
        part = parts[readers.index(sp)]
        sp = readers[0]  # one splitter node stands for the three
        parts = {id(readers[i].outputs[0]): parts[i] for i in range(3)}
    reshape = None
    p = src.producer()
    if p is not None and p.op_type == "Reshape":
        entries = shape_entries(p)
        if entries is None or not _shape_reads_ok(src, sp, rank) or single_use(p.outputs[0]) is None:
            raise _NoMatch(f"fused projection reshaped by {p.name} with a computed shape")
        reshape, src = p, p.inputs[0]
    proj = _layer(src)
    if proj.width % 3:
        raise _NoMatch(f"fused projection of {proj.width} columns does not split in three")
    return _Fused(proj, sp, reshape, parts), part


def _permuted(labels: str, perms: list, key: str, after: str = "") -> str:
    """Axis ``labels`` moved through the Transposes ``perms`` (nearest the Reshape last); a
    Transpose of another rank is no match."""
    out = list(labels)
    for perm in reversed(perms):
        if len(perm) != len(out):
            raise _NoMatch(f"{key} Transpose of rank {len(perm)}{after}")
        out = [out[i] for i in perm]
    return "".join(out)


def _branch(value: ir.Value, want: str, key: str, an: ChannelAnalyzer) -> tuple[_Branch, bool]:
    """From the Q, K or V operand of a MatMul back to its head Reshape and projection; whether its
    heads are folded into the batch axis ([b·h, s, d], DeBERTa) on the way."""
    nodes: list[ir.Node] = []
    v, perms = _transposes(value, nodes, an)
    p = v.producer()
    folded = False
    if p is not None and p.op_type == "Reshape" and len(shape_entries(p) or []) == 3:
        if _fold_entries(p, 3) is None:
            raise _NoMatch(f"the {key} Reshape to [batch·heads, seq, d] does not infer its first dim (-1)")
        labels3 = _permuted("Bsd", perms, key, " after folding the heads")
        if labels3 != want.replace("bh", "B"):
            raise _NoMatch(f"folded {key} laid out [{','.join(labels3)}]")
        nodes.append(p)
        if not _shape_reads_ok(p.inputs[0], p, None, last_ok=True):
            raise _NoMatch(f"the {key} heads are read elsewhere")
        folded = True
        v, perms = _transposes(p.inputs[0], nodes, an)
        want = "bhsd"
        p = v.producer()
    if p is None or p.op_type != "Reshape":
        raise _NoMatch(f"{key} is not a Reshape to heads but {p.op_type if p is not None else 'a graph input'}")
    e = p.inputs[0].producer()
    if e is not None and e.op_type == "Expand":
        raise _NoMatch("grouped-query attention (each k/v head repeated for several q heads) is not followed")
    entries = shape_entries(p)
    if entries is None:
        raise _NoMatch(f"the {key} head Reshape has a computed shape")
    if len(entries) != 4:
        raise _NoMatch(f"the {key} head Reshape has {len(entries)} dims, not [batch, seq, heads, d]")
    labels = _permuted("bshd", perms, key)
    if labels != want:
        raise _NoMatch(f"{key} laid out [{','.join(labels)}], not [{','.join(want)}]")
    nodes.append(p)
    if not _shape_reads_ok(p.inputs[0], p, 3):
        raise _NoMatch(f"the {key} projection output is read elsewhere")
    src = _back_scalars(p.inputs[0], nodes, an)
    if src is not p.inputs[0] and single_use(src) is None:
        raise _NoMatch(f"the {key} projection output is read elsewhere")
    sp = src.producer()
    if sp is not None and sp.op_type in ("Split", "Slice"):
        fused, part = _splitter(src, an, 3)
        return _Branch(p, entries, nodes, None, fused, part), folded
    return _Branch(p, entries, nodes, _layer(src), None), folded


def _ancestors(value: ir.Value, limit: int = 400) -> list[ir.Node]:
    seen, out, todo = set(), [], [value]
    while todo and len(out) < limit:
        p = todo.pop().producer()
        if p is None or id(p) in seen:
            continue
        seen.add(id(p))
        out.append(p)
        if p.op_type != "Shape":  # a shape read carries no values
            todo += [v for v in p.inputs if v is not None]
    return out


def _is_product(node: ir.Node) -> bool:
    return node.op_type == "MatMul" and all(const_array(v) is None for v in node.inputs)


def _find_qk(value: ir.Value, chain: list[ir.Node], depth: int = 0) -> ir.Node | None:
    """Depth-first up through score ops to the MatMul of two computed tensors (q·kᵀ)."""
    p = value.producer()
    if p is None or depth > 12:
        return None
    if _is_product(p):
        return p
    if p.op_type not in _SCORE_OPS and p.op_type != "Reshape":  # a Reshape: only to say why it is not followed
        return None
    for i, v in enumerate(p.inputs):
        if v is None or const_array(v) is not None or (p.op_type == "Where" and i == 0) \
                or (p.op_type == "Reshape" and i == 1):
            continue
        found = _find_qk(v, chain, depth + 1)
        if found is not None:
            chain.append(p)
            return found
    return None


def _softmax_io(softmax: ir.Node) -> tuple[ir.Value, ir.Value, list[ir.Node]]:
    """The scores the Softmax reads and its attention weights, past a version-converter Flatten/Reshape wrap."""
    nodes = [softmax]
    scores, weights = softmax.inputs[0], softmax.outputs[0]
    f = scores.producer()
    r = single_use(weights)
    if f is not None and f.op_type == "Flatten" and r is not None and r.op_type == "Reshape":
        shape = r.inputs[1].producer()
        if shape is not None and shape.op_type == "Shape" and shape.inputs[0] is f.inputs[0]:
            nodes += [f, r]
            scores, weights = f.inputs[0], r.outputs[0]
    while (u := single_use(weights)) is not None and u.op_type in _PASS_THROUGH:
        nodes.append(u)
        weights = u.outputs[0]
    return scores, weights, nodes


def _reaches_matmul(value: ir.Value, hops: int = 3) -> bool:
    """Some MatMul reads ``value`` within ``hops`` nodes (attention weights meet the values)."""
    todo = [(value, 0)]
    while todo:
        v, h = todo.pop()
        for u in v.uses():
            if u.node.op_type == "MatMul":
                return True
            if h + 1 < hops:
                todo += [(o, h + 1) for o in u.node.outputs]
    return False


def find_heads(model: ir.Model, an: ChannelAnalyzer) -> None:
    """Match multi-head attention blocks and add one 'heads' atom per block; a block that looks like
    attention but does not match gets a heads group kept whole with the reason."""
    blocks = []
    for softmax in [n for n in model.graph if n.op_type == "Softmax"]:
        scores, weights, _ = _softmax_io(softmax)
        chain: list[ir.Node] = []
        qk = _find_qk(scores, chain)
        if qk is not None and _reaches_matmul(weights):  # else not attention (a classifier's softmax, ...)
            blocks.append((softmax, scores, qk, chain))
    probed = _probe_terms(model, an, [(qk, chain) for _, _, qk, chain in blocks])
    for softmax, scores, _, _ in blocks:
        n_atoms, n_edits = len(an.a.sizes), len(an.a.edits)
        try:
            _match(softmax, an, probed)
        except _NoMatch as stop:
            _roll_back(an, n_atoms, n_edits)
            dims = an.dims(scores)
            heads = dims[1] if dims is not None and len(dims) == 4 and dims[1] else 1
            atom = an.new_atom(int(heads), "heads", softmax.name or "Softmax")
            an.a.blocked[atom] = [f"attention not followed: {stop}"]


def _roll_back(an: ChannelAnalyzer, n_atoms: int, n_edits: int) -> None:
    """Forget the atoms and edits of a block whose match failed part way."""
    del an.a.edits[n_edits:]
    for atom in [a for a in an.a.sizes if a >= n_atoms]:
        for table in (an.a.sizes, an.a.kinds, an.a.names, an.a.parent, an.a.blocked):
            table.pop(atom, None)


def _terms(qk: ir.Node, chain: list[ir.Node]) -> list[tuple[ir.Node, int]]:
    """The score terms other than q·kᵀ: (node, input index) of every input off the chain."""
    out = []
    for n in chain:
        for i, v in enumerate(n.inputs):
            if v is not None and v is not qk.outputs[0] and v.producer() not in chain \
                    and not (n.op_type == "Reshape" and i == 1):
                out.append((n, i))
    return out


def _probe_terms(model: ir.Model, an: ChannelAnalyzer, blocks) -> dict[str, list[int]]:
    """Dims of the computed score terms whose heads axis static shapes leave unknown (a mask
    built by Expand to a computed shape): one onnxruntime run on synthesized inputs. Empty when
    the model cannot be run that way (those terms are then expanded to every head and gathered)."""
    names = []
    for qk, chain in blocks:
        for n, i in _terms(qk, chain):
            v = n.inputs[i]
            dims = an.dims(v)
            if const_array(v) is None and (dims is None or (len(dims) >= 3 and dims[-3] is None)):
                names.append(v.name)
    if not names:
        return {}
    import onnxruntime as ort

    from edgecomp.data import input_specs, synthesize_feed
    from edgecomp.errors import EdgecompError
    from edgecomp.runtime import make_session

    names = sorted(set(names))
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a model synthesized inputs cannot run is expected here: no error log
    try:
        session = make_session(model, optimization="disable", extra_outputs=names)
        specs = input_specs(model)  # small symbolic dims: a sequence within any position table
        shapes = {sp.name: [d if isinstance(d, int) and d > 0 else 3 for d in sp.dims] for sp in specs}
        arrays = session.run(names, synthesize_feed(specs, shapes), quiet)
    except EdgecompError:
        return {}
    except Exception:  # noqa: BLE001  onnxruntime's errors share no base class (as in runtime.run_feed)
        return {}
    return {n: list(a.shape) for n, a in zip(names, arrays)}


def _match(softmax: ir.Node, an: ChannelAnalyzer, probed: dict[str, list[int]]) -> None:
    scores, weights, nodes = _softmax_io(softmax)
    chain: list[ir.Node] = []
    qk = _find_qk(scores, chain)
    if int(attribute(softmax, "axis", -1)) not in (-1, 3):
        raise _NoMatch("Softmax off the last axis")
    operands = _terms(qk, chain)
    for n, i in operands:
        if any(_is_product(a) for a in _ancestors(n.inputs[i])):
            raise _NoMatch("disentangled relative attention (scores plus products with position embeddings, "
                           "DeBERTa c2p/p2c) is not followed")
    # heads folded into the batch axis (q·kᵀ of [b·h, s, d]): the scores are unfolded to
    # [b, h, s, s] before Softmax and folded back for the context; both Reshapes infer b (-1)
    unfolds = [n for n in chain if n.op_type == "Reshape"]
    counts = []  # shape entries holding the head count outside the head Reshapes
    folded_terms: set[int] = set()
    if unfolds:
        entries = _fold_entries(unfolds[0], 4)
        if len(unfolds) > 1 or entries is None:
            raise _NoMatch("scores reshaped between q·kᵀ and Softmax other than [batch·heads, s, s] → [-1, heads, s, s]")
        counts.append(entries[1])
        folded_terms = {id(n) for n in chain[:chain.index(unfolds[0])]}
        fold = _data_reader(weights)
        if _fold_entries(fold, 3) is None:
            raise _NoMatch("attention weights not folded back to [batch·heads, s, s] for the context")
        nodes.append(fold)
        weights = fold.outputs[0]
    readers = [u.node for u in weights.uses()]
    if len(readers) != 1 or readers[0].op_type != "MatMul" or readers[0].inputs[0] is not weights:
        raise _NoMatch("attention weights are read by more than the context MatMul")
    ctx = readers[0]
    found = {"q": _branch(qk.inputs[0], "bhsd", "q", an), "k": _branch(qk.inputs[1], "bhds", "k", an),
             "v": _branch(ctx.inputs[1], "bhsd", "v", an)}
    branches = {k: b for k, (b, _) in found.items()}
    if any(f != bool(unfolds) for _, f in found.values()):
        raise _NoMatch("heads folded into the batch axis for some of q, k, v and the scores only")
    fused = [b.fused for b in branches.values()]
    if any(f is not None for f in fused) and (any(f is None for f in fused) or len({id(f.proj.node) for f in fused}) != 1
                                             or sorted(b.part for b in branches.values()) != [0, 1, 2]):
        raise _NoMatch("q, k and v are not the three parts of one fused projection")
    # context (→ Reshape [-1, h, s, d] where folded) → Transpose → Reshape [b, s, h·d] (→ Reshape [-1, h·d]) → W_o
    perms, merges, v = [], [], ctx.outputs[0]
    if unfolds:
        unfold = _data_reader(v)
        entries = _fold_entries(unfold, 4)
        if entries is None:
            raise _NoMatch("folded context not unfolded to [-1, heads, s, d]")
        counts.append(entries[1])
        nodes.append(unfold)
        v = unfold.outputs[0]
    while (u := _data_reader(v)) is not None and u.op_type == "Transpose":
        nodes.append(u)
        perms.append(list(attribute(u, "perm", [3, 2, 1, 0])))
        v = u.outputs[0]
    labels = list("bhsd")
    for perm in perms:
        labels = [labels[i] for i in perm] if len(perm) == 4 else labels
    if "".join(labels) != "bshd":
        raise _NoMatch(f"context laid out [{','.join(labels)}] before the merge, not [b,s,h,d]")
    while u is not None and u.op_type == "Reshape":
        entries = shape_entries(u)
        if entries is None or len(entries) not in (2, 3) or len(merges) == 2:
            raise _NoMatch(f"merge Reshape {u.name} with a computed or unexpected shape")
        merges.append((u, entries))
        nodes.append(u)
        v = u.outputs[0]
        u = _data_reader(v)
    out = u
    if not merges or out is None or out.op_type not in ("MatMul", "Gemm") or out.inputs[0] is not v:
        raise _NoMatch("the merged context does not feed an output MatMul/Gemm")
    w_o = const_array(out.inputs[1])
    if w_o is None or w_o.ndim != 2:
        raise _NoMatch(f"output projection {out.name} has a computed weight")
    in_axis = 1 if out.op_type == "Gemm" and int(attribute(out, "transB", 0)) else 0
    if out.op_type == "Gemm" and int(attribute(out, "transA", 0)):
        raise _NoMatch(f"output Gemm {out.name} with transA")
    # sizes: h·d columns per branch, d from the head Reshape
    q = branches["q"]
    hd = q.fused.proj.width // 3 if q.fused is not None else q.proj.width
    if any(b.proj is not None and b.proj.width != hd for b in branches.values()) or w_o.shape[in_axis] != hd:
        raise _NoMatch(f"q, k, v and the output projection differ in width ({hd} vs {w_o.shape[in_axis]})")
    e_heads, e_dim = _entry(q.entries[2]), _entry(q.entries[3])
    if e_dim is not None and e_dim > 0:
        d = e_dim
    elif e_heads is not None and e_heads > 0:
        d = hd // e_heads
    else:
        raise _NoMatch("neither the head count nor the head size is a constant in the q Reshape")
    if d <= 0 or hd % d:
        raise _NoMatch(f"width {hd} is not a multiple of the head size {d}")
    heads = hd // d
    for key, b in branches.items():
        eh, ed = _entry(b.entries[2]), _entry(b.entries[3])
        if (ed is not None and ed > 0 and ed != d) or (eh is not None and eh > 0 and eh != heads):
            raise _NoMatch(f"the {key} Reshape splits into other heads than q")
    if any(_entry(e) not in (None, -1, heads) for e in counts):
        raise _NoMatch(f"an unfold Reshape splits into other than {heads} heads")
    for n, i in operands:
        if id(n) in folded_terms:  # a term of the folded scores must broadcast over batch·heads
            dims = probed.get(n.inputs[i].name, an.dims(n.inputs[i]))
            c = const_array(n.inputs[i])
            dims = list(c.shape) if c is not None else dims
            if dims is None or (len(dims) >= 3 and dims[-3] != 1):
                raise _NoMatch(f"score term {n.inputs[i].name} on the folded [batch·heads, s, s] scores")
    operands = [(n, i) for n, i in operands if id(n) not in folded_terms]
    _emit(an, out.name or softmax.name, heads, d, branches, chain, operands, nodes + [qk, ctx], merges, out, in_axis,
          probed, counts)


def _emit(an: ChannelAnalyzer, name: str, heads: int, d: int, branches: dict[str, _Branch], chain, operands, nodes,
          merges, out: ir.Node, in_axis: int, probed: dict[str, list[int]], counts: list) -> None:
    edits = an.a.edits
    fused = branches["q"].fused
    if fused is None:
        atom = an.new_atom(heads, "heads", name)
        part_atoms = {0: atom}
    else:
        part_atoms = {}
        for b in branches.values():
            part_atoms[b.part] = an.new_atom(heads, "heads", name)
        atom = part_atoms[0]
        for p in (1, 2):
            an.union(Layout(-1, ((atom, 1),)), Layout(-1, ((part_atoms[p], 1),)))
    cols = Layout(-1, ((atom, d),), None)
    count = Layout(-1, ((atom, 1),), None)
    changed = list(nodes)
    blocked = []

    def dim_edit(entry, layout):
        node, idx, pos, c = entry
        if c is None or int(c.reshape(-1)[0]) not in (-1, 0):
            edits.append(Edit("dim", node, idx, layout, position=pos))

    for b in branches.values():
        dim_edit(b.entries[2], count)
        changed += b.nodes
        if b.proj is not None:
            edits.append(Edit("param", b.proj.node, 1, cols, axis=b.proj.w_axis, role="out"))
            if b.proj.bias is not None:
                node, idx, axis = b.proj.bias
                edits.append(Edit("param", node, idx, cols, axis=axis))
            changed += b.proj.nodes
    if fused is not None:
        three = Layout(-1, tuple((part_atoms[p], d) for p in range(3)), None)
        proj = fused.proj
        edits.append(Edit("param", proj.node, 1, three, axis=proj.w_axis, role="out"))
        if proj.bias is not None:
            node, idx, axis = proj.bias
            edits.append(Edit("param", node, idx, three, axis=axis))
        changed += proj.nodes + [fused.splitter]
        if fused.reshape is not None:
            entries = shape_entries(fused.reshape)
            dim_edit(entries[-1], three)
            changed.append(fused.reshape)
        _split_edits(fused, part_atoms, d, edits, changed)
    for node, entries in merges:
        dim_edit(entries[-1], cols)
    for entry in counts:
        dim_edit(entry, count)
    edits.append(Edit("param", out, 1, cols, axis=in_axis, role="in"))
    for n, i in operands:
        v = n.inputs[i]
        c = const_array(v)
        dims = list(c.shape) if c is not None else probed.get(v.name, an.dims(v))
        if dims is not None and (len(dims) < 3 or dims[-3] == 1):
            continue  # broadcasts over heads
        if dims is not None and dims[-3] not in (None, heads):
            raise _NoMatch(f"score term {v.name} has {dims[-3]} on the heads axis, not {heads}")
        if c is not None:
            edits.append(Edit("param", n, i, count, axis=c.ndim - 3))
        elif dims is not None and dims[-3] == heads:
            edits.append(Edit("take", n, i, count, axis=len(dims) - 3))
        else:
            edits.append(Edit("take", n, i, count, axis=1, expand=(1, heads, 1, 1)))
    changed += chain
    inside = {id(n) for n in changed} | {id(out)}
    for n in changed:  # every value whose heads change is read inside the block (or only for its shape)
        for o in n.outputs:
            if o in o.graph.outputs:
                raise _NoMatch(f"{o.name} inside the block is a graph output")
            for u in o.uses():
                if id(u.node) not in inside and not _shape_only(u.node):
                    raise _NoMatch(f"{o.name} inside the block is also read by {u.node.op_type} {u.node.name}")
    for n in changed + [out]:
        if n is not None and an.is_protected(n):
            blocked.append(f"protected ({n.name})")
    for reason in blocked:
        an.block(cols, reason)
    for n in changed:
        for o in n.outputs:
            an.a.head_values.add(o.name)


def _shape_only(node: ir.Node, depth: int = 0) -> bool:
    """``node`` is a Shape, or a layout op (Transpose, Cast, Identity) whose results only Shape reads:
    a read that follows the new head count by itself (T5 takes the key length that way)."""
    if node.op_type == "Shape":
        return True
    if node.op_type not in ("Transpose", "Cast", "Identity") or depth > 3:
        return False
    return all(o not in o.graph.outputs and all(_shape_only(u.node, depth + 1) for u in o.uses())
               for o in node.outputs)


def _split_edits(fused: _Fused, part_atoms: dict[int, int], d: int, edits: list[Edit], changed: list) -> None:
    """The sizes of the three parts in the Split, or the bounds of the three Slices."""
    sp = fused.splitter
    width = fused.proj.width
    if sp.op_type == "Split":
        if len(sp.inputs) > 1 and sp.inputs[1] is not None:
            c = const_array(sp.inputs[1])
            if c is None or c.size != 3:
                raise _NoMatch(f"Split {sp.name} with computed sizes")
            for p in range(3):
                edits.append(Edit("dim", sp, 1, Layout(-1, ((part_atoms[p], d),)), position=p))
        elif attribute(sp, "split", None) is not None:
            for p in range(3):
                edits.append(Edit("dim", sp, -1, Layout(-1, ((part_atoms[p], d),)), position=p, attr="split"))
        return
    readers = [u.node for u in sp.inputs[0].uses()]
    for r in readers:
        part = fused.parts[id(r.outputs[0])]
        changed.append(r)
        for slot, bound in ((1, part), (2, part + 1)):
            attr_form = attribute(r, "starts", None) is not None
            name = "starts" if slot == 1 else "ends"
            value = attribute(r, name) if attr_form else const_array(r.inputs[slot]).reshape(-1).tolist()
            v = int(value[0])
            if v >= _TO_END or (bound == 0 and v == 0):
                continue
            if v != bound * width // 3:
                raise _NoMatch(f"Slice {r.name} does not cut the fused projection in three equal parts")
            layout = Layout(-1, tuple((part_atoms[p], d) for p in range(bound)))
            edits.append(Edit("dim", r, -1 if attr_form else slot, layout, position=0,
                              attr=name if attr_form else None))
