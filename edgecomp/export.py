"""torch → ONNX export, with a parity check in onnxruntime.

One of the two torch-side modules (with ``distill``). A model comes from a SPEC —
``package.module:factory`` or ``path/to/file.py:factory`` — whose factory returns an
``nn.Module`` or ``(module, example_inputs)``, or from a local Hugging Face encoder folder.
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
import importlib
import importlib.util
import inspect
import io as _stdio
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.errors import ExportError, ParityError, SpecError
from edgecomp.io import check_output_path, model_from_bytes, save_model
from edgecomp.runtime import make_session, run_feed

__all__ = ["ExportResult", "load_spec", "call_factory", "forward_names", "export_model", "export_spec", "hf_encoder",
           "opset_ranges", "DEFAULT_OPSET", "HF_AUTO_ORDER"]

#: For Hugging Face encoders ``auto`` tries TorchScript first. Measured here (onnxruntime 1.32,
#: all-MiniLM-L6-v2, seq 128, 1 thread): onnxruntime fuses the dynamo graph's residual Add +
#: LayerNormalization into SkipLayerNormalization, which ran ~10x slower than LayerNorm + Add,
#: making the fp32 model 16% and the int8 model 36% slower than from the TorchScript graph.
HF_AUTO_ORDER = ("torchscript", "dynamo")

DEFAULT_OPSET = 18


@dataclasses.dataclass
class ExportResult:
    path: Path
    exporter: str
    fallback_reason: str | None
    input_names: list[str]
    output_names: list[str]
    max_abs_diff: float
    seconds: float


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), or its type."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _exit_call(e: SystemExit) -> str:
    return "sys.exit()" if e.code is None else f"sys.exit({e.code!r})"


def load_spec(spec: str) -> Any:
    """Import a SPEC and return its factory (a callable)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise SpecError(f"bad SPEC {spec!r}; write package.module:factory or path/to/file.py:factory")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise SpecError(f"SPEC file not found: {path}")
        mod_name = f"_edgecomp_spec_{path.stem}"
        file_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(file_spec)
        folder = str(path.parent.resolve())
        sys.path.insert(0, folder)
        try:
            file_spec.loader.exec_module(module)
        except SystemExit as e:  # KeyboardInterrupt still propagates
            raise SpecError(f"importing {path} exited ({_exit_call(e)}); a SPEC module must not exit") from None
        except Exception as e:
            raise SpecError(f"importing {path} failed: {type(e).__name__}: {_first_line(e)}") from e
        finally:
            if folder in sys.path:
                sys.path.remove(folder)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # like `python -m`, resolve modules from the working dir
        try:
            module = importlib.import_module(target)
        except SystemExit as e:
            raise SpecError(f"importing {target!r} from SPEC {spec!r} exited ({_exit_call(e)}); "
                            "a SPEC module must not exit") from None
        except Exception as e:
            raise SpecError(f"cannot import {target!r} from SPEC {spec!r}: {type(e).__name__}: {_first_line(e)}") from e
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise SpecError(f"{target} has no callable {attr!r}; SPEC names a function that returns an nn.Module")
    return factory


def call_factory(factory: Any, spec: str):
    import torch

    try:
        made = factory()
    except SystemExit as e:  # KeyboardInterrupt still propagates
        raise SpecError(f"factory {spec} exited ({_exit_call(e)}) instead of returning an nn.Module") from None
    except Exception as e:
        raise SpecError(f"calling the factory of {spec!r} failed: {type(e).__name__}: {_first_line(e)}") from e
    module, example = (made if isinstance(made, tuple) and len(made) == 2 else (made, None))
    if not isinstance(module, torch.nn.Module):
        raise SpecError(f"the factory of {spec!r} returned {type(module).__name__}, not an nn.Module "
                        "(or a (module, example_inputs) pair)")
    return module, example


