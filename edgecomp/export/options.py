"""The options of ``edgecomp export`` (and a recipe's export step), declared once
(:mod:`edgecomp.options`), with the constants they name: the default opset, the Hugging Face
tasks and feature-extraction outputs, and :func:`opset_ranges`, the opsets the installed torch
exporters write.

Light on purpose: reading these declarations (the CLI's flags, the recipe schema) imports no
torch, numpy or onnxruntime; :func:`opset_ranges` imports torch when it is called.
"""

from __future__ import annotations

from typing import Sequence

from edgecomp.errors import SpecError
from edgecomp.options import Option, in_range

__all__ = ["OPTIONS", "DEFAULT_OPSET", "HF_AUTO_ORDER", "HF_TASKS", "HF_OUTPUTS", "opset_ranges"]

#: For Hugging Face encoders ``auto`` tries TorchScript first: onnxruntime fuses the dynamo graph's
#: residual Add + LayerNormalization into SkipLayerNormalization, which ran slower than LayerNorm +
#: Add on the CPUs measured (BENCHMARKS.md, "Static int8 quantization").
HF_AUTO_ORDER = ("torchscript", "dynamo")

DEFAULT_OPSET = 18

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


def opset_ranges() -> dict[str, tuple[int, int]]:
    """The opsets each installed torch exporter writes natively, as inclusive (low, high).

    From torch's own constants (torch 2.13: TorchScript 7..20, dynamo 18..23). The dynamo
    exporter builds every graph at torchlib's opset (18) and asks onnxscript's version converter
    for a lower one; that conversion fails for some models (the file then keeps opset 18), so
    below 18 ``auto`` uses TorchScript and an explicit ``dynamo`` is checked after export.
    """
    try:  # torch's own tables: private, so each read has a fallback
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
    try:
        import torch
    except ImportError:  # without torch the export itself refuses, naming the extra
        return None

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
