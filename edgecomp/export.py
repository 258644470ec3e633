"""torch → ONNX export, with a parity check in onnxruntime.

One of the two torch-side modules (with ``distill``). A model comes from a SPEC —
``package.module:factory`` or ``path/to/file.py:factory`` — whose factory returns an
``nn.Module`` or ``(module, example_inputs)``, or from a local Hugging Face folder, exported by
the task its ``config.json`` names (:data:`HF_TASKS`, :func:`export_hf`).
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

from edgecomp.errors import ExportError, OptionError, ParityError, SpecError
from edgecomp.io import Terminated, check_output_path, first_line, model_from_bytes, save_model
from edgecomp.options import Option, in_range
from edgecomp.runtime import make_session, run_feed
from edgecomp.step import StepResult

__all__ = ["ExportResult", "load_spec", "call_factory", "forward_names", "export_model", "export_spec", "hf_encoder",
           "hf_model", "export_hf", "infer_hf_task", "HFModel", "HF_TASKS", "HF_OUTPUTS", "opset_ranges", "DEFAULT_OPSET",
           "HF_AUTO_ORDER", "OPTIONS", "run"]

#: For Hugging Face encoders ``auto`` tries TorchScript first: onnxruntime fuses the dynamo graph's
#: residual Add + LayerNormalization into SkipLayerNormalization, which ran slower than LayerNorm +
#: Add on the CPUs measured (BENCHMARKS.md, "Static int8 quantization").
HF_AUTO_ORDER = ("torchscript", "dynamo")

DEFAULT_OPSET = 18


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
        except Terminated:
            raise
        except SystemExit as e:  # KeyboardInterrupt still propagates
            raise SpecError(f"importing {path} exited ({_exit_call(e)}); a SPEC module must not exit") from None
        except Exception as e:
            raise SpecError(f"importing {path} failed: {type(e).__name__}: {first_line(e, 300)}") from e
        finally:
            if folder in sys.path:
                sys.path.remove(folder)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # like `python -m`, resolve modules from the working dir
        try:
            module = importlib.import_module(target)
        except Terminated:
            raise
        except SystemExit as e:
            raise SpecError(f"importing {target!r} from SPEC {spec!r} exited ({_exit_call(e)}); "
                            "a SPEC module must not exit") from None
        except Exception as e:
            raise SpecError(f"cannot import {target!r} from SPEC {spec!r}: {type(e).__name__}: {first_line(e, 300)}") from e
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise SpecError(f"{target} has no callable {attr!r}; SPEC names a function that returns an nn.Module")
    return factory


def call_factory(factory: Any, spec: str):
    import torch

    try:
        made = factory()
    except Terminated:
        raise
    except SystemExit as e:  # KeyboardInterrupt still propagates
        raise SpecError(f"factory {spec} exited ({_exit_call(e)}) instead of returning an nn.Module") from None
    except Exception as e:
        raise SpecError(f"calling the factory of {spec!r} failed: {type(e).__name__}: {first_line(e, 300)}") from e
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
    except Terminated:
        raise
    except SystemExit as e:  # KeyboardInterrupt still propagates
        raise SpecError(f"{label}: forward exited ({_exit_call(e)}) on inputs {_describe_inputs(names, args)}") from None
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
    """Export ``module`` (to ``out``, when given: else in memory only, ``result.model``) and check
    it against torch in onnxruntime.

    ``auto_order`` is the order ``exporter="auto"`` tries the exporters in; an exporter that
    cannot write ``opset`` (see :func:`opset_ranges`) is skipped, and the reason recorded.
    ``source`` names the model in errors (the SPEC, for :func:`export_spec`). ``output_names``
    names the outputs (default ``output`` or ``output_0``, ``output_1``, ...); ``metadata`` goes
    into the file's ``metadata_props``.
    """
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ExportError(f"unknown exporter {exporter!r}; use auto, dynamo or torchscript")
    order = {"auto": tuple(auto_order), "dynamo": ("dynamo",), "torchscript": ("torchscript",)}[exporter]
    plan = _plan_exporters(opset, exporter, order)  # before any export work
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
            what = _exit_call(e) if isinstance(e, SystemExit) else first_line(e, 300)
            reasons.append(f"{name}: {what}" if isinstance(e, ExportError) else f"{name}: {type(e).__name__}: {what}")
    if model is None:
        raise ExportError("export failed with " + "; ".join(reasons))
    diff = _check_parity(model, names, args, ref, atol, rtol)
    model.metadata_props.update({str(k): str(v) for k, v in (metadata or {}).items()})
    path = save_model(model, out, inputs=protect) if out is not None else None
    return ExportResult(Path(path) if path else None, used, "; ".join(reasons) or None, list(names), out_names, diff,
                        time.perf_counter() - t0, model=model)


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
                              "try the torchscript exporter or report the model")
    return worst


def export_spec(spec: str, out: str | os.PathLike | None, **kwargs: Any) -> ExportResult:
    """Export the model a SPEC names."""
    target = spec.rpartition(":")[0]
    if target.endswith(".py"):
        kwargs["protect"] = [*kwargs.get("protect", ()), target]
    exporter = kwargs.get("exporter", "auto")
    if exporter in ("auto", "dynamo", "torchscript"):  # refuse the opset before importing anything
        _plan_exporters(kwargs.get("opset", DEFAULT_OPSET), exporter, ("dynamo", "torchscript"))
    if out is not None:
        check_output_path(out, kwargs.get("protect", ()))
    module, example = call_factory(load_spec(spec), spec)
    kwargs.setdefault("source", spec)
    return export_model(module, example, out, **kwargs)


# --- Hugging Face folders -------------------------------------------------------------------------

#: The tasks ``--hf`` exports (like optimum's ``--task``), each with the architectures it is
#: inferred from; see :func:`infer_hf_task`.
HF_TASKS: dict[str, str] = {
    "feature-extraction": "base models: text encoders, the encoder of T5/Whisper-style models, ViT-style image encoders",
    "text-classification": "...ForSequenceClassification",
    "token-classification": "...ForTokenClassification",
    "image-classification": "...ForImageClassification",
    "text-generation": "decoder-only ...ForCausalLM / ...LMHeadModel, last-position logits",
}

#: ``--hf-output`` for feature-extraction: pooled, L2-normalized ``embeddings`` or ``hidden`` states.
HF_OUTPUTS = ("embeddings", "hidden")

_HEAD_TASKS = (("ForSequenceClassification", "text-classification"), ("ForTokenClassification", "token-classification"),
               ("ForImageClassification", "image-classification"), ("ForCausalLM", "text-generation"),
               ("LMHeadModel", "text-generation"))

_SENTENCES = ["edgecomp exports this encoder", "a second, somewhat longer example sentence"]


def _supported_tasks() -> str:
    return "supported tasks: " + ", ".join(f"{t} ({what})" for t, what in HF_TASKS.items())


@dataclasses.dataclass
class HFModel:
    """A Hugging Face folder made ready for export: the module, its example inputs and what it is."""

    module: Any
    example: dict[str, Any]
    task: str
    task_source: str  # "architectures BertForSequenceClassification", "--task", ...
    modality: str  # text | vision | audio
    model_class: str  # the transformers class loaded
    output_names: list[str]
    dynamic: dict[str, dict[int, str]]
    metadata: dict[str, str]


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' loading chatter (unused pooler weights, unexpected decoder keys) off stderr."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _arch_task(arch: str) -> str | None:
    """The task an architecture class name implies, from its suffix (None: not one --hf exports)."""
    for part, task in _HEAD_TASKS:
        if part in arch:  # "in": DeiTForImageClassificationWithTeacher
            return task
    if arch.endswith("Model") and "For" not in arch:  # BertModel, T5EncoderModel, GPT2Model, ViTModel
        return "feature-extraction"
    return None


def _mapped_class(auto: Any, config: Any) -> Any | None:
    try:
        return auto._model_mapping[type(config)]
    except (KeyError, AttributeError):
        return None


def _decoder_only(config: Any) -> bool:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return (not getattr(config, "is_encoder_decoder", False) and _mapped_class(AutoModelForCausalLM, config) is not None
            and _mapped_class(AutoModelForMaskedLM, config) is None)


def infer_hf_task(config: Any) -> tuple[str, str]:
    """(task, where it came from) for a transformers config, like optimum's ``--task`` inference.

    From the first of ``architectures``: ``...ForSequenceClassification`` → text-classification,
    ``...ForTokenClassification`` → token-classification, ``...ForImageClassification`` →
    image-classification, ``...ForCausalLM`` / ``...LMHeadModel`` → text-generation,
    ``...ForConditionalGeneration`` of an encoder-decoder and base models (``...Model``) →
    feature-extraction; a decoder-only base model whose LM head is its tied embedding matrix
    (GPT2Model) → text-generation. Without ``architectures``: from ``model_type`` the same way.
    Any other head (masked LM, question answering, ...) is an :class:`ExportError`.
    """
    archs = list(getattr(config, "architectures", None) or [])
    if archs:
        arch = str(archs[0])
        task = _arch_task(arch)
        encoder_only = False
        if task is None and arch.endswith("ForConditionalGeneration") and getattr(config, "is_encoder_decoder", False):
            task, encoder_only = "feature-extraction", True
        if task is None:
            raise ExportError(f"{arch} is not an architecture edgecomp exports from Hugging Face folders; "
                              f"{_supported_tasks()}; task feature-extraction exports its base model without the head")
        source = f"architectures {arch}"
        if task == "feature-extraction" and getattr(config, "is_encoder_decoder", False):
            encoder_only = True
        if encoder_only:
            source += "; the encoder only"
    else:
        task, source = "feature-extraction", f"model_type {config.model_type}, no architectures in config.json"
    if task == "feature-extraction" and _decoder_only(config) and getattr(config, "tie_word_embeddings", False):
        task, source = "text-generation", source + "; decoder-only, its LM head is the tied embedding matrix"
    return task, source


def _read_config(p: Path) -> Any:
    import json

    import transformers
    from transformers import CONFIG_MAPPING, AutoConfig

    try:
        raw = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nested thousands deep
        raise SpecError(f"cannot read {p / 'config.json'}: {type(e).__name__}: {first_line(e, 300)}") from e
    if not isinstance(raw, dict):
        raise SpecError(f"{p / 'config.json'} is not a JSON object")
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        archs = raw.get("architectures") or []
        raise ExportError(f"{p}: model_type {model_type!r} (architectures {', '.join(map(str, archs)) or 'none'}) is not a "
                          f"transformers {transformers.__version__} model and edgecomp runs no remote code; {_supported_tasks()}")
    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise SpecError(f"cannot load the config in {p}: {type(e).__name__}: {first_line(e, 300)}") from e


def _model_class(config: Any, task: str, inferred: bool) -> tuple[Any, bool]:
    """(transformers class to load, whether to take its ``get_encoder()``) for ``task``."""
    import transformers
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    autos = {"feature-extraction": AutoModel, "text-classification": AutoModelForSequenceClassification,
             "token-classification": AutoModelForTokenClassification,
             "image-classification": AutoModelForImageClassification, "text-generation": AutoModelForCausalLM}
    archs = list(getattr(config, "architectures", None) or [])
    arch = str(archs[0]) if archs else None
    arch_cls = getattr(transformers, arch, None) if arch else None
    if arch and arch_cls is None and inferred:
        raise ExportError(f"architecture {arch} is not in transformers {transformers.__version__} and edgecomp runs "
                          f"no remote code; {_supported_tasks()}; naming a task exports the {config.model_type} model "
                          "with transformers' class for that task")
    encdec = bool(getattr(config, "is_encoder_decoder", False))
    if task == "text-generation" and encdec:
        raise ExportError(f"text-generation exports decoder-only models; {config.model_type} is an encoder-decoder model: "
                          "task feature-extraction exports its encoder")
    if task == "feature-extraction" and encdec:
        if arch and arch.endswith("EncoderModel") and arch_cls is not None:
            return arch_cls, False
        base = _mapped_class(AutoModel, config)
        if base is None:
            raise ExportError(f"transformers has no base model for {config.model_type}; {_supported_tasks()}")
        encoder_cls = getattr(transformers, base.__name__.removesuffix("Model") + "EncoderModel", None)
        return (encoder_cls, False) if encoder_cls is not None else (base, True)  # T5EncoderModel / WhisperModel
    if arch_cls is not None and arch and _arch_task(arch) == task:
        return arch_cls, False
    cls = _mapped_class(autos[task], config)
    if cls is None:
        raise OptionError("task", f"{task} does not apply to {config.model_type} models ({type(config).__name__}); "
                                  f"{_supported_tasks()}")
    return cls, False


def _modality(cls: Any, config: Any, task: str) -> str:
    name = getattr(cls, "main_input_name", "input_ids")
    modality = {"input_ids": "text", "pixel_values": "vision", "input_features": "audio"}.get(name)
    if modality == "audio" and not all(isinstance(getattr(config, k, None), int)
                                       for k in ("num_mel_bins", "max_source_positions")):
        modality = None  # Speech2Text-style features (frames x bins): not a layout --hf builds
    if modality is None:
        raise ExportError(f"{cls.__name__} reads {name}; edgecomp exports Hugging Face models that read input_ids "
                          f"(text), pixel_values (images) or Whisper-style input_features (audio); {_supported_tasks()}")
    needs = {"text-classification": "text", "token-classification": "text", "text-generation": "text",
             "image-classification": "vision"}.get(task)
    if needs and modality != needs:
        raise OptionError("task", f"{task} needs a {needs} model, {cls.__name__} is a {modality} model; "
                                  f"{_supported_tasks()}")
    return modality


def _load(cls: Any, p: Path) -> Any:
    kw = dict(local_files_only=True, trust_remote_code=False)
    # Eager attention exports as plain MatMul/Softmax, which onnxruntime runs faster at batch 1
    # than the SDPA export and which the quantizer and pruner can read.
    with _quiet_transformers():
        try:
            return cls.from_pretrained(str(p), attn_implementation="eager", **kw)
        except Exception as first:
            try:
                return cls.from_pretrained(str(p), **kw)  # a model without an eager implementation
            except Exception:
                raise SpecError(f"cannot load {cls.__name__} from {p}: {type(first).__name__}: "
                                f"{first_line(first, 300)}") from first


def _tokenized(p: Path, seq_len: int, vocab: int, pad: int | None):
    """(input_ids, attention_mask) from the folder's tokenizer, or None when it has none that
    loads or its ids do not fit ``vocab``."""
    import torch
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
        if tok.pad_token_id is not None:
            batch = tok(_SENTENCES, padding="max_length", max_length=seq_len, truncation=True, return_tensors="pt")
            ids, mask = batch["input_ids"].long(), batch["attention_mask"].long()
        else:  # GPT-2 style: no pad token, so pad by hand (the mask hides it)
            rows = tok(_SENTENCES, max_length=seq_len, truncation=True)["input_ids"]
            fill = pad if pad is not None else (tok.eos_token_id or 0)
            ids = torch.full((len(rows), seq_len), int(fill), dtype=torch.long)
            mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row, dtype=torch.long), 1
    except Exception:
        return None
    if ids.shape[1] != seq_len or (vocab and int(ids.max()) >= vocab) or int(ids.min()) < 0 or int(mask.sum(1).min()) < 1:
        return None
    return ids, mask


def _text_example(p: Path, config: Any, seq_len: int) -> dict[str, Any]:
    """Two rows of ids (the second padded): from the folder's tokenizer when it has one, else
    drawn from ``config.vocab_size`` (no tokenizer, or one that cannot pad, is needed)."""
    import torch

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        limit = getattr(text, key, None)
        if isinstance(limit, int) and limit > 2:
            seq_len = min(seq_len, limit - 2)  # RoBERTa-style position ids start after the padding index
    pad = getattr(text, "pad_token_id", None)
    pad = pad if isinstance(pad, int) and 0 <= pad < max(vocab, 1) else None
    got = _tokenized(p, seq_len, vocab, pad)
    if got is None:
        if vocab < 2:
            raise SpecError(f"{p / 'config.json'} gives no vocab_size to build example ids from, and the folder has no tokenizer")
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(min(4, vocab - 1), vocab, (2, seq_len), generator=g)
        mask = torch.ones_like(ids)
        keep = max(1, seq_len - seq_len // 3)
        ids[1, keep:], mask[1, keep:] = pad if pad is not None else 0, 0
        got = ids, mask
    return {"input_ids": got[0], "attention_mask": got[1]}


def _image_example(config: Any) -> dict[str, Any]:
    import torch

    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)) and len(size) == 2:
        h, w = int(size[0]), int(size[1])
    elif isinstance(size, int) and size > 0:
        h = w = size
    else:
        raise SpecError(f"config has no image_size (got {size!r}) to build example pixel_values from")
    channels = int(getattr(config, "num_channels", 3) or 3)
    return {"pixel_values": torch.randn(2, channels, h, w, generator=torch.Generator().manual_seed(0))}


def _audio_example(config: Any, encoder: Any) -> dict[str, Any]:
    import torch

    stride = 1
    for conv in ("conv1", "conv2"):
        layer = getattr(encoder, conv, None)
        stride *= int(layer.stride[0]) if layer is not None and hasattr(layer, "stride") else (2 if conv == "conv2" else 1)
    frames = stride * int(config.max_source_positions)  # Whisper: 2 x 1500 = 3000, fixed
    shape = (2, int(config.num_mel_bins), frames)
    return {"input_features": torch.randn(*shape, generator=torch.Generator().manual_seed(0))}


def _hf_modules():
    import torch

    normalize = torch.nn.functional.normalize

    class TextLogits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    class LastLogits(torch.nn.Module):
        """Logits of each row's last attended position (right or left padding), no KV cache."""

        def __init__(self, model, split: bool):
            super().__init__()
            self.model, self.split = model, split

        def forward(self, input_ids, attention_mask):
            positions = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)
            last = ((attention_mask.to(torch.long) * positions).amax(1) - 1).clamp(min=0).view(-1, 1, 1)
            if self.split:  # the LM head on the last position only, not on every position
                hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                               use_cache=False).last_hidden_state
                h = hidden.gather(1, last.expand(-1, 1, hidden.shape[-1])).squeeze(1)
                return self.model.get_output_embeddings()(h)
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return logits.gather(1, last.expand(-1, 1, logits.shape[-1])).squeeze(1)

    class Vision(torch.nn.Module):
        def __init__(self, model, output: str):
            super().__init__()
            self.model, self.output = model, output

        def forward(self, pixel_values):
            out = self.model(pixel_values=pixel_values)
            if self.output == "logits":
                return out.logits
            hidden = out.last_hidden_state
            if self.output == "hidden":
                return hidden
            if hidden.dim() == 3:  # ViT-style tokens: [CLS], the vector ...ForImageClassification classifies
                vec = hidden[:, 0]
            else:  # convnet feature maps: their pooler, else the spatial mean
                pooled = getattr(out, "pooler_output", None)
                vec = pooled.flatten(1) if pooled is not None else hidden.flatten(2).mean(-1)
            return normalize(vec, p=2, dim=1)

    class Audio(torch.nn.Module):
        def __init__(self, encoder, output: str):
            super().__init__()
            self.encoder, self.output = encoder, output

        def forward(self, input_features):
            hidden = self.encoder(input_features=input_features).last_hidden_state
            if self.output == "hidden":
                return hidden
            return normalize(hidden.mean(1), p=2, dim=1)  # the mean WhisperForAudioClassification pools

    return TextLogits, LastLogits, Vision, Audio