def forward_names(module: Any, n: int) -> list[str]:
    params = [p.name for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return params[:n] if len(params) >= n else [f"input_{i}" for i in range(n)]


def _normalize_example(module: Any, example: Any, input_shapes: Mapping[str, tuple]) -> tuple[list[str], tuple]:
    """Resolve (input names, example tensors) from a factory's example or ``--input`` shapes."""
    import torch

    if example is None:
        if not input_shapes:
            raise SpecError("the factory gives no example inputs; pass --input NAME=1x3x224x224[:dtype]")
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
        raise SpecError(f"--input names {names} do not match the {len(example)} example inputs of the factory")
    return names, example


def _dynamic_axes(names: Sequence[str], dynamic: Mapping[str, Mapping[int, str]]) -> dict[str, dict[int, str]]:
    unknown = set(dynamic) - set(names)
    if unknown:
        raise SpecError(f"--dynamic names unknown input(s) {sorted(unknown)}; inputs are {list(names)}")
    return {k: dict(v) for k, v in dynamic.items()}


def opset_ranges() -> dict[str, tuple[int, int]]:
    """The opsets each installed torch exporter writes natively, as inclusive (low, high).

    From torch's own constants (torch 2.13: TorchScript 7..20, dynamo 18..23). The dynamo
    exporter builds every graph at torchlib's opset (18) and asks onnxscript's version converter
    for a lower one; that conversion fails for some models (the file then keeps opset 18), so
    below 18 ``auto`` uses TorchScript and an explicit ``dynamo`` is checked after export.
    """
    try:
        from torch.onnx import _constants as c
    except ImportError:  # pragma: no cover - a torch without the private constants
        c = None
    low = getattr(c, "ONNX_MIN_OPSET", 7)
    high = getattr(c, "ONNX_MAX_OPSET", 23)
    ts_high = getattr(c, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)
    try:
        from torch.onnx._internal.exporter._constants import TORCHLIB_OPSET as dynamo_low
    except ImportError:  # pragma: no cover
        dynamo_low = 18
    return {"torchscript": (low, min(ts_high, high)), "dynamo": (dynamo_low, high)}


def _plan_exporters(opset: Any, exporter: str, order: Sequence[str]) -> list[tuple[str, str | None]]:
    """Each exporter of ``order`` with the reason it is skipped (None: try it); a one-line error
    for an opset that no exporter allowed here can write."""
    import torch

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
    except SystemExit as e:  # KeyboardInterrupt still propagates
        raise SpecError(f"{label}: forward exited ({_exit_call(e)}) on inputs {_describe_inputs(names, args)}") from None
    except Exception as e:
        raise SpecError(f"{label}: forward failed on inputs {_describe_inputs(names, args)} "
                        f"({type(e).__name__}: {_first_line(e)})") from e
    if isinstance(out, torch.Tensor):
        out = (out,)
    elif isinstance(out, Mapping):
        out = tuple(out.values())
    if not isinstance(out, (tuple, list)) or not out or not all(isinstance(o, torch.Tensor) for o in out):
        got = type(out).__name__ if not isinstance(out, (tuple, list)) else \
            f"a {type(out).__name__} of {', '.join(sorted({type(o).__name__ for o in out})) or 'nothing'}"
        raise SpecError(f"{label}: forward returned {got}; export needs a tensor, or a tuple, list or dict of tensors")
    return [o.detach().cpu().numpy() for o in out]


def export_model(module: Any, example: Any, out: str | os.PathLike, *,
                 input_shapes: Mapping[str, tuple] | None = None,
                 dynamic: Mapping[str, Mapping[int, str]] | None = None,
                 opset: int = DEFAULT_OPSET, exporter: str = "auto",
                 atol: float = 1e-4, rtol: float = 1e-3, protect: Sequence[str | os.PathLike] = (),
                 auto_order: Sequence[str] = ("dynamo", "torchscript"), source: str | None = None) -> ExportResult:
    """Export ``module`` to ``out`` and check it against torch in onnxruntime.

    ``auto_order`` is the order ``exporter="auto"`` tries the exporters in; an exporter that
    cannot write ``opset`` (see :func:`opset_ranges`) is skipped, and the reason recorded.
    ``source`` names the model in errors (the SPEC, for :func:`export_spec`).
    """
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ExportError(f"unknown exporter {exporter!r}; use auto, dynamo or torchscript")
    order = {"auto": tuple(auto_order), "dynamo": ("dynamo",), "torchscript": ("torchscript",)}[exporter]
    plan = _plan_exporters(opset, exporter, order)  # before any export work
    check_output_path(out, protect)  # before minutes of export, not after
    t0 = time.perf_counter()
    label = source or f"the {type(module).__name__} model"
    module = module.eval()
    names, args = _normalize_example(module, example, input_shapes or {})
    ref = _torch_outputs(module, args, names, label)
    out_names = ["output"] if len(ref) == 1 else [f"output_{i}" for i in range(len(ref))]
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
        except (Exception, SystemExit) as e:  # a forward may exit while traced; KeyboardInterrupt propagates
            what = _exit_call(e) if isinstance(e, SystemExit) else _first_line(e)
            reasons.append(f"{name}: {what}" if isinstance(e, ExportError) else f"{name}: {type(e).__name__}: {what}")
    if model is None:
        raise ExportError("export failed with " + "; ".join(reasons))
    diff = _check_parity(model, names, args, ref, atol, rtol)
    path = save_model(model, out, inputs=protect)
    return ExportResult(Path(path), used, "; ".join(reasons) or None, list(names), out_names, diff,
                        time.perf_counter() - t0)


def _check_parity(model: ir.Model, names, args, ref: list[np.ndarray], atol: float, rtol: float) -> float:
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
                              "try --exporter torchscript or report the model")
    return worst


