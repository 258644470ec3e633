"""Run an ONNX graph as a trainable ``nn.Module``: ONNX files as teacher and student.

``OnnxModule(model)`` interprets the graph node by node, in topological order, with torch ops, so
autograd reaches the weights and shapes stay dynamic: a ``Shape → Gather → Concat → Reshape``
chain is computed from the tensors of each call, so batch and sequence length may vary.

Values:

- float initializers become ``nn.Parameter`` (under ``weights``, named from the initializer,
  non-word characters replaced by ``_``); one initializer read by several nodes stays one
  parameter. Scalars (a ``1/sqrt(d)`` scale, a mask fill value, GELU's constants) and inputs that
  only set statistics, bounds or sizes (BatchNormalization's mean and variance, Clip's bounds,
  Resize's scales) stay fixed;
- every other initializer and the value of each ``Constant`` node become buffers (under
  ``consts``): exporters put trained weights in initializers;
- graph inputs that also have an initializer (old IR) are initializers, not inputs.

Ops of the default domain handled (attribute and input forms of each opset):

- elementwise: Add Sub Mul Div (integer division truncates) Pow Mod Sqrt Reciprocal Exp Log Abs
  Neg Floor Ceil Sign Sin Cos Erf Tanh Sigmoid Relu LeakyRelu PRelu Elu Softplus Clip HardSigmoid
  HardSwish Gelu, Min Max Sum Mean (variadic), Equal Less LessOrEqual Greater GreaterOrEqual
  Not And Or Xor Where IsNaN IsInf;
- linear algebra: MatMul Gemm (transA/transB, alpha/beta) Einsum;
- convolution and pooling (1-, 2-, 3-D; pads, strides, dilations, groups, ``auto_pad``): Conv,
  ConvTranspose (``output_padding``, ``output_shape``), MaxPool, AveragePool
  (``count_include_pad``, ``ceil_mode``), GlobalAveragePool, GlobalMaxPool;
- normalization (inference): BatchNormalization, InstanceNormalization, LayerNormalization,
  Softmax / LogSoftmax (before opset 13 on the input coerced to 2-D);
- shape and indexing: Shape Size Reshape (0 and -1, ``allowzero``) Flatten Transpose Unsqueeze
  Squeeze Concat Split Slice (negative steps) Gather GatherElements GatherND Trilu Expand Tile Pad Range Cast CastLike
  Constant ConstantOfShape Identity Dropout (inference);
- reductions (attribute or input axes, ``keepdims``, ``noop_with_empty_axes``): ReduceMean
  ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceSumSquare ReduceLogSumExp,
  ArgMax ArgMin;
- Resize (opset 10+) and Upsample: ``nearest`` with every coordinate transformation and
  nearest mode, ``linear`` with half_pixel, pytorch_half_pixel or align_corners on 1-D/2-D maps.

Any other op (control flow, other domains, training-mode outputs) is refused when the module is
built, all of them in one line.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from edgecomp.errors import DistillError
from edgecomp.graph import default_opset
from edgecomp.io import first_line

__all__ = ["SUPPORTED_OPS", "OnnxModule", "graph_input_names"]

Tensor = torch.Tensor

_DTYPES = {ir.DataType.FLOAT: torch.float32, ir.DataType.DOUBLE: torch.float64, ir.DataType.FLOAT16: torch.float16,
           ir.DataType.BFLOAT16: torch.bfloat16, ir.DataType.INT64: torch.int64, ir.DataType.INT32: torch.int32,
           ir.DataType.INT16: torch.int16, ir.DataType.INT8: torch.int8, ir.DataType.UINT8: torch.uint8,
           ir.DataType.BOOL: torch.bool}

#: (op, input slot) whose float initializer is a statistic, bound or size, never trained.
_FIXED_SLOTS = {("BatchNormalization", 3), ("BatchNormalization", 4), ("Clip", 1), ("Clip", 2), ("Resize", 1),
                ("Resize", 2), ("Resize", 3), ("Upsample", 1), ("Range", 0), ("Range", 1), ("Range", 2),
                ("Pad", 2), ("ConstantOfShape", 0)}


@dataclasses.dataclass(frozen=True)
class _Attrs:
    """A node's attributes as Python values, with the opset it is read under."""

    values: Mapping[str, Any]
    opset: int
    n_outputs: int

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)


@dataclasses.dataclass(frozen=True)
class _Step:
    op: str
    name: str
    inputs: tuple[str, ...]     # "" for an omitted optional input
    outputs: tuple[str, ...]
    attrs: _Attrs
    run: Callable[[list[Tensor | None], _Attrs], Any]


# --- helpers ----------------------------------------------------------------------------------

