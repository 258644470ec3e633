"""The options of static int8 quantization, with their defaults and allowed values."""

from __future__ import annotations

import dataclasses
from typing import Any

from edgecomp.errors import ConfigError
from edgecomp.graph import compile_patterns
from edgecomp.targets import Isa

__all__ = ["METRICS", "QuantizeOptions"]


METRICS = ("cosine", "top1", "mae")



FAMILIES = ("matmul", "conv", "conv-depthwise")



MIN_OPSET = 13



OPSET_REASON = "per-channel DequantizeLinear needs 13"



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
    embeddings: bool = True  # int8 row-wise embedding tables (Gather) of >= 1000 rows
    max_samples: int | None = None
    reservoir: int = 512
    isa: Isa | None = None  # target ISA (default: the host's)
    threads: int = 1
    progress: bool = False
    # without --tolerance: every float output must keep this cosine to float on up to
    # fidelity_samples calibration samples, else the most sensitive layers stay float (None: off)
    min_cosine: float | None = 0.99
    fidelity_samples: int = 32

    def validate(self) -> None:
        from edgecomp.quantize.calibration import METHODS

        if self.method not in METHODS:
            raise ConfigError(f"unknown --method {self.method!r}; use one of {', '.join(METHODS)}")
        if not 50 < self.percentile < 100:
            raise ConfigError("--percentile must be in (50, 100), e.g. 99.99")
        if str(self.weight_bits) not in ("auto", "7", "8"):
            raise ConfigError("--weight-bits must be auto, 7 or 8")
        if self.smooth not in ("auto", "off") and not (0.0 < _number(self.smooth) < 1.0):
            raise ConfigError("--smooth must be auto, off, or an alpha in (0, 1)")
        if self.bias_correction not in ("auto", "on", "off"):
            raise ConfigError("--bias-correction must be auto, on or off")
        if self.families not in ("auto", "all"):
            bad = set(self.families.split(",")) - set(FAMILIES)
            if bad:
                raise ConfigError(f"unknown op families {sorted(bad)}; use {', '.join(FAMILIES)}, auto or all")
        compile_patterns(self.exclude, "exclude pattern")
        if self.min_cosine is not None and not 0.0 < _number(self.min_cosine) <= 1.0:
            raise ConfigError("min_cosine must be in (0, 1], or None to skip the fidelity check")



def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
