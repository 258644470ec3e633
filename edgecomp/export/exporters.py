"""The torch exporters and the parity check: an ``nn.Module`` and its example inputs to an ONNX file
(:func:`export_model`), or the model a SPEC names (:func:`export_spec`, loaded by
:mod:`edgecomp.export.spec`; Hugging Face folders: :mod:`edgecomp.export.hf`).

``exporter="auto"`` tries torch's dynamo exporter first and falls back to the TorchScript
exporter, recording why. After export the ONNX model runs in onnxruntime on the example inputs
and must match torch within tolerance: a mismatch is an error, not a warning.

An opset the installed exporters cannot write is refused before anything is imported or run
(:func:`opset_ranges`), and a file written at another opset than asked for is an export failure.
A SPEC that exits, fails to import, or whose forward rejects its example inputs is one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io as _stdio
import os
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.errors import ExportError, OptionError, ParityError, SpecError
from edgecomp.export.options import DEFAULT_OPSET, opset_ranges
from edgecomp.export.spec import call_factory, exit_call, forward_names, load_spec
from edgecomp.extras import require_torch
from edgecomp.io import Terminated, check_output_path, first_line, model_from_bytes, save_model
from edgecomp.runtime import make_session, run_feed

__all__ = ["ExportResult", "export_model", "export_spec", "check_parity", "plan_exporters"]


@dataclasses.dataclass
class ExportResult:
    path: Path | None  # None: exported in memory only (``out`` not given)
    exporter: str
    fallback_reason: str | None
    input_names: list[str]
    output_names: list[str]
    max_abs_diff: float
    seconds: float
    task: str | None = None  # for --hf: the task exported (see HF_TASKS)
    task_source: str | None = None  # where the task came from: "architectures X", "model_type y" or "--task"
    model: ir.Model | None = None  # the exported model, checked against torch


def _normalize_example(module: Any, example: Any, input_shapes: Mapping[str, tuple]) -> tuple[list[str], tuple]:
    """Resolve (input names, example tensors) from a factory's example or ``--input`` shapes."""
    import torch

    if example is None:
        if not input_shapes:
            raise OptionError("input", "is needed: the factory gives no example inputs; give shapes like "
                                       "NAME=1x3x224x224[:dtype]")
        names, tensors = [], []
        for name, (shape, dtype) in input_shapes.items():
            names.append(name)
            torch_dtype = getattr(torch, np.dtype(dtype or np.float32).name)
            if torch_dtype.is_floating_point:
                tensors.append(torch.randn(*shape, dtype=torch_dtype))
            else:
                tensors.append(torch.ones(*shape, dtype=torch_dtype))
        return names, tuple(tensors)
    if isinstance(example, Mapping):
        return list(example), tuple(example.values())
    if isinstance(example, torch.Tensor):
        example = (example,)
    example = tuple(example)
    names = list(input_shapes) if input_shapes else forward_names(module, len(example))
    if len(names) != len(example):
        raise OptionError("input", f"names {names} do not match the {len(example)} example inputs of the factory")
    return names, example


def _dynamic_axes(names: Sequence[str], dynamic: Mapping[str, Mapping[int, str]]) -> dict[str, dict[int, str]]:
    """The axes per input; ``*`` names every input (``*:0=batch`` makes every batch axis symbolic)."""
    if "*" in dynamic:
        every = dynamic["*"]
        dynamic = {**{n: dict(every) for n in names}, **{k: v for k, v in dynamic.items() if k != "*"}}
    unknown = set(dynamic) - set(names)
    if unknown:
        raise OptionError("dynamic", f"names unknown input(s) {sorted(unknown)}; inputs are {list(names)}")
    return {k: dict(v) for k, v in dynamic.items()}