def _ints(t: Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _opt(xs: Sequence[Tensor | None], i: int) -> Tensor | None:
    return xs[i] if len(xs) > i else None


def _attr_or_input(xs, a: _Attrs, name: str, slot: int) -> list[int] | None:
    """``axes``, ``split``, ... from the attribute (older opsets) or the input (newer ones)."""
    if name in a:
        return list(a.get(name))
    t = _opt(xs, slot)
    return None if t is None else _ints(t)


def _torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX ``[b1, b2, ..., e1, e2, ...]`` (first axis first) → F.pad's ``[b_last, e_last, ...]``."""
    n = len(pads) // 2
    return [p for i in reversed(range(n)) for p in (pads[i], pads[i + n])]


def _window_pads(x: Tensor, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
                 a: _Attrs) -> list[int]:
    """Explicit pads, or those ``auto_pad`` SAME_UPPER / SAME_LOWER / VALID implies for this input."""
    mode = a.get("auto_pad", "NOTSET")
    nd = len(kernel)
    if mode in ("NOTSET", ""):
        return list(a.get("pads", [0] * 2 * nd))
    if mode == "VALID":
        return [0] * 2 * nd
    begin, end = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
        total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else large)
        end.append(large if mode == "SAME_UPPER" else small)
    return begin + end


def _native_padding(pads: Sequence[int], kernel: Sequence[int] | None = None) -> tuple[int, ...] | None:
    """The symmetric padding torch applies itself (pools: at most half the kernel), else None."""
    nd = len(pads) // 2
    if list(pads[:nd]) != list(pads[nd:]) or min(pads, default=0) < 0:
        return None
    if kernel is not None and any(p > k // 2 for p, k in zip(pads[:nd], kernel)):
        return None
    return tuple(pads[:nd])


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _spatial(a: _Attrs, kernel: Sequence[int]) -> tuple[list[int], list[int]]:
    nd = len(kernel)
    return list(a.get("strides", [1] * nd)), list(a.get("dilations", [1] * nd))


# --- ops --------------------------------------------------------------------------------------

def _unary(fn: Callable[[Tensor], Tensor]):
    return lambda xs, a: fn(xs[0])


def _binary(fn: Callable[[Tensor, Tensor], Tensor]):
    return lambda xs, a: fn(xs[0], xs[1])


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]):
    return lambda xs, a: functools.reduce(fn, [x for x in xs if x is not None])


def _div(xs, a):
    x, y = xs
    if x.is_floating_point() or x.dtype == torch.bool:
        return x / y
    return torch.div(x, y, rounding_mode="trunc")


def _pow(xs, a):
    return torch.pow(xs[0], xs[1]).to(xs[0].dtype)


def _mod(xs, a):
    return (torch.fmod if a.get("fmod", 0) else torch.remainder)(xs[0], xs[1])


def _is_inf(x: Tensor, a: _Attrs) -> Tensor:
    pos, neg = a.get("detect_positive", 1), a.get("detect_negative", 1)
    return (torch.isposinf(x) & bool(pos)) | (torch.isneginf(x) & bool(neg))


def _mean(xs, a):
    present = [x for x in xs if x is not None]
    return functools.reduce(torch.add, present) / len(present)


def _clip(xs, a):
    if "min" in a or "max" in a:  # before opset 11
        return torch.clamp(xs[0], a.get("min"), a.get("max"))
    lo, hi = _opt(xs, 1), _opt(xs, 2)
    return xs[0] if lo is None and hi is None else torch.clamp(xs[0], lo, hi)


def _prelu(xs, a):
    x, slope = xs
    return torch.where(x >= 0, x, x * slope)


def _hard_sigmoid(xs, a):
    return torch.clamp(a.get("alpha", 0.2) * xs[0] + a.get("beta", 0.5), 0.0, 1.0)


def _gemm(xs, a):
    x, w, c = xs[0], xs[1], _opt(xs, 2)
    if a.get("transA", 0):
        x = x.t()
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    if a.get("transB", 0) and alpha == 1.0 and beta == 1.0 and (c is None or c.dim() <= 1):
        return F.linear(x, w, c)
    y = x @ (w.t() if a.get("transB", 0) else w)
    if alpha != 1.0:
        y = y * alpha
    if c is None:
        return y
    return y + (c * beta if beta != 1.0 else c)


def _conv(xs, a):
    x, w, b = xs[0], xs[1], _opt(xs, 2)
    kernel = list(w.shape[2:])
    strides, dilations = _spatial(a, kernel)
    pads = _window_pads(x, [(k - 1) * d + 1 for k, d in zip(kernel, dilations)], strides, [1] * len(kernel), a)
    padding = _native_padding(pads)
    if padding is None:
        x, padding = F.pad(x, _torch_pad(pads)), 0
    return _CONV[len(kernel)](x, w, b, strides, padding, dilations, a.get("group", 1))


