"""onnxruntime's own dynamic quantization, the anchor row of the benchmarks.

Its model is written like every other edgecomp output: staged beside the destination, checked by
:func:`edgecomp.io.verify_model_file` (onnx.checker and an onnxruntime session) and only then
renamed into place. onnxruntime's quantizer logs advice through the root logger
("WARNING:root:Please consider to run pre-processing..."); the CLI keeps the root logger at
ERROR outside ``--debug``.
"""

from __future__ import annotations

import os

from edgecomp.errors import PassFailed
from edgecomp.targets import Isa, host_isa

__all__ = ["quantize_dynamic_ort"]


def quantize_dynamic_ort(src: str | os.PathLike, dst: str | os.PathLike, isa: Isa | None = None) -> None:
    """onnxruntime's dynamic quantization (per channel; reduce_range where u8s8 saturates), for
    side-by-side comparison only — edgecomp never falls back to it silently."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgecomp.io import atomic_path, check_output_path, first_line, verify_model_file
    from edgecomp.paths import existing_file

    source = existing_file(src, "ONNX model")
    out = check_output_path(dst, [source])
    isa = isa or host_isa()
    with atomic_path(out, suffix=".onnx") as tmp:
        try:
            quantize_dynamic(str(source), str(tmp), per_channel=True, reduce_range=isa.u8s8_saturates,
                             weight_type=QuantType.QInt8,
                             extra_options={"DefaultTensorType": 1})  # FLOAT when shape inference misses a type
        except Exception as e:
            raise PassFailed(f"onnxruntime quantize_dynamic failed on {source}: {type(e).__name__}: "
                             f"{first_line(e, 300)}") from e
        verify_model_file(tmp, f"onnxruntime's dynamic model for {out}")