def _last_logits(model: Any, example: Mapping[str, Any]):
    """The last-position wrapper, with the LM head applied to the last position only when that
    gives the model's own logits on the example (no final scaling or soft-capping after it)."""
    import torch

    _, LastLogits, _, _ = _hf_modules()
    full = LastLogits(model, split=False).eval()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or getattr(model, "base_model", model) is model:
        return full
    split = LastLogits(model, split=True).eval()
    try:
        with torch.no_grad():
            a, b = full(**example), split(**example)
    except Exception:
        return full
    return split if a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-4) else full


def hf_model(path: str | os.PathLike, output: str = "embeddings", task: str | None = None,
             seq_len: int = 16) -> HFModel:
    """Build the module to export from a local Hugging Face folder, by its config.

    The task comes from ``config.json`` (:func:`infer_hf_task`) unless ``task`` names one of
    :data:`HF_TASKS`. feature-extraction writes one output named ``output``: with
    ``output="embeddings"`` text models give mean pooling over the attention mask + L2 norm (as
    sentence-transformers does), ViT-style image models the L2-normalized [CLS] token of the last
    hidden state, Whisper encoders the L2-normalized mean over frames; ``"hidden"`` gives the last
    hidden states. Heads write ``logits``: [batch, labels], [batch, sequence, labels] for
    token-classification, [batch, vocab] at the last attended position for text-generation.
    Example inputs need no tokenizer that can pad: ids come from the folder's tokenizer when it
    has one, else from ``config.vocab_size``; images from ``image_size``/``num_channels``; audio
    from ``num_mel_bins``/``max_source_positions``.
    """
    p = Path(path)
    if not (p / "config.json").is_file():
        raise SpecError(f"{p} is not a Hugging Face model folder (no config.json)")
    try:
        import transformers
    except ImportError as e:
        raise SpecError("exporting a Hugging Face folder needs transformers: pip install 'edgecomp[hf]'") from e
    if output not in HF_OUTPUTS:
        raise SpecError(f"unknown HF output {output!r}; use {' or '.join(HF_OUTPUTS)}")
    if task not in (None, "auto") and task not in HF_TASKS:
        raise ExportError(f"unknown task {task!r}; {_supported_tasks()}")
    transformers.utils.logging.disable_progress_bar()
    config = _read_config(p)
    inferred = task in (None, "auto")
    task, source = infer_hf_task(config) if inferred else (task, "--task")
    if output != "embeddings" and task != "feature-extraction":
        raise OptionError("hf_output", f"{output} applies to feature-extraction; {task} writes logits "
                                       "(task feature-extraction exports the base model's outputs)")
    cls, take_encoder = _model_class(config, task, inferred)
    modality = _modality(cls, config, task)
    model = _load(cls, p).eval()
    if take_encoder:
        model = model.get_encoder().eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # no KV cache in the graph
    TextLogits, _, Vision, Audio = _hf_modules()
    if modality == "text":
        example = _text_example(p, config, seq_len)
        dynamic = {name: {0: "batch", 1: "sequence"} for name in example}
    elif modality == "vision":
        example, dynamic = _image_example(config), {"pixel_values": {0: "batch"}}
    else:  # the frame axis is fixed (Whisper checks it), so only the batch is dynamic
        example, dynamic = _audio_example(config, model), {"input_features": {0: "batch"}}
    if task == "feature-extraction":
        module = {"text": lambda: _SentenceEncoder(model, output), "vision": lambda: Vision(model, output),
                  "audio": lambda: Audio(model, output)}[modality]()
        names = ["output"]
    elif task == "text-generation":
        module, names = _last_logits(model, example), ["logits"]
    elif modality == "vision":
        module, names = Vision(model, "logits"), ["logits"]
    else:
        module, names = TextLogits(model), ["logits"]
    metadata = {"edgecomp.task": task, "edgecomp.task_source": source, "edgecomp.hf_class": type(model).__name__,
                "edgecomp.modality": modality}
    if task == "feature-extraction":
        metadata["edgecomp.hf_output"] = output
    return HFModel(module.eval(), example, task, source, modality, type(model).__name__, names, dynamic, metadata)


