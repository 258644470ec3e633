"""Half-precision models: work on them in float32, write them back with float16 storage.

A model exported in float16 (GPU exports, mobile) cannot go through machinery that inserts
float32 nodes (SmoothQuant's ``Mul``, a low-rank embedding's ``MatMul``, bias corrections): the
inserted float32 constant meets a float16 activation and onnxruntime refuses the graph. Instead
of teaching every pass both types, a float16 model is **lifted** to float32, the unchanged
float32 machinery runs, and the float weights it left float are **stored** in float16 again:

    float16 model ──LiftFloat16Pass──► float32 graph (float16 interface) ──machinery──►
    ──StoreFloat16Pass──► float16 inputs/outputs, float16 float weights, float32 compute

:class:`LiftFloat16Pass` (cases handled, subgraphs of If/Loop/Scan included, at any depth):
- float16 initializers and ``Constant``/``ConstantOfShape`` tensors (any TENSOR/TENSORS
  attribute) become float32 (exact: every float16 is a float32);
- ``to``/``dtype`` attributes naming float16 (``Cast``, ``RandomNormal``, ``EyeLike``, ...) name
  float32, so a mixed-precision model (float16 layers behind ``Cast``s, float32 layers) becomes
  one float32 graph whose former ``Cast``s are no-ops;
- every float16 value type (node outputs, subgraph inputs/outputs) becomes float32;
- the main graph keeps its interface: a float16 input gets ``Cast(to=float32)`` in front of its
  uses, a float16 output is computed in float32 and ``Cast(to=float16)`` last, under its own
  name. An input that is also an initializer (a default the caller may override) keeps its
  float16 default and declaration, and is read through the same Cast.

:class:`StoreFloat16Pass`: every float32 initializer or ``Constant`` tensor (any graph) of at
least ``min_elements`` values that the input did not itself store in float32 (``keep_float32``,
by name: a mixed model's deliberate float32 layers stay float32) is stored as float16 behind a
``Cast(to=float32)`` — unless a consumer needs float32 precision (quantization scales: Q/DQ ops,
every non-default-domain op) or a tensor would change by more than float16's rounding (a value
beyond 65504, or a relative error ``‖x − fp16(x)‖ / ‖x‖`` over ``2^-10``: a tensor of values
below float16's normal range 6.1e-5, such as a tiny scale). For a weight that came from float16
the round trip is exact; for one the machinery computed in float32 (a folded BatchNorm, a
low-rank factor, a smoothed weight) the relative change is about ``2^-11``. onnxruntime folds the ``Cast`` of an initializer at session load, so compute
stays float32: on CPU that is what onnxruntime mostly does for float16 anyway — it has few
float16 CPU kernels and inserts ``Cast`` pairs around every other op (see BENCHMARKS.md
"Float16" for the latency of both forms on this host).

:func:`refuse_unrunnable_floats` refuses, in one line and before any work, a model holding a
float type onnxruntime's CPU kernels cannot run (bfloat16, the float8/float6/float4 types).
"""

from __future__ import annotations

from typing import Callable, Iterator, TypeVar

import numpy as np
import onnx_ir as ir

from edgecomp.errors import ModelLoadError
from edgecomp.graph import NameAllocator
from edgecomp.passes.base import EdgecompPass, PassReport, run_pass

__all__ = ["LiftFloat16Pass", "StoreFloat16Pass", "refuse_unrunnable_floats", "has_float16", "float32_tensor_names",
           "in_float32"]

R = TypeVar("R")
F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT
_FLOAT16_MAX = float(np.finfo(np.float16).max)

#: float types onnxruntime's CPU EP computes in (float16 mostly through inserted Casts)
_RUNNABLE = {F16, F32, ir.DataType.DOUBLE}
#: consumers that need their constant in float32: quantization scales and zero points, and any
#: contrib / custom op whose type constraints edgecomp does not know
_FLOAT32_CONSUMERS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
#: attributes that name an element type (Cast.to, RandomNormal.dtype, EyeLike.dtype, ...)
_DTYPE_ATTRIBUTES = ("to", "dtype")


def _graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    yield graph
    yield from graph.subgraphs()


def _values(graph: ir.Graph) -> Iterator[ir.Value]:
    """Every value a graph (and its subgraphs) declares: inputs, initializers, node outputs, outputs."""
    for g in _graphs(graph):
        yield from g.inputs
        yield from g.initializers.values()
        for node in g:
            yield from node.outputs
        yield from g.outputs