def _conv_transpose(xs, a):
    """Full transposed convolution, then the ONNX pads cropped off (``output_padding`` added at the end)."""
    x, w, b = xs[0], xs[1], _opt(xs, 2)
    kernel = list(w.shape[2:])
    nd = len(kernel)
    strides, dilations = _spatial(a, kernel)
    extra = list(a.get("output_padding", [0] * nd))
    full = [s * (i - 1) + e + (k - 1) * d + 1 for i, s, e, k, d in zip(x.shape[2:], strides, extra, kernel, dilations)]
    mode = a.get("auto_pad", "NOTSET")
    if "output_shape" in a or mode in ("SAME_UPPER", "SAME_LOWER"):
        want = list(a.get("output_shape", [i * s for i, s in zip(x.shape[2:], strides)]))[-nd:]
        totals = [f - o for f, o in zip(full, want)]
        upper = mode == "SAME_UPPER"
        pads = ([t // 2 if upper else t - t // 2 for t in totals] + [t - t // 2 if upper else t // 2 for t in totals])
    else:
        pads = [0] * 2 * nd if mode == "VALID" else list(a.get("pads", [0] * 2 * nd))
    y = _CONV_T[nd](x, w, b, strides, 0, extra, a.get("group", 1), dilations)
    return F.pad(y, _torch_pad([-p for p in pads]))


def _max_pool(xs, a):
    x = xs[0]
    kernel = list(a.get("kernel_shape"))
    strides, dilations = _spatial(a, kernel)
    pads = _window_pads(x, [(k - 1) * d + 1 for k, d in zip(kernel, dilations)], strides, [1] * len(kernel), a)
    padding = _native_padding(pads, kernel)
    if padding is None:
        x, padding = F.pad(x, _torch_pad(pads), value=float("-inf")), 0
    return _MAX_POOL[len(kernel)](x, kernel, strides, padding, dilations, ceil_mode=bool(a.get("ceil_mode", 0)))


def _avg_pool(xs, a):
    x = xs[0]
    kernel = list(a.get("kernel_shape"))
    strides, _ = _spatial(a, kernel)
    pads = _window_pads(x, kernel, strides, [1] * len(kernel), a)
    ceil, include = bool(a.get("ceil_mode", 0)), bool(a.get("count_include_pad", 0))
    pool = functools.partial(_AVG_POOL[len(kernel)], kernel_size=kernel, stride=strides, ceil_mode=ceil)
    padding = _native_padding(pads, kernel)
    if padding is not None:
        return pool(x, padding=padding, count_include_pad=include)
    y = pool(F.pad(x, _torch_pad(pads)), padding=0, count_include_pad=True)
    if include:
        return y
    ones = F.pad(torch.ones_like(x[:1, :1]), _torch_pad(pads))  # divide by the real elements of each window
    return y / pool(ones, padding=0, count_include_pad=True)


def _global_pool(fn):
    return lambda xs, a: fn(xs[0], dim=tuple(range(2, xs[0].dim())), keepdim=True)


def _batch_norm(xs, a):
    x, scale, bias, mean, var = xs[:5]
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, a.get("epsilon", 1e-5))


def _instance_norm(xs, a):
    return F.instance_norm(xs[0], weight=xs[1], bias=xs[2], eps=a.get("epsilon", 1e-5))


def _layer_norm(xs, a):
    x, scale, bias = xs[0], xs[1], _opt(xs, 2)
    shape = x.shape[a.get("axis", -1) % x.dim():]
    eps = a.get("epsilon", 1e-5)
    if scale.shape == shape and (bias is None or bias.shape == shape):
        return F.layer_norm(x, shape, scale, bias, eps)
    y = F.layer_norm(x, shape, None, None, eps) * scale  # broadcastable scale and bias
    return y if bias is None else y + bias


def _softmax(fn):
    def run(xs, a):
        x = xs[0]
        if a.opset >= 13:
            return fn(x, a.get("axis", -1))
        axis = a.get("axis", 1) % max(1, x.dim())  # before opset 13: on the input coerced to 2-D
        return fn(x.reshape(math.prod(x.shape[:axis]), -1), 1).reshape(x.shape)
    return run


def _shape(xs, a):
    x = xs[0]
    dims = list(x.shape)[a.get("start", 0):a.get("end", None)]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


def _size(xs, a):
    return torch.tensor(xs[0].numel(), dtype=torch.int64, device=xs[0].device)


def _reshape(xs, a):
    x, shape = xs[0], _ints(xs[1])
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return x.reshape(shape)


def _flatten(xs, a):
    x = xs[0]
    axis = a.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _transpose(xs, a):
    x = xs[0]
    return x.permute(list(a.get("perm", reversed(range(x.dim())))))


def _unsqueeze(xs, a):
    x = xs[0]
    axes = _attr_or_input(xs, a, "axes", 1)
    rank = x.dim() + len(axes)
    for axis in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(axis)
    return x


def _squeeze(xs, a):
    x = xs[0]
    axes = _attr_or_input(xs, a, "axes", 1)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(ax % x.dim() for ax in axes)) if axes else x


def _concat(xs, a):
    return torch.cat([x for x in xs if x is not None], a.get("axis"))