def hf_encoder(path: str | os.PathLike, output: str = "embeddings", seq_len: int = 16, task: str | None = None):
    """(module, example_inputs) for a local Hugging Face folder (see :func:`hf_model`)."""
    m = hf_model(path, output, task, seq_len)
    return m.module, m.example


def export_hf(path: str | os.PathLike, out: str | os.PathLike | None, *, output: str = "embeddings", task: str | None = None,
              dynamic: Mapping[str, Mapping[int, str]] | None = None, protect: Sequence[str | os.PathLike] = (),
              **kwargs: Any) -> ExportResult:
    """Export a local Hugging Face folder by its task (:func:`hf_model`), checked in onnxruntime.

    Inputs get dynamic batch (and sequence, for text) axes unless ``dynamic`` names them; the
    task goes into the result and the file's metadata (``edgecomp.task``, ``edgecomp.task_source``).
    """
    exporter = kwargs.get("exporter", "auto")
    if exporter in ("auto", "dynamo", "torchscript"):  # refuse the opset before loading anything
        _plan_exporters(kwargs.get("opset", DEFAULT_OPSET), exporter, HF_AUTO_ORDER)
    protect = [path, *protect]
    if out is not None:
        check_output_path(out, protect)
    hf = hf_model(path, output, task)
    axes = {k: dict(v) for k, v in (dynamic or {}).items()}
    for name, ax in hf.dynamic.items():
        axes.setdefault(name, ax)
    kwargs.setdefault("source", f"the {hf.model_class} in {path}")
    kwargs.setdefault("auto_order", HF_AUTO_ORDER)
    res = export_model(hf.module, hf.example, out, dynamic=axes, protect=protect, output_names=hf.output_names,
                       metadata=hf.metadata, **kwargs)
    res.task, res.task_source = hf.task, hf.task_source
    return res


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