def plan_exporters(opset: Any, exporter: str, order: Sequence[str]) -> list[tuple[str, str | None]]:
    """Each exporter of ``order`` with the reason it is skipped (None: try it); a one-line error
    for an opset that no exporter allowed here can write."""
    torch = require_torch("export")

    ranges = opset_ranges()
    (ts_lo, ts_hi), (dy_lo, dy_hi) = ranges["torchscript"], ranges["dynamo"]
    low, high = min(ts_lo, dy_lo), max(ts_hi, dy_hi)
    version = torch.__version__.split("+")[0]
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise ExportError(f"opset {opset} is outside {low}..{high} that torch {version}'s ONNX exporters support "
                          f"(TorchScript {ts_lo}..{ts_hi}, dynamo {dy_lo}..{dy_hi}); choose an opset in that range")
    if exporter == "torchscript" and not ts_lo <= opset <= ts_hi:
        raise ExportError(f"opset {opset} is outside {ts_lo}..{ts_hi} that the TorchScript exporter of torch {version} "
                          f"supports; use the dynamo exporter ({dy_lo}..{dy_hi}) or a lower opset")
    if exporter != "auto":
        return [(name, None) for name in order]  # dynamo below its range converts down, checked after export
    plan = []
    for name in order:
        lo, hi = ranges[name]
        what = "TorchScript" if name == "torchscript" else "dynamo"
        side = f"below {lo}, the lowest" if opset < lo else f"above {hi}, the highest"
        plan.append((name, None if lo <= opset <= hi else f"{name}: opset {opset} is {side} the {what} exporter writes"))
    if all(why is not None for _, why in plan):  # pragma: no cover - the two ranges overlap in torch 2.x
        raise ExportError(f"no exporter writes opset {opset}: " + "; ".join(why for _, why in plan))
    return plan


def _check_written_opset(model: ir.Model, opset: int, name: str) -> None:
    written = model.opset_imports.get("")
    if written != opset:
        why = f"; its conversion from {written} failed for this model, the TorchScript exporter writes {opset} directly" \
            if name == "dynamo" and written is not None and written > opset else ""
        raise ExportError(f"the {name} exporter wrote opset {written}, not the requested {opset}{why}")


def _describe_inputs(names: Sequence[str], args: Sequence[Any]) -> str:
    import torch

    parts = []
    for n, a in zip(names, args):
        if isinstance(a, torch.Tensor):
            shape = "x".join(str(d) for d in a.shape) or "scalar"
            dtype = "" if a.dtype == torch.float32 else ":" + str(a.dtype).removeprefix("torch.")
            parts.append(f"{n}={shape}{dtype}")
        else:
            parts.append(f"{n}={type(a).__name__}")
    return ", ".join(parts) or "(no inputs)"


def _export_dynamo(module, args, names, out_names, axes, opset) -> ir.Model:
    import logging

    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"

    sink = _stdio.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, args, dynamo=True, input_names=list(names), output_names=out_names,
                                 dynamic_axes=axes or None, opset_version=opset, verbose=False)
    return prog.model


def _export_torchscript(module, args, names, out_names, axes, opset) -> ir.Model:
    import torch

    buf = _stdio.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buf, dynamo=False, input_names=list(names), output_names=out_names,
                          dynamic_axes=axes or None, opset_version=opset, do_constant_folding=True)
    return model_from_bytes(buf.getvalue())


def _torch_outputs(module, args, names: Sequence[str] = (), label: str = "the model") -> list[np.ndarray]:
    """Run the module once on the example inputs (the first time it runs); one-line errors."""
    import torch

    try:
        with torch.no_grad():
            out = module(*args)
    except Terminated:
        raise
    except SystemExit as e:  # KeyboardInterrupt still propagates
        raise SpecError(f"{label}: forward exited ({exit_call(e)}) on inputs {_describe_inputs(names, args)}") from None
    except Exception as e:
        raise SpecError(f"{label}: forward failed on inputs {_describe_inputs(names, args)} "
                        f"({type(e).__name__}: {first_line(e, 300)})") from e
    if isinstance(out, torch.Tensor):
        out = (out,)
    elif isinstance(out, Mapping):
        out = tuple(out.values())
    if not isinstance(out, (tuple, list)) or not out or not all(isinstance(o, torch.Tensor) for o in out):
        got = type(out).__name__ if not isinstance(out, (tuple, list)) else \
            f"a {type(out).__name__} of {', '.join(sorted({type(o).__name__ for o in out})) or 'nothing'}"
        raise SpecError(f"{label}: forward returned {got}; export needs a tensor, or a tuple, list or dict of tensors")
    return [o.detach().cpu().numpy() for o in out]