def _split(xs, a):
    x = xs[0]
    axis = a.get("axis", 0) % x.dim()
    sizes = _attr_or_input(xs, a, "split", 1)
    if sizes is None:  # equal parts, the last one smaller (opset 18's num_outputs)
        return torch.split(x, -(-x.shape[axis] // a.get("num_outputs", a.n_outputs)), axis)
    return torch.split(x, sizes, axis)


def _slice_axis(x: Tensor, axis: int, start: int, end: int, step: int) -> Tensor:
    n = x.shape[axis]
    start, end = start + n if start < 0 else start, end + n if end < 0 else end
    if step > 0:
        index = [slice(None)] * axis + [slice(min(max(start, 0), n), min(max(end, 0), n), step)]
        return x[tuple(index)]
    start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
    return x.index_select(axis, torch.arange(start, end, step, device=x.device))


def _slice(xs, a):
    x = xs[0]
    if "starts" in a:  # before opset 10
        starts, ends, axes, steps = list(a.get("starts")), list(a.get("ends")), a.get("axes"), None
    else:
        starts, ends = _ints(xs[1]), _ints(xs[2])
        axes, steps = [None if t is None else _ints(t) for t in (_opt(xs, 3), _opt(xs, 4))]
    axes = list(axes) if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        x = _slice_axis(x, axis % x.dim(), start, end, step)
    return x


def _gather(xs, a):
    x, idx = xs
    axis = a.get("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])


def _gather_elements(xs, a):
    x, idx = xs
    axis = a.get("axis", 0) % x.dim()
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))


def _gather_nd(xs, a):
    """``out[b..., m...] = x[b..., idx[b..., m..., :]]`` over the first ``batch_dims`` axes."""
    x, idx = xs
    nb, k = a.get("batch_dims", 0), idx.shape[-1]
    flat = x.reshape((-1,) + tuple(x.shape[nb:]))
    rows = idx.reshape(flat.shape[0], -1, k)
    dims = torch.tensor(x.shape[nb:nb + k], device=idx.device)
    rows = torch.where(rows < 0, rows + dims, rows)
    batch = torch.arange(flat.shape[0], device=idx.device)[:, None].expand(rows.shape[:2])
    out = flat[(batch,) + tuple(rows[..., j] for j in range(k))]
    return out.reshape(tuple(idx.shape[:-1]) + tuple(x.shape[nb + k:]))


def _trilu(xs, a):
    k = int(xs[1].item()) if _opt(xs, 1) is not None else 0
    return torch.triu(xs[0], k) if a.get("upper", 1) else torch.tril(xs[0], k)


def _expand(xs, a):
    x = xs[0]
    return x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(xs[1]))))


def _tile(xs, a):
    return xs[0].repeat(_ints(xs[1]))


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _pad(xs, a):
    x = xs[0]
    if "pads" in a:  # before opset 11
        pads, value, axes = list(a.get("pads")), a.get("value", 0.0), None
    else:
        pads, axes = _ints(xs[1]), _attr_or_input(xs, a, "axes", 3)
        value = _opt(xs, 2).item() if _opt(xs, 2) is not None else 0.0
    if axes is not None:  # opset 18: pads for these axes only
        full = [0] * 2 * x.dim()
        for i, axis in enumerate(ax % x.dim() for ax in axes):
            full[axis], full[axis + x.dim()] = pads[i], pads[i + len(axes)]
        pads = full
    mode = _PAD_MODES[a.get("mode", "constant")]
    if mode == "constant":
        return F.pad(x, _torch_pad(pads), value=value)
    spec = _torch_pad(pads)
    while len(spec) > 2 and spec[-2:] == [0, 0]:  # torch pads only the trailing axes in these modes
        spec = spec[:-2]
    return F.pad(x, spec, mode=mode)


def _cast(xs, a):
    return xs[0].to(_DTYPES[ir.DataType(a.get("to"))])


def _constant_of_shape(xs, a):
    value = a.get("value")
    fill = torch.zeros((), dtype=torch.float32) if value is None else value
    return torch.full(_ints(xs[0]), fill.item(), dtype=fill.dtype, device=xs[0].device)


def _range(xs, a):
    start, limit, delta = xs
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


def _dropout(xs, a):
    x = xs[0]
    return x, torch.ones_like(x, dtype=torch.bool)


def _reduce(fn: Callable[[Tensor, list[int], bool], Tensor]):
    def run(xs, a):
        x = xs[0]
        axes = _attr_or_input(xs, a, "axes", 1)
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, sorted(ax % max(1, x.dim()) for ax in axes), bool(a.get("keepdims", 1)))
    return run


