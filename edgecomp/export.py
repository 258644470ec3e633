"""torch → ONNX export, with a parity check in onnxruntime.

One of the two torch-side modules (with ``distill``). A model comes from a SPEC —
``package.module:factory`` or ``path/to/file.py:factory`` — whose factory returns an
``nn.Module`` or ``(module, example_inputs)``, or from a local Hugging Face encoder folder.
``exporter="auto"`` tries torch's dynamo exporter first and falls back to the TorchScript
exporter, recording why. After export the ONNX model runs in onnxruntime on the example inputs
and must match torch within tolerance: a mismatch is an error, not a warning.
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

__all__ = ["ExportResult", "load_spec", "call_factory", "forward_names", "export_model", "export_spec", "hf_encoder", "DEFAULT_OPSET", "HF_AUTO_ORDER"]

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
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            file_spec.loader.exec_module(module)
        except Exception as e:
            raise SpecError(f"importing {path} failed: {type(e).__name__}: {e}") from e
        finally:
            sys.path.remove(str(path.parent.resolve()))
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # like `python -m`, resolve modules from the working dir
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise SpecError(f"cannot import {target!r} from SPEC {spec!r}: {type(e).__name__}: {e}") from e
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise SpecError(f"{target} has no callable {attr!r}; SPEC names a function that returns an nn.Module")
    return factory


def call_factory(factory: Any, spec: str):
    import torch

    try:
        made = factory()
    except Exception as e:
        raise SpecError(f"calling the factory of {spec!r} failed: {type(e).__name__}: {e}") from e
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
                          dynamic_axes=axes or None, opset_version=min(opset, 20), do_constant_folding=True)
    return model_from_bytes(buf.getvalue())


def _torch_outputs(module, args) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        out = module(*args)
    if isinstance(out, torch.Tensor):
        out = (out,)
    elif isinstance(out, Mapping):
        out = tuple(out.values())
    return [o.detach().cpu().numpy() for o in out]


def export_model(module: Any, example: Any, out: str | os.PathLike, *,
                 input_shapes: Mapping[str, tuple] | None = None,
                 dynamic: Mapping[str, Mapping[int, str]] | None = None,
                 opset: int = DEFAULT_OPSET, exporter: str = "auto",
                 atol: float = 1e-4, rtol: float = 1e-3, protect: Sequence[str | os.PathLike] = (),
                 auto_order: Sequence[str] = ("dynamo", "torchscript")) -> ExportResult:
    """Export ``module`` to ``out`` and check it against torch in onnxruntime.

    ``auto_order`` is the order ``exporter="auto"`` tries the exporters in.
    """
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ExportError(f"unknown exporter {exporter!r}; use auto, dynamo or torchscript")
    check_output_path(out, protect)  # before minutes of export, not after
    t0 = time.perf_counter()
    module = module.eval()
    names, args = _normalize_example(module, example, input_shapes or {})
    ref = _torch_outputs(module, args)
    out_names = ["output"] if len(ref) == 1 else [f"output_{i}" for i in range(len(ref))]
    axes = _dynamic_axes(names, dynamic or {})
    order = {"auto": tuple(auto_order), "dynamo": ("dynamo",), "torchscript": ("torchscript",)}[exporter]
    fns = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}
    reasons = []
    model = used = None
    for name in order:
        try:
            model = fns[name](module, args, names, out_names, axes, opset)
            used = name
            break
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            reasons.append(f"{name}: {type(e).__name__}: {first}")
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
    check_output_path(out, kwargs.get("protect", ()))
    module, example = call_factory(load_spec(spec), spec)
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
        encoder = AutoModel.from_pretrained(str(p), local_files_only=True, attn_implementation="eager").eval()
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
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