def _tensors(node: ir.Node) -> Iterator[tuple[ir.Attr, int | None, ir.TensorProtocol]]:
    """The node's tensor attributes as (attribute, index in a TENSORS list or None, tensor)."""
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.TENSOR:
            yield attr, None, attr.value
        elif attr.type == ir.AttributeType.TENSORS:
            for i, t in enumerate(attr.value):
                yield attr, i, t


def _elem_types(t: ir.TypeProtocol | None) -> Iterator[ir.DataType]:
    while t is not None and not isinstance(t, ir.TensorType):
        t = getattr(t, "elem_type", None)  # sequence / optional of a tensor
    if t is not None:
        yield t.dtype


def _float_dtypes(model: ir.Model) -> dict[ir.DataType, str]:
    """Each float element type in the model and the first place it was seen."""
    seen: dict[ir.DataType, str] = {}
    for v in _values(model.graph):
        for dt in _elem_types(v.type):
            seen.setdefault(dt, f"value {v.name!r}")
        if v.const_value is not None:
            seen.setdefault(v.const_value.dtype, f"initializer {v.name!r}")
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for _, _, t in _tensors(node):
            seen.setdefault(t.dtype, f"a tensor of {node.op_type} {node.name!r}")
        for name in _DTYPE_ATTRIBUTES:
            a = node.attributes.get(name)
            if a is not None and a.type == ir.AttributeType.INT and node.domain in ("", "ai.onnx"):
                try:
                    seen.setdefault(ir.DataType(a.value), f"{node.op_type} {node.name!r} ({name}=)")
                except ValueError:
                    pass  # an unknown type number: onnx.checker names it
    return {dt: where for dt, where in seen.items() if dt.is_floating_point()}


def refuse_unrunnable_floats(model: ir.Model) -> None:
    """One-line :class:`ModelLoadError` for a float type onnxruntime's CPU EP cannot run."""
    bad = {dt: where for dt, where in _float_dtypes(model).items() if dt not in _RUNNABLE}
    if bad:
        dt, where = next(iter(bad.items()))
        names = ", ".join(d.name.lower() for d in bad)
        raise ModelLoadError(f"the model computes in {names} (first: {where}), which onnxruntime's CPU kernels cannot "
                             "run; export it in float32 or float16 (torch: model.float() or model.half() before export)")


def has_float16(model: ir.Model) -> bool:
    return F16 in _float_dtypes(model)


def float32_tensor_names(model: ir.Model) -> frozenset[str]:
    """Names of the float32 initializers and Constant outputs (subgraphs included): what a mixed
    model deliberately stores in float32, for :class:`StoreFloat16Pass`'s ``keep_float32``."""
    names = set()
    for g in _graphs(model.graph):
        names.update(n for n, v in g.initializers.items() if v.const_value is not None and v.const_value.dtype == F32)
        names.update(n.outputs[0].name for n in g if _constant_tensor(n) is not None
                     and _constant_tensor(n).dtype == F32)
    return frozenset(names)


def _constant_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    a = node.attributes.get("value")
    if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and a is not None \
            and a.type == ir.AttributeType.TENSOR:
        return a.value
    return None


def _as(tensor: ir.TensorProtocol, dtype: ir.DataType, name: str | None = None) -> ir.Tensor:
    out = ir.tensor(tensor.numpy().astype(dtype.numpy()), name=name or tensor.name)
    out.metadata_props.update(tensor.metadata_props)
    return out


class LiftFloat16Pass(EdgecompPass):
    """Compute a float16 (or mixed) model in float32, keeping its float16 inputs and outputs.

    See the module docstring for the cases handled. A model without float16 is left alone.
    """

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        names = NameAllocator(graph)
        interface = [v for v in graph.inputs if v.dtype == F16]
        keep = set(map(id, interface))
        half_outputs = [i for i, v in enumerate(graph.outputs) if v.dtype == F16 and id(v) not in keep]
        counts = {"initializers": 0, "tensor attributes": 0, "dtype attributes": 0, "values": 0}
        for g in _graphs(graph):
            for v in g.initializers.values():
                if id(v) not in keep and v.const_value is not None and v.const_value.dtype == F16:
                    v.const_value = _as(v.const_value, F32)
                    counts["initializers"] += 1
            for node in g:
                counts["tensor attributes"] += _lift_attributes(node)
                counts["dtype attributes"] += _lift_dtype_attributes(node)
        for v in _values(graph):
            if id(v) not in keep and _lift_type(v):
                counts["values"] += 1
        for v in interface:
            if not v.uses():  # only passed through to an output: nothing reads it in float32
                continue
            cast_out = ir.Value(name=names.unique(f"{v.name}_float32"), type=ir.TensorType(F32), shape=v.shape)
            v.replace_all_uses_with(cast_out)
            _insert_first(graph, ir.Node("", "Cast", [v], {"to": ir.AttrInt64("to", F32)}, outputs=[cast_out],
                                         name=names.unique(f"{v.name}_to_float32")))
        outputs = _cast_outputs_back(graph, names, half_outputs)
        counts = {k: n for k, n in counts.items() if n}
        if interface or outputs:
            counts["float16 inputs/outputs kept"] = len(interface) + outputs
        return self.report(model, bool(counts), counts)