def _prod(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    for d in reversed(dims):
        x = x.prod(d, keepdim=keep)
    return x


_REDUCTIONS = {
    "ReduceMean": lambda x, d, k: x.mean(d, keepdim=k), "ReduceSum": lambda x, d, k: x.sum(d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(d, keepdim=k), "ReduceMin": lambda x, d, k: x.amin(d, keepdim=k),
    "ReduceProd": _prod, "ReduceL1": lambda x, d, k: torch.linalg.vector_norm(x, 1, d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.linalg.vector_norm(x, 2, d, keepdim=k),
    "ReduceSumSquare": lambda x, d, k: (x * x).sum(d, keepdim=k),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}


def _arg(fn):
    return lambda xs, a: fn(xs[0], a.get("axis", 0), keepdim=bool(a.get("keepdims", 1)))


def _source_index(out: Tensor, scale: float, n_in: int, n_out: int, mode: str) -> Tensor:
    """Resize's coordinate transformation: output index → input coordinate (float32, as onnxruntime)."""
    if mode == "asymmetric":
        return out / scale
    if mode == "align_corners":
        return out * ((n_in - 1) / (n_out - 1)) if n_out > 1 else torch.zeros_like(out)
    if mode == "tf_half_pixel_for_nn":
        return (out + 0.5) / scale
    if mode == "pytorch_half_pixel" and n_out <= 1:
        return torch.zeros_like(out)
    return (out + 0.5) / scale - 0.5  # half_pixel, half_pixel_symmetric's centre, pytorch_half_pixel


_NEAREST = {"round_prefer_floor": lambda v: torch.ceil(v - 0.5), "round_prefer_ceil": lambda v: torch.floor(v + 0.5),
            "floor": torch.floor, "ceil": torch.ceil}


def _resize_nearest(x: Tensor, sizes: list[int], scales: list[float], mode: str, rounding: str) -> Tensor:
    for axis, (n_out, scale) in enumerate(zip(sizes, scales)):
        n_in = x.shape[axis]
        if n_out == n_in and scale == 1.0:
            continue
        pos = torch.arange(n_out, dtype=torch.float32, device=x.device)
        idx = _NEAREST[rounding](_source_index(pos, scale, n_in, n_out, mode)).clamp(0, n_in - 1).long()
        x = x.index_select(axis, idx)
    return x


def _resize_plan(x: Tensor, scales: Tensor | None, sizes: Tensor | None, axes) -> tuple[list[int], list[float]]:
    """Output size and scale of every axis, from ``sizes`` or from ``scales`` (for ``axes`` only, opset 18)."""
    axes = [ax % x.dim() for ax in axes] if axes else list(range(x.dim()))
    out, scale = list(x.shape), [1.0] * x.dim()
    if sizes is not None and sizes.numel():
        for ax, n in zip(axes, _ints(sizes)):
            out[ax], scale[ax] = n, n / x.shape[ax]
    else:
        for ax, s in zip(axes, scales.reshape(-1).tolist()):
            out[ax], scale[ax] = math.floor(x.shape[ax] * s), float(np.float32(s))
    return out, scale


def _resize(xs, a):
    x = xs[0]
    scales, sizes = (xs[1], None) if a.opset < 11 else (_opt(xs, 2), _opt(xs, 3))
    out, scale = _resize_plan(x, scales, sizes, a.get("axes"))
    mode = a.get("coordinate_transformation_mode", "half_pixel" if a.opset >= 11 else "asymmetric")
    if a.get("mode", "nearest") == "nearest":
        rounding = a.get("nearest_mode", "round_prefer_floor" if a.opset >= 11 else "floor")
        return _resize_nearest(x, out, scale, mode, rounding)
    if out[:2] != list(x.shape[:2]) or not 3 <= x.dim() <= 4:
        raise DistillError(f"linear Resize of a {x.dim()}-D tensor over other axes than its last 1 or 2 is not handled")
    if sizes is not None and sizes.numel():
        kw = {"size": out[2:]}
    else:
        kw = {"scale_factor": scale[2:], "recompute_scale_factor": False}
    return F.interpolate(x, mode="linear" if x.dim() == 3 else "bilinear", align_corners=mode == "align_corners", **kw)


def _upsample(xs, a):
    x = xs[0]
    scales = list(a.get("scales")) if "scales" in a else xs[1].reshape(-1).tolist()
    out = [math.floor(n * s) for n, s in zip(x.shape, scales)]
    return _resize_nearest(x, out, [float(np.float32(s)) for s in scales], "asymmetric", "floor")


def _einsum(xs, a):
    return torch.einsum(a.get("equation"), *xs)


def _where(xs, a):
    return torch.where(*xs)


_OPS: dict[str, Callable[[list[Tensor | None], _Attrs], Any]] = {
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _div, "Pow": _pow,
    "Mod": _mod, "Sqrt": _unary(torch.sqrt), "Reciprocal": _unary(torch.reciprocal), "Exp": _unary(torch.exp),
    "Log": _unary(torch.log), "Abs": _unary(torch.abs), "Neg": _unary(torch.neg), "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil), "Sign": _unary(torch.sign), "IsNaN": _unary(torch.isnan),
    "IsInf": lambda xs, a: _is_inf(xs[0], a), "Sin": _unary(torch.sin), "Cos": _unary(torch.cos),
    "Erf": _unary(torch.erf),
    "Tanh": _unary(torch.tanh), "Sigmoid": _unary(torch.sigmoid), "Relu": _unary(torch.relu),
    "LeakyRelu": lambda xs, a: F.leaky_relu(xs[0], a.get("alpha", 0.01)), "PRelu": _prelu,
    "Elu": lambda xs, a: F.elu(xs[0], a.get("alpha", 1.0)), "Softplus": _unary(F.softplus), "Clip": _clip,
    "HardSigmoid": _hard_sigmoid, "HardSwish": _unary(F.hardswish),
    "Gelu": lambda xs, a: F.gelu(xs[0], approximate=a.get("approximate", "none")),
    "Min": _variadic(torch.minimum), "Max": _variadic(torch.maximum), "Sum": _variadic(torch.add), "Mean": _mean,
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt), "GreaterOrEqual": _binary(torch.ge), "Not": _unary(torch.logical_not),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or), "Xor": _binary(torch.logical_xor),
    "Where": _where, "MatMul": _binary(torch.matmul), "Gemm": _gemm, "Einsum": _einsum,
    "Conv": _conv, "ConvTranspose": _conv_transpose, "MaxPool": _max_pool, "AveragePool": _avg_pool,
    "GlobalAveragePool": _global_pool(torch.mean), "GlobalMaxPool": _global_pool(torch.amax),
    "BatchNormalization": _batch_norm, "InstanceNormalization": _instance_norm, "LayerNormalization": _layer_norm,
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "Shape": _shape, "Size": _size, "Reshape": _reshape, "Flatten": _flatten, "Transpose": _transpose,
    "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Concat": _concat, "Split": _split, "Slice": _slice,
    "Gather": _gather, "GatherElements": _gather_elements, "GatherND": _gather_nd, "Trilu": _trilu,
    "Expand": _expand, "Tile": _tile, "Pad": _pad, "Range": _range, "Cast": _cast,
    "CastLike": lambda xs, a: xs[0].to(xs[1].dtype), "ConstantOfShape": _constant_of_shape,
    "Identity": _unary(lambda x: x), "Dropout": _dropout,
    **{op: _reduce(fn) for op, fn in _REDUCTIONS.items()},
    "ArgMax": _arg(torch.argmax), "ArgMin": _arg(torch.argmin), "Resize": _resize, "Upsample": _upsample,
}

#: Every op type OnnxModule runs (besides Constant, which becomes a buffer).
SUPPORTED_OPS = frozenset(_OPS) | {"Constant"}

#: Ops that compute only their first output here (the others are training statistics or indices).
_FIRST_OUTPUT_ONLY = {"BatchNormalization", "LayerNormalization", "MaxPool"}


def _unsupported_variant(op: str, a: _Attrs) -> str | None:
    """Why a node of a supported op type still cannot run here (an attribute value), or None."""
    if op == "Resize":
        mode, ctm = a.get("mode", "nearest"), a.get("coordinate_transformation_mode", "half_pixel")
        if mode == "linear" and ctm not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
            return f"Resize(linear, {ctm})"
        if mode not in ("nearest", "linear") or ctm == "tf_crop_and_resize" or a.get("antialias", 0):
            return f"Resize({mode}, {ctm}{', antialias' if a.get('antialias', 0) else ''})"
        if a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            return f"Resize(keep_aspect_ratio_policy={a.get('keep_aspect_ratio_policy')})"
    if op == "Upsample" and a.get("mode", "nearest") != "nearest":
        return f"Upsample({a.get('mode')})"
    if op == "AveragePool" and any(d != 1 for d in a.get("dilations", [])):
        return "AveragePool(dilations)"
    if op in ("ArgMax", "ArgMin") and a.get("select_last_index", 0):
        return f"{op}(select_last_index)"
    if op == "Pad" and a.get("mode", "constant") not in _PAD_MODES:
        return f"Pad({a.get('mode')})"
    return None


# --- graph reading ----------------------------------------------------------------------------

#: Element types a tensor of the file may have (numpy, which reads them, has no bfloat16).
_LOADABLE = frozenset(_DTYPES) - {ir.DataType.BFLOAT16}
_CONSTANT_FORMS = (("value_float", torch.float32), ("value_floats", torch.float32), ("value_int", torch.int64),
                   ("value_ints", torch.int64))


def _tensor(t: ir.TensorProtocol, what: str) -> Tensor:
    if t.dtype not in _LOADABLE:
        raise DistillError(f"{what} has element type {t.dtype.name}, which OnnxModule does not handle")
    return torch.from_numpy(np.array(t.numpy()))  # a writable copy, owned by torch


def _attr_value(attr: ir.Attr, where: str) -> Any:
    kind = attr.type
    if kind == ir.AttributeType.TENSOR:
        return _tensor(attr.value, f"attribute {attr.name} of {where}")
    if kind in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
        return list(attr.value)
    return attr.value


def _constant_handled(node: ir.Node) -> bool:
    """Whether a Constant node holds a form read here (not sparse, not strings)."""
    attrs = node.attributes
    if "value" in attrs:
        return attrs["value"].value.dtype in _LOADABLE
    return any(key in attrs for key, _ in _CONSTANT_FORMS)


def _constant_value(node: ir.Node) -> Tensor:
    attrs = node.attributes
    if "value" in attrs:
        return _tensor(attrs["value"].value, f"the value of Constant {node.name!r}")
    key, dtype = next((k, d) for k, d in _CONSTANT_FORMS if k in attrs)
    v = attrs[key].value
    return torch.tensor(list(v) if isinstance(v, Sequence) else v, dtype=dtype)


def _topological(graph: ir.Graph) -> list[ir.Node]:
    """The graph's nodes, each after the producers of its inputs (Kahn, stable in file order)."""
    nodes = list(graph)
    position = {id(n): i for i, n in enumerate(nodes)}
    waiting = {id(n): {id(v.producer()) for v in n.inputs if v is not None and v.producer() is not None
                       and id(v.producer()) in position} for n in nodes}
    users: dict[int, list[ir.Node]] = {}
    for n in nodes:
        for p in waiting[id(n)]:
            users.setdefault(p, []).append(n)
    ready = [i for i, n in enumerate(nodes) if not waiting[id(n)]]  # a heap of file positions
    order: list[ir.Node] = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        order.append(node)
        for user in users.get(id(node), []):
            waiting[id(user)].discard(id(node))
            if not waiting[id(user)]:
                heapq.heappush(ready, position[id(user)])
    if len(order) != len(nodes):
        raise DistillError("the ONNX graph has a cycle; check it with onnx.checker")
    return order


def graph_input_names(model: ir.Model) -> list[str]:
    """The graph inputs a caller feeds (inputs that also carry an initializer are weights)."""
    return [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]


def _unsupported(nodes: Iterable[ir.Node], opset: int) -> dict[str, list[str]]:
    """Op type (or variant) → names of the nodes that cannot run."""
    found: dict[str, list[str]] = {}
    for node in nodes:
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        reason = None
        if op not in SUPPORTED_OPS:
            reason = op
        elif op == "Constant" and not _constant_handled(node):
            reason = "Constant(sparse or string)"
        elif op in _FIRST_OUTPUT_ONLY and any(o.name for o in node.outputs[1:]):
            reason = f"{op}(extra outputs)"
        elif op in _OPS:
            attrs = _Attrs({k: v.value for k, v in node.attributes.items()}, opset, len(node.outputs))
            reason = _unsupported_variant(op, attrs)
        if reason:
            found.setdefault(reason, []).append(node.name or f"#{node.op_type}")
    return found


def _describe_unsupported(found: Mapping[str, list[str]]) -> str:
    parts = []
    for op, names in found.items():
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        parts.append(f"{op} (node {names[0]!r}{more})")
    return ", ".join(parts)


_RESERVED = frozenset(dir(nn.Module()))


def _safe_name(name: str, taken: set[str]) -> str:
    """A parameter name from an ONNX name: word characters only, unique, no clash with Module attributes."""
    base = re.sub(r"\W", "_", name) or "_"
    if base in _RESERVED or base[0].isdigit():
        base = f"_{base}"
    out, i = base, 1
    while out in taken:
        out, i = f"{base}_{i}", i + 1
    taken.add(out)
    return out


# --- the module -------------------------------------------------------------------------------

class OnnxModule(nn.Module):
    """An ONNX graph as a torch module; ``forward`` takes the graph inputs positionally or by name.

    ``input_order`` (a permutation of the graph's input names) sets the positional order, so a
    student can be called like a teacher whose inputs are listed in another order. ``source``
    names the model in errors. Returns the single output, or a tuple of the outputs.
    """

    def __init__(self, model: ir.Model, *, input_order: Sequence[str] | None = None, source: str = "the ONNX model"):
        super().__init__()
        graph, opset = model.graph, default_opset(model) or 1
        self.source = source
        nodes = _topological(graph)
        found = _unsupported(nodes, opset)
        if found:
            raise DistillError(f"{source} uses ops OnnxModule cannot run: {_describe_unsupported(found)}; "
                               "export it without them or give a torch SPEC")
        names = graph_input_names(model)
        if input_order is not None:
            if sorted(input_order) != sorted(names):
                raise DistillError(f"{source} takes inputs {names}, not {list(input_order)}")
            names = list(input_order)
        self.input_names: list[str] = names
        self._input_dtypes = {v.name: _DTYPES.get(v.dtype) for v in graph.inputs if v.name in names}
        self.output_names: list[str] = [v.name for v in graph.outputs]
        self.weights, self.consts = nn.Module(), nn.Module()
        self._values: dict[str, tuple[nn.Module, str]] = {}   # ONNX value name → (holder, attribute)
        self.trained: dict[str, str] = {}                     # parameter name (under weights) → initializer
        self._add_initializers(graph, nodes)
        self._steps = self._compile(nodes, opset)
        self._taps: dict[str, None] = {}
        self.tapped: dict[str, Tensor] = {}

    def _add_initializers(self, graph: ir.Graph, nodes: list[ir.Node]) -> None:
        slots: dict[str, set[tuple[str, int]]] = {}
        for node in nodes:
            for i, v in enumerate(node.inputs):
                if v is not None:
                    slots.setdefault(v.name, set()).add((node.op_type, i))
        taken: set[str] = set()
        for name, value in graph.initializers.items():
            if value.const_value is None:
                raise DistillError(f"{self.source}: initializer {name!r} has no data; "
                                   "load the model with its external data")
            t = _tensor(value.const_value, f"initializer {name!r}")
            key = _safe_name(name, taken)
            learnable = t.is_floating_point() and t.numel() > 1 and bool(slots.get(name, set()) - _FIXED_SLOTS)
            if learnable:
                self.weights.register_parameter(key, nn.Parameter(t))
                self._values[name], self.trained[key] = (self.weights, key), name
            else:
                self.consts.register_buffer(key, t)
                self._values[name] = (self.consts, key)
        for node in nodes:
            if node.op_type == "Constant":
                key = _safe_name(node.outputs[0].name, taken)
                self.consts.register_buffer(key, _constant_value(node))
                self._values[node.outputs[0].name] = (self.consts, key)

    def _compile(self, nodes: list[ir.Node], opset: int) -> list[_Step]:
        steps = []
        for node in nodes:
            if node.op_type == "Constant":
                continue
            where = f"node {node.name!r}"
            attrs = _Attrs({k: _attr_value(v, where) for k, v in node.attributes.items()}, opset, len(node.outputs))
            steps.append(_Step(node.op_type, node.name, tuple(v.name if v is not None else "" for v in node.inputs),
                               tuple(o.name for o in node.outputs), attrs, _OPS[node.op_type]))
        return steps

    def _bind(self, args: Sequence[Tensor], kwargs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if len(args) > len(self.input_names):
            raise DistillError(f"{self.source} takes {len(self.input_names)} inputs {self.input_names}, "
                               f"got {len(args)}")
        feeds = dict(zip(self.input_names, args))
        unknown = sorted(set(kwargs) - set(self.input_names))
        missing = [n for n in self.input_names if n not in feeds and n not in kwargs]
        if unknown or missing:
            raise DistillError(f"{self.source} takes inputs {self.input_names}; "
                               f"missing {missing}, unexpected {unknown}")
        feeds.update(kwargs)
        return {n: t if self._input_dtypes[n] in (None, t.dtype) else t.to(self._input_dtypes[n])
                for n, t in feeds.items()}

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor | tuple[Tensor, ...]:
        env = self._run(self._bind(args, kwargs), self._taps, {}, self.tapped)
        outs = tuple(env[n] for n in self.output_names)
        return outs[0] if len(outs) == 1 else outs

    def tap(self, names: Iterable[str]) -> dict[str, Tensor]:
        """Keep the values named ``names`` of every later forward in the returned dict (hidden-state
        matching reads them); ``tap(())`` stops."""
        self._taps, self.tapped = {n: None for n in names}, {}
        return self.tapped

    def values(self, *args: Tensor, capture: Iterable[str] = (),
               replace: Mapping[str, Tensor | Callable[[Tensor], Tensor]] | None = None,
               **kwargs: Tensor) -> dict[str, Tensor]:
        """Run the graph; return the values named in ``capture`` as this module computes them.

        A value named in ``replace`` is computed, captured if asked, and then replaced for every
        node after it by the given tensor, or by what the given function returns for the computed
        value: teacher forcing at block boundaries (the teacher's value), or a block fed the
        student's own value detached (``Tensor.detach``), so no gradient crosses a boundary.
        """
        captured: dict[str, Tensor] = {}
        self._run(self._bind(args, kwargs), {n: None for n in capture}, dict(replace or {}), captured)
        missing = [n for n in capture if n not in captured]
        if missing:
            raise DistillError(f"{self.source} computes no values named {missing}")
        return captured

    def dataflow(self) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        """(input names, output names) of each node in the order they run ("" for an omitted input)."""
        return [(s.inputs, s.outputs) for s in self._steps]

    def ops(self) -> list[str]:
        """The op type of each node in the order they run (as :meth:`dataflow`)."""
        return [s.op for s in self._steps]

    def _run(self, env: dict[str, Tensor], capture: Mapping[str, None], replace: Mapping[str, Tensor],
             captured: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        env = {**{name: getattr(holder, key) for name, (holder, key) in self._values.items()}, **env}
        for step in self._steps:
            xs = [env[n] if n else None for n in step.inputs]
            try:
                out = step.run(xs, step.attrs)
            except Exception as e:
                raise DistillError(f"{self.source}: node {step.name!r} ({step.op}) failed: {type(e).__name__}: "
                                   f"{first_line(e)}") from e
            for name, t in zip(step.outputs, (out,) if isinstance(out, Tensor) else out):
                if name:
                    if name in capture:
                        captured[name] = t
                    r = replace.get(name)
                    env[name] = t if r is None else r(t) if callable(r) else r
        return env

    def write_weights(self, model: ir.Model) -> ir.Model:
        """Put the current parameter values into ``model``'s initializers (the model this module was built from)."""
        inits = model.graph.initializers
        for key, name in self.trained.items():
            p = self.weights.get_parameter(key).detach().cpu()
            value = inits.get(name)
            if value is None or value.const_value is None or tuple(value.const_value.shape) != tuple(p.shape):
                raise DistillError(f"cannot write weight {name!r} into the model: it is not the one "
                                   f"{self.source} was built from")
            t = ir.Tensor(p.numpy(), name=name)
            t.metadata_props.update(value.const_value.metadata_props)  # what passes recorded on the weight
            value.const_value = t
        return model
