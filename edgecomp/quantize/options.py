"""The options of static int8 quantization, declared once (:mod:`edgecomp.options`), and the
:class:`QuantizeOptions` that the pass pipeline reads."""

from __future__ import annotations

import dataclasses
from typing import Any

from edgecomp.errors import OptionError
from edgecomp.measure.metrics import METRICS
from edgecomp.options import DEFAULT_MAX_SAMPLES, Option, check_values, in_range, regexes
from edgecomp.targets import Isa

__all__ = ["METHODS", "FORMATS", "METRICS", "FAMILIES", "OPTIONS", "DATA_NEEDED", "QuantizeOptions", "MIN_OPSET",
           "OPSET_REASON", "for_target"]

METHODS = ("minmax", "percentile", "entropy", "mse")
FORMATS = ("contrib", "qdq")  # the written form: onnxruntime's contrib int8 ops, or QuantizeLinear/DequantizeLinear pairs
FAMILIES = ("matmul", "conv", "conv-depthwise", "attention")  # attention: activation x activation MatMuls
#: The data quantization reads whatever its options (key -> what reads it); eval is declared by ``tolerance``.
DATA_NEEDED = {"calibration": "static quantization"}
MIN_OPSET = 13
OPSET_REASON = "per-channel DequantizeLinear needs 13"


def _smooth(v: str | float) -> str | None:
    if v in ("auto", "off"):
        return None
    return None if 0 < _number(v) < 1 else f"must be auto, off, or an alpha in (0, 1), got {v!r}"


def _families(v: str) -> str | None:
    if v in ("auto", "all") or (v and not set(v.split(",")) - set(FAMILIES)):
        return None
    return f"must be auto, all, or a comma list of {', '.join(FAMILIES)}, got {v!r}"


def _int4(v: str) -> str | None:
    if v in ("off", "auto"):
        return None
    return regexes([p for p in v.split(",") if p]) if v.strip(",") else "must be off, auto, or comma regexes"


def _int4_block(v) -> str | None:
    if v == "auto" or (isinstance(v, int) and v >= 16 and not v & (v - 1)):
        return None
    return f"must be a power of two >= 16 or auto, got {v!r}"


OPTIONS = (
    Option("method", str, "minmax", "how activation ranges are chosen from calibration statistics", choices=METHODS),
    Option("percentile", float, 99.99, "for method percentile", check=in_range(50, 100, open_lo=True, open_hi=True)),
    Option("per_channel", bool, True, "one weight scale per output channel (or one per tensor)",
           flag="--per-channel/--per-tensor"),
    Option("weight_bits", (str, int), "auto", "auto: 7 where u8xs8 can saturate (x86 without VNNI), else 8",
           choices=("auto", 7, 8)),
    Option("smooth", (str, float), "auto", "SmoothQuant: auto (an alpha per activation where it lowers the "
           "simulated error), off, or an alpha in (0, 1)", check=_smooth),
    Option("bias_correction", str, "auto", "correct the mean shift int8 weights cause", choices=("auto", "on", "off")),
    Option("families", str, "auto", "op families made int8: auto (those measured faster in int8 on this host), all, "
           f"or a comma list of {','.join(FAMILIES)}", check=_families),
    Option("exclude", list, [], "regexes of node names kept float (repeatable)", check=regexes, metavar="REGEX"),
    Option("embeddings", bool, None, "int8 row-wise embedding tables (Gather): --embeddings always (size), "
           "--no-embeddings never; unset: int8 unless timing finds their dequantizing Gather makes the model slower"),
    Option("max_samples", int, DEFAULT_MAX_SAMPLES, "calibration samples to use, evenly spaced over DATA (more cost "
           "time; ranges rarely change past a few hundred)", check=in_range(1)),
    Option("metric", str, "cosine", "what tolerance bounds: 1-cosine, top-1 accuracy drop, or MAE", choices=METRICS),
    Option("tolerance", float, None, "allowed loss vs fp32 on eval data; the most sensitive layers stay float "
           "until it is met (exit status 3 when it cannot be)", check=in_range(0), needs=lambda v: "eval"),
    Option("min_cosine", float, 0.99, "without a tolerance: the fidelity floor, every float output's cosine to fp32 "
           "on held-out calibration samples; the most sensitive layers stay float (and int4 auto adds layers) "
           "within it (None from Python: no fidelity check)", check=in_range(0, 1, open_lo=True), unset_ok=True),
    Option("format", str, None, "contrib: onnxruntime's fastest CPU form (com.microsoft ops); qdq: standard "
           "QuantizeLinear/DequantizeLinear pairs that mobile EPs (XNNPACK, NNAPI, CoreML, QNN) consume; unset: "
           "the target's form (qdq for a mobile EP, else contrib)", choices=FORMATS),
    Option("node_units", bool, None, "format qdq: also round every quantized layer's output to its own grid "
           "(whole DequantizeLinear -> op -> QuantizeLinear units, which NNAPI/QNN need to run a layer in int8; "
           "costs fidelity, and onnxruntime on CPU runs it slower); unset: on for a mobile-EP target, else off"),
    Option("int4", str, "off", "int4 MatMul weights (onnxruntime MatMulNBits, int8 compute): off, auto (the layers "
           "int4 costs least, while the fidelity bound or the tolerance holds), or comma regexes of node names",
           check=_int4),
    Option("int4_compute", str, "auto", "how int4 layers run: int8 (the int4 codes stored, the int8 weight "
           "computed from them once at session load: int8 speed), nbits (onnxruntime MatMulNBits), or auto (int8 on "
           "x86, where MatMulNBits is slower; nbits on ARM, where KleidiAI may make it faster)",
           choices=("auto", "int8", "nbits")),
    Option("int4_block", (str, int), 32, "int4 weights per scale along K: a power of two >= 16, or auto (per layer "
           "32, 64 or 128: the fewest bytes within int4_error_ratio of the layer's least output error)",
           check=_int4_block),
    Option("int4_grid", str, "asymmetric", "int4 grid: asymmetric (a zero point per block), symmetric (none "
           "stored), or auto (per layer, as int4_block auto)", choices=("asymmetric", "symmetric", "auto")),
    Option("int4_error_ratio", float, 1.25, "with int4_block or int4_grid auto: how much more held-out output "
           "error than its best layout a layer may take for fewer bytes", check=in_range(1)),
)