def _lift_attributes(node: ir.Node) -> int:
    n = 0
    for attr, index, t in list(_tensors(node)):
        if t.dtype != F16:
            continue
        lifted = _as(t, F32)
        if index is None:
            node.attributes[attr.name] = ir.AttrTensor(attr.name, lifted)
        else:
            items = list(attr.value)
            items[index] = lifted
            node.attributes[attr.name] = ir.AttrTensors(attr.name, items)
        n += 1
    return n


def _lift_dtype_attributes(node: ir.Node) -> int:
    if node.domain not in ("", "ai.onnx"):
        return 0
    n = 0
    for name in _DTYPE_ATTRIBUTES:
        a = node.attributes.get(name)
        if a is not None and a.type == ir.AttributeType.INT and a.value == F16:
            node.attributes[name] = ir.AttrInt64(name, F32)
            n += 1
    return n


def _lift_type(v: ir.Value) -> bool:
    if v.type is None:
        return False
    if isinstance(v.type, ir.TensorType):
        if v.type.dtype != F16:
            return False
        v.type = ir.TensorType(F32)
        return True
    if F16 in _elem_types(v.type):  # a sequence/optional of float16 tensors: rebuild the nest
        v.type = _replace_elem(v.type)
        return True
    return False


def _replace_elem(t):
    if isinstance(t, ir.TensorType):
        return ir.TensorType(F32) if t.dtype == F16 else t
    return type(t)(_replace_elem(t.elem_type))


def _insert_first(graph: ir.Graph, node: ir.Node) -> None:
    first = next(iter(graph), None)
    if first is None:
        graph.append(node)
    else:
        graph.insert_before(first, node)


def _cast_outputs_back(graph: ir.Graph, names: NameAllocator, positions: list[int]) -> int:
    """The outputs at ``positions`` (float16 before, float32 inside now) computed under a new name
    and cast back to float16 under their own (an output listed twice gets one Cast)."""
    done: dict[int, ir.Value] = {}
    for i in positions:
        v = graph.outputs[i]
        if id(v) not in done:
            name = v.name
            v.name = names.unique(f"{name}_float32")
            back = ir.Value(name=name, type=ir.TensorType(F16), shape=v.shape)
            graph.append(ir.Node("", "Cast", [v], {"to": ir.AttrInt64("to", F16)}, outputs=[back],
                                 name=names.unique(f"{name}_to_float16")))
            done[id(v)] = back
        graph.outputs[i] = done[id(v)]
    return len(done)