# --- options and the entry point shared by `edgecomp export` and a recipe's export step ---------

def _parse_dynamic(values: Sequence[str]) -> dict[str, dict[str, str]]:
    axes: dict[str, dict[str, str]] = {}
    for d in values:
        left, sep, label = d.partition("=")
        name, colon, axis = left.rpartition(":")
        if not (sep and colon and name and axis.isdigit() and label):
            raise SpecError(f"bad dynamic axis {d!r}; write NAME:AXIS=label, e.g. x:0=batch")
        axes.setdefault(name, {})[axis] = label
    return axes


def _parse_inputs(values: Sequence[str]) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, shape = v.partition("=")
        if not sep or not name:
            raise SpecError(f"bad input shape {v!r}; write NAME=1x3x224x224")
        out[name] = shape
    return out


def _dynamic_problem(v: dict) -> str | None:
    for name, axes in v.items():
        if not isinstance(axes, dict) or not all(
                str(a).isdigit() and isinstance(lbl, str) and lbl for a, lbl in axes.items()):
            return (f"must map input names to {{axis = 'label'}} tables, e.g. {{x = {{0 = 'batch'}}}}; "
                    f"got {name} = {axes!r}")
    return None


def _shapes_problem(v: dict) -> str | None:
    from edgecomp.data import parse_shape
    from edgecomp.errors import DataError

    for name, text in v.items():
        if not isinstance(text, str):
            return f"must map input names to shape text, e.g. {{x = '1x3x224x224'}}; got {name} = {text!r}"
        try:
            parse_shape(text)
        except DataError as e:
            return f"{name}: {e}"
    return None