@dataclasses.dataclass
class QuantizeOptions:
    """Every option of static quantization, with its default."""

    method: str = "minmax"  # minmax | percentile | entropy | mse
    percentile: float = 99.99
    per_channel: bool = True
    weight_bits: str | int = "auto"  # auto (from the target ISA) | 7 | 8
    smooth: str | float = "auto"  # auto | off | a fixed alpha
    bias_correction: str = "auto"  # auto | on | off
    families: str = "auto"  # auto (measured) | all | comma list of matmul,conv,conv-depthwise
    exclude: tuple[str, ...] = ()  # regexes of node names kept float
    embeddings: bool | None = None  # int8 row-wise tables (Gather, >= 1000 rows): True always, None where they pay
    max_samples: int = DEFAULT_MAX_SAMPLES  # evenly spaced samples of DATA used (Dataset.indices)
    metric: str = "cosine"
    tolerance: float | None = None  # with eval data: accuracy-aware fallback
    format: str | None = None  # contrib (com.microsoft, onnxruntime CPU) | qdq (ai.onnx only) | None: the target's
    ep: str | None = None  # the target's mobile execution provider (it runs the QDQ form only); None: the CPU EP
    node_units: bool | None = None  # qdq: every layer's output gets its own grid too (quantize/outputs.py); None: the target's
    int4: str = "off"  # off | auto (by measured cost, within the bound) | comma regexes of node names
    int4_block: int | str = 32  # a power of two >= 16 | auto (32/64/128 per layer, by measured error)
    int4_grid: str = "asymmetric"  # asymmetric | symmetric | auto (per layer, by measured error)
    int4_error_ratio: float = 1.25  # auto layouts: error a smaller layout may add, over the layer's best
    int4_compute: str = "auto"  # auto | int8 (int4 at rest, int8 kernel) | nbits (MatMulNBits)
    reservoir: int = 512
    isa: Isa | None = None  # target ISA (default: the host's)
    threads: int = 1
    progress: bool = False
    # runs candidates on an emulated target (edgecomp.emulate.TargetRunner): the tolerance fallback and
    # the fidelity floor judge on the target's numerics, on its first max_samples samples
    target_runner: Any = None
    # without --tolerance: every float output must keep this cosine to float on up to
    # fidelity_samples calibration samples, else the most sensitive layers stay float (None: off)
    min_cosine: float | None = 0.99
    fidelity_samples: int = 32
    # a measured target table (edgecomp.quantize.measured.MeasuredTable): families auto decides from
    # its stored ratios instead of timing on this host
    table: Any = None
    # the target's device (edgecomp.remote.device.Device, a profile with remote = ...): the written
    # model is timed against its input there (never slower on the target)
    device: Any = None

    def resolved_format(self) -> str:
        """The int8 form written: as set, else the target's (QDQ for a mobile EP, else contrib)."""
        return self.format or ("qdq" if self.ep else "contrib")

    def resolved_node_units(self) -> bool:
        """Whole DQ -> op -> Q node units: as set, else on for a mobile EP (its int8 kernels take whole units)."""
        return bool(self.ep) if self.node_units is None else self.node_units

    def validate(self) -> None:
        check_values(OPTIONS, {o.name: getattr(self, o.name) for o in OPTIONS})
        if self.ep and self.format not in (None, "qdq"):
            raise OptionError("format", f"{self.format} contradicts the target: it runs on the {self.ep} EP, which has "
                                        "no kernels for that form; drop it (the format follows the target: qdq)")
        if self.int4 != "off" and self.resolved_format() != "contrib":
            raise OptionError("int4", "needs format contrib (MatMulNBits is an onnxruntime contrib op)")
        if self.node_units and self.resolved_format() != "qdq":
            raise OptionError("node_units", "needs format qdq (the contrib form's int8 ops return float)")


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def for_target(values: dict[str, Any], profile: Any = None, **fields: Any) -> QuantizeOptions:
    """:class:`QuantizeOptions` from declared option ``values`` (CLI flags or a recipe step) and a
    target profile (``edgecomp.targets.TargetProfile`` or None: this host): its ISA decides weight
    bits, its EP the int8 form, its threads the default; ``fields`` set the rest (progress, the
    target runner, a measured table). The CLI and ``convert`` both build the options here."""
    from edgecomp.options import fields_of

    if profile is not None:
        fields.setdefault("isa", profile.isa)
        fields.setdefault("ep", profile.ep)
        if fields.get("threads") is None:
            fields["threads"] = profile.threads
    if fields.get("threads") is None:
        fields["threads"] = 1
    opts = QuantizeOptions(**fields_of(values), **fields)
    opts.validate()
    return opts