def export_model(module: Any, example: Any, out: str | os.PathLike | None, *,
                 input_shapes: Mapping[str, tuple] | None = None,
                 dynamic: Mapping[str, Mapping[int, str]] | None = None,
                 opset: int = DEFAULT_OPSET, exporter: str = "auto",
                 atol: float = 1e-4, rtol: float = 1e-3, protect: Sequence[str | os.PathLike] = (),
                 auto_order: Sequence[str] = ("dynamo", "torchscript"), source: str | None = None,
                 output_names: Sequence[str] | None = None, metadata: Mapping[str, str] | None = None) -> ExportResult:
    """Export ``module`` to ``out`` and check it against torch in onnxruntime.

    ``auto_order`` is the order ``exporter="auto"`` tries the exporters in; an exporter that
    cannot write ``opset`` (see :func:`opset_ranges`) is skipped, and the reason recorded.
    ``source`` names the model in errors (the SPEC, for :func:`export_spec`). ``output_names``
    names the outputs (default ``output`` or ``output_0``, ``output_1``, ...); ``metadata`` goes
    into the file's ``metadata_props``.
    """
    require_torch("export")
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ExportError(f"unknown exporter {exporter!r}; use auto, dynamo or torchscript")
    order = {"auto": tuple(auto_order), "dynamo": ("dynamo",), "torchscript": ("torchscript",)}[exporter]
    plan = plan_exporters(opset, exporter, order)  # before any export work
    if out is not None:
        check_output_path(out, protect)  # before minutes of export, not after
    t0 = time.perf_counter()
    label = source or f"the {type(module).__name__} model"
    module = module.eval()
    names, args = _normalize_example(module, example, input_shapes or {})
    ref = _torch_outputs(module, args, names, label)
    out_names = ["output"] if len(ref) == 1 else [f"output_{i}" for i in range(len(ref))]
    if output_names is not None:
        if len(output_names) != len(ref):
            raise ExportError(f"{len(output_names)} output names {list(output_names)} for the {len(ref)} outputs of {label}")
        out_names = list(output_names)
    axes = _dynamic_axes(names, dynamic or {})
    fns = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}
    model = used = None
    reasons: list[str] = []
    for name, skip in plan:
        if skip is not None:
            reasons.append(skip)
            continue
        try:
            got = fns[name](module, args, names, out_names, axes, opset)
            _check_written_opset(got, opset, name)
            model, used = got, name
            break
        except Terminated:
            raise
        except (Exception, SystemExit) as e:  # a forward may exit while traced; KeyboardInterrupt propagates
            what = exit_call(e) if isinstance(e, SystemExit) else first_line(e, 300)
            reasons.append(f"{name}: {what}" if isinstance(e, ExportError) else f"{name}: {type(e).__name__}: {what}")
    if model is None:
        raise ExportError("export failed with " + "; ".join(reasons))
    diff = check_parity(model, names, args, ref, atol, rtol)
    model.metadata_props.update({str(k): str(v) for k, v in (metadata or {}).items()})
    path = save_model(model, out, inputs=protect) if out is not None else None
    return ExportResult(Path(path) if path else None, used, "; ".join(reasons) or None, list(names), out_names, diff,
                        time.perf_counter() - t0, model=model)


def check_parity(model: ir.Model, names, args, ref: list[np.ndarray], atol: float, rtol: float) -> float:
    session = make_session(model, threads=1)
    feed = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
    got = run_feed(session, {i.name: feed[i.name] for i in session.get_inputs()})
    worst = 0.0
    for r, g in zip(ref, got):
        if r.shape != g.shape:
            raise ParityError(f"onnxruntime output shape {g.shape} differs from torch {r.shape}")
        d = np.abs(r.astype(np.float64) - g.astype(np.float64))
        worst = max(worst, float(d.max(initial=0.0)))
        if not np.all(d <= atol + rtol * np.abs(r)):
            raise ParityError(f"onnxruntime and torch disagree: max abs diff {worst:.3g} exceeds atol {atol} + rtol {rtol}; "
                              "try the torchscript exporter or report the model")
    return worst


def export_spec(spec: str, out: str | os.PathLike | None, **kwargs: Any) -> ExportResult:
    """Export the model a SPEC names."""
    require_torch("export")
    target = spec.rpartition(":")[0]
    if target.endswith(".py"):
        kwargs["protect"] = [*kwargs.get("protect", ()), target]
    exporter = kwargs.get("exporter", "auto")
    if exporter in ("auto", "dynamo", "torchscript"):  # refuse the opset before importing anything
        plan_exporters(kwargs.get("opset", DEFAULT_OPSET), exporter, ("dynamo", "torchscript"))
    if out is not None:
        check_output_path(out, kwargs.get("protect", ()))
    module, example = call_factory(load_spec(spec), spec)
    kwargs.setdefault("source", spec)
    return export_model(module, example, out, **kwargs)