class StoreFloat16Pass(EdgecompPass):
    """Store float32 float weights as float16 behind a ``Cast(to=float32)`` (see the module docstring).

    Args:
        keep_float32: names of tensors the model stored in float32 before it was lifted; they stay.
        min_elements: smaller tensors stay float32 (a Cast node costs more than the bytes saved).
    """

    def __init__(self, *, keep_float32: frozenset[str] = frozenset(), min_elements: int = 16):
        self.keep_float32 = frozenset(keep_float32)
        self.min_elements = int(min_elements)

    def options(self):
        return {"keep_float32": len(self.keep_float32), "min_elements": self.min_elements}

    def call(self, model: ir.Model) -> PassReport:
        names = NameAllocator(model.graph)
        counts = {"stored float16": 0, "kept float32 (a consumer needs float32)": 0,
                  "kept float32 (outside float16's range)": 0}
        saved = 0
        for g in _graphs(model.graph):
            for v in list(g.initializers.values()):
                why = self._why_not(v, v.const_value)
                if why is None:
                    saved += _store_initializer(g, v, names)
                    why = "stored float16"
                if why in counts:
                    counts[why] += 1
            for node in list(g):
                t = _constant_tensor(node)
                why = self._why_not(node.outputs[0], t) if t is not None else "not a constant"
                if why is None:
                    saved += _store_constant(g, node, t, names)
                    why = "stored float16"
                if why in counts:
                    counts[why] += 1
        summary = {k: n for k, n in counts.items() if n}
        if saved:
            summary["bytes saved"] = saved
        return self.report(model, counts["stored float16"] > 0, summary)

    def _why_not(self, v: ir.Value, t: ir.TensorProtocol | None) -> str | None:
        """None when ``v`` (holding ``t``) goes to float16, else why not (a ``counts`` key or a
        reason that is not counted)."""
        if t is None or t.dtype != F32 or v.is_graph_input() or v.is_graph_output() or v.name in self.keep_float32:
            return "not a float32 weight"
        if t.size < self.min_elements:
            return "small"
        if any(u.node.op_type in _FLOAT32_CONSUMERS or u.node.domain not in ("", "ai.onnx") for u in v.uses()):
            return "kept float32 (a consumer needs float32)"
        if not _fits_float16(t.numpy()):
            return "kept float32 (outside float16's range)"
        return None


def _fits_float16(a: np.ndarray) -> bool:
    """Nothing overflows float16 and the float16 copy's relative error ``‖x − fp16(x)‖ / ‖x‖`` is
    at most ``2^-10`` (normal-range rounding alone gives at most ``2^-11``; a tensor of values
    below float16's normal range, such as a tiny scale, fails it)."""
    a = a.astype(np.float64)
    if not np.isfinite(a).all() or np.abs(a).max(initial=0.0) > _FLOAT16_MAX:
        return False
    norm = np.linalg.norm(a)
    return bool(norm == 0 or np.linalg.norm(a - a.astype(np.float16)) <= norm * 2.0**-10)


def _read_through_cast(graph: ir.Graph, half: ir.Value, readers_of: ir.Value, name: str, after: ir.Node | None,
                       names: NameAllocator) -> None:
    """Every use of ``readers_of`` reads ``Cast(half, to=float32)`` instead, a value named ``name``."""
    out = ir.Value(name=names.unique(f"{name}_float32"), type=ir.TensorType(F32), shape=readers_of.shape)
    readers_of.replace_all_uses_with(out)
    cast = ir.Node("", "Cast", [half], {"to": ir.AttrInt64("to", F32)}, outputs=[out],
                   name=names.unique(f"{name}_to_float32"))
    if after is None:
        _insert_first(graph, cast)
    else:
        graph.insert_after(after, cast)
    out.name = name


def _store_initializer(graph: ir.Graph, v: ir.Value, names: NameAllocator) -> int:
    t, name = v.const_value, v.name
    graph.initializers.pop(name)
    half_name = names.unique(f"{name}_float16")
    half = ir.Value(name=half_name, type=ir.TensorType(F16), shape=ir.Shape(t.shape), const_value=_as(t, F16, half_name))
    graph.register_initializer(half)
    _read_through_cast(graph, half, v, name, None, names)
    return t.nbytes // 2


def _store_constant(graph: ir.Graph, node: ir.Node, t: ir.TensorProtocol, names: NameAllocator) -> int:
    out = node.outputs[0]
    name = out.name
    node.attributes["value"] = ir.AttrTensor("value", _as(t, F16))
    out.name = names.unique(f"{name}_float16")
    out.type = ir.TensorType(F16)
    _read_through_cast(graph, out, out, name, node, names)
    return t.nbytes // 2


def in_float32(model: ir.Model, work: Callable[[ir.Model], R]) -> R:
    """``work(model)`` on the model lifted to float32 when it holds float16, with the float
    weights of ``work(...).model`` stored in float16 again (``.summary`` gains a "float16" line).
    A model without float16 is passed through; one with an unrunnable float type is refused first."""
    refuse_unrunnable_floats(model)
    if not has_float16(model):
        return work(model)
    keep = float32_tensor_names(model)
    lift = run_pass(LiftFloat16Pass(), model)
    result = work(model)
    store = run_pass(StoreFloat16Pass(keep_float32=keep), result.model)
    result.summary["float16"] = (f"computed in float32 inside ({lift.summary.get('float16 inputs/outputs kept', 0)} "
                                 f"float16 inputs/outputs kept); {store.summary.get('stored float16', 0)} float "
                                 "weights stored in float16")
    return result