def _opset_problem(v: int) -> str | None:
    if 7 <= v <= 23:  # within torch 2.13's exporters; the exporter-specific range is checked at export
        return None
    import torch

    ranges = opset_ranges()
    (ts_lo, ts_hi), (dy_lo, dy_hi) = ranges["torchscript"], ranges["dynamo"]
    low, high = min(ts_lo, dy_lo), max(ts_hi, dy_hi)
    if low <= v <= high:
        return None
    return (f"{v} is outside {low}..{high} that torch {torch.__version__.split('+')[0]}'s ONNX exporters support "
            f"(TorchScript {ts_lo}..{ts_hi}, dynamo {dy_lo}..{dy_hi}); choose an opset in that range")


OPTIONS = (
    Option("exporter", str, "auto", "auto tries torch's dynamo exporter first (TorchScript first for --hf) and "
           "falls back to the other", choices=("auto", "dynamo", "torchscript")),
    Option("opset", int, DEFAULT_OPSET, "ONNX opset", check=_opset_problem),
    Option("dynamic", dict, {}, "make an input axis symbolic, e.g. x:0=batch, or *:0=batch for every input "
           "(repeatable; recipe: {x = {0 = 'batch'}})", check=_dynamic_problem, parse=_parse_dynamic, metavar="NAME:AXIS=label"),
    Option("input", dict, {}, "example input shape when the factory gives none, e.g. x=1x3x224x224 "
           "(repeatable; recipe: {x = '1x3x224x224'})", check=_shapes_problem, parse=_parse_inputs,
           metavar="NAME=SHAPE[:dtype]"),
    Option("hf_output", str, "embeddings", "Hugging Face feature-extraction: pooled, L2-normalized embeddings "
           "(text: mean pooling; ViT: [CLS]; Whisper: mean over frames) or last hidden states",
           choices=HF_OUTPUTS),
    Option("task", str, "auto", "Hugging Face folders: the task; auto infers it from config.json's "
           "architectures", choices=("auto", *HF_TASKS)),
    Option("atol", float, 1e-4, "parity tolerance vs torch (absolute)", check=in_range(0, open_lo=True)),
)