def export_spec(spec: str, out: str | os.PathLike, **kwargs: Any) -> ExportResult:
    """Export the model a SPEC names."""
    target = spec.rpartition(":")[0]
    if target.endswith(".py"):
        kwargs["protect"] = [*kwargs.get("protect", ()), target]
    exporter = kwargs.get("exporter", "auto")
    if exporter in ("auto", "dynamo", "torchscript"):  # refuse the opset before importing anything
        _plan_exporters(kwargs.get("opset", DEFAULT_OPSET), exporter, ("dynamo", "torchscript"))
    check_output_path(out, kwargs.get("protect", ()))
    module, example = call_factory(load_spec(spec), spec)
    kwargs.setdefault("source", spec)
    return export_model(module, example, out, **kwargs)


def hf_encoder(path: str | os.PathLike, output: str = "embeddings", seq_len: int = 16):
    """(module, example_inputs) for a local Hugging Face encoder folder.

    ``output="embeddings"`` gives sentence embeddings (mean pooling over the attention mask, then
    L2 normalization, as sentence-transformers does); ``"hidden"`` the last hidden states.
    """

    p = Path(path)
    if not (p / "config.json").is_file():
        raise SpecError(f"{p} is not a Hugging Face model folder (no config.json)")
    try:
        import transformers
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise SpecError("--hf needs transformers: pip install 'edgecomp[hf]'") from e
    transformers.utils.logging.disable_progress_bar()
    # Eager attention exports as plain MatMul/Softmax, which onnxruntime runs faster at batch 1
    # than the SDPA export and which the quantizer and pruner can read.
    try:
        encoder = AutoModel.from_pretrained(str(p), local_files_only=True, trust_remote_code=False, attn_implementation="eager").eval()
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise SpecError(f"cannot load a Hugging Face encoder and tokenizer from {p}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from e
    batch = tok(["edgecomp exports this encoder", "a second, somewhat longer example sentence"],
                padding="max_length", max_length=seq_len, truncation=True, return_tensors="pt")
    module = _SentenceEncoder(encoder, output)
    return module, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _sentence_encoder_class():
    import torch

    class SentenceEncoder(torch.nn.Module):
        def __init__(self, encoder, output: str):
            super().__init__()
            self.encoder, self.output = encoder, output

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if self.output == "hidden":
                return hidden
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return SentenceEncoder


def _SentenceEncoder(encoder, output: str):
    if output not in ("embeddings", "hidden"):
        raise SpecError(f"unknown HF output {output!r}; use embeddings or hidden")
    return _sentence_encoder_class()(encoder, output)
