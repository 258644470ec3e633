"""onnxruntime's own dynamic quantization, the anchor row of the benchmarks."""

from __future__ import annotations

from edgecomp.errors import PassFailed
from edgecomp.targets import Isa, host_isa

__all__ = ["quantize_dynamic_ort"]


def quantize_dynamic_ort(src: str, dst: str, isa: Isa | None = None) -> None:
    """onnxruntime's dynamic quantization (per channel; reduce_range where u8s8 saturates), for
    side-by-side comparison only — edgecomp never falls back to it silently."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgecomp.io import atomic_path

    isa = isa or host_isa()
    try:
        with atomic_path(dst, suffix=".onnx") as tmp:
            quantize_dynamic(src, str(tmp), per_channel=True, reduce_range=isa.u8s8_saturates,
                             weight_type=QuantType.QInt8,
                             extra_options={"DefaultTensorType": 1})  # FLOAT when shape inference misses a type
    except Exception as e:
        raise PassFailed(f"onnxruntime quantize_dynamic failed: {type(e).__name__}: {e}") from e