def run(out: str | os.PathLike | None, values: Mapping[str, Any], *, spec: str | None = None,
        hf: str | os.PathLike | None = None) -> StepResult:
    """What ``edgecomp export`` and a recipe's export step call: export ``spec`` or the Hugging
    Face folder ``hf`` with the declared option ``values``; written to ``out`` when given (the
    CLI), else returned in memory only (``convert`` saves it with the other steps' models)."""
    return step_result(_export(out, values, spec=spec, hf=hf))


def step_result(res: ExportResult) -> StepResult:
    """An export in the shape every capability returns: the exporter, its fallback and the parity
    with torch as summary; names, time and the file written as evidence."""
    summary = {"exporter": res.exporter, "fallback": res.fallback_reason, "max abs diff vs torch": res.max_abs_diff}
    if res.task:
        summary["task"] = f"{res.task} (from {res.task_source})"
    return StepResult("export", res.model, summary, evidence={
        "inputs": res.input_names, "outputs": res.output_names, "seconds": res.seconds,
        "path": str(res.path) if res.path else None})


def _export(out: str | os.PathLike | None, values: Mapping[str, Any], *, spec: str | None = None,
            hf: str | os.PathLike | None = None) -> ExportResult:
    from edgecomp.data import parse_shape

    kw = dict(input_shapes={k: parse_shape(v) for k, v in values["input"].items()},
              dynamic={k: {int(a): str(lbl) for a, lbl in v.items()} for k, v in values["dynamic"].items()},
              opset=values["opset"], exporter=values["exporter"], atol=values["atol"])
    if hf and spec:
        raise SpecError("give either a SPEC or a Hugging Face folder, not both")
    if hf:
        task = None if values["task"] == "auto" else values["task"]
        return export_hf(hf, out, output=values["hf_output"], task=task, **kw)
    if values["task"] != "auto":
        raise OptionError("task", "applies to Hugging Face folders; a SPEC's factory builds the model itself")
    if not spec:
        raise SpecError("give a SPEC (package.module:factory or file.py:factory) or a Hugging Face folder")
    return export_spec(spec, out, **kw)
