"""``edgecomp package``: the artifacts onnxruntime's mobile and reduced-size builds consume.

For a verified ONNX model this writes, with onnxruntime's own tools:

- ``model.ort`` — the ORT format (``convert_onnx_models_to_ort``, fixed optimizations at level
  ``all`` for the CPU EP), which ORT Mobile and minimal builds load;
- ``required_operators_and_types.config`` — the operators and types a reduced-size build must
  include (``--include_ops_by_config`` of onnxruntime's build script);
- the mobile usability verdict (``mobile_helpers.usability_checker``): for NNAPI and both CoreML
  formats, the share of nodes the EP can take, in how many partitions, which ops it cannot take,
  and whether fixing the input shapes would help.

The ``.ort`` file is then loaded in onnxruntime and its outputs compared with the ``.onnx``
model's on one feed; a mismatch beyond ``atol`` is an error and nothing is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io as _io
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edgecomp.errors import PassFailed
from edgecomp.io import copy_file, write_text

__all__ = ["PackageResult", "package_model", "ORT_FILE", "CONFIG_FILE"]

ORT_FILE = "model.ort"
CONFIG_FILE = "required_operators_and_types.config"
_EPS = {
    "NNAPI": ("nnapi", None),
    "CoreML NeuralNetwork": ("coreml", "coreml_supported_neuralnetwork_ops.md"),
    "CoreML MLProgram": ("coreml", "coreml_supported_mlprogram_ops.md"),
}


@dataclasses.dataclass
class PackageResult:
    ort_file: str
    config_file: str
    operators: list[str]                 # domain;opset;op,... lines of the config
    max_abs_diff: float                  # .ort vs .onnx outputs on the feed
    feed_shapes: dict[str, list[int]]
    usability: list[dict[str, Any]]      # one row per EP
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)


def package_model(model_path: str | os.PathLike, folder: str | os.PathLike, *, feed: Mapping[str, np.ndarray] | None = None,
                  shapes: Mapping[str, Sequence[int]] | None = None, values: Mapping[str, np.ndarray] | None = None,
                  atol: float = 1e-4) -> PackageResult:
    """Write ``model.ort`` and the operator config into ``folder`` (which the caller owns and
    makes atomic) and check the ``.ort`` against the ``.onnx`` model."""
    src, out = Path(model_path), Path(folder)
    ort_file, config_file = _convert(src, out)
    operators = [ln for ln in config_file.read_text().splitlines() if ln and not ln.startswith("#")]
    diff, shapes_used = _compare(src, ort_file, feed, shapes, values, atol)
    rows = usability(src)
    good = [r["EP"] for r in rows if r["suitable as is"] == "YES"]
    summary = {"ort size bytes": ort_file.stat().st_size, "operators": len(operators),
               "max abs diff vs onnx": diff,
               "mobile EPs that can take the model": ", ".join(good) or "none as is (the CPU EP runs it)"}
    return PackageResult(str(ort_file), str(config_file), operators, diff, shapes_used, rows, summary)


def _quiet():
    """onnxruntime's tools print progress to stdout and log at INFO; keep both off the terminal."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(_io.StringIO()))
    for name in ("ort_format_model.utils", "usability_checker", "check_usability"):
        logger = logging.getLogger(name)
        old = logger.level
        logger.setLevel(logging.ERROR)
        stack.callback(logger.setLevel, old)
    return stack


def _convert(src: Path, out: Path) -> tuple[Path, Path]:
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    staging = out / ".ort-staging"
    staging.mkdir()
    try:
        with _quiet():
            convert_onnx_models_to_ort(src, output_dir=staging, optimization_styles=[OptimizationStyle.Fixed],
                                       enable_type_reduction=True)
        ort = next(staging.glob("*.ort"), None)
        config = next(staging.glob("*.config"), None)
        if ort is None or config is None:
            raise PassFailed(f"onnxruntime's ORT-format converter wrote no .ort for {src}")
        text = re.sub(r"(?m)^# - .*$", f"# - {ORT_FILE}", config.read_text())  # the header names a temp path
        ort_final, config_final = copy_file(ort, out / ORT_FILE), write_text(out / CONFIG_FILE, text)
    except PassFailed:
        raise
    except Exception as e:
        from edgecomp.io import first_line

        raise PassFailed(f"onnxruntime's ORT-format converter failed on {src} ({first_line(e)})") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ort_final, config_final


def _compare(src: Path, ort_file: Path, feed, shapes, values, atol: float) -> tuple[float, dict[str, list[int]]]:
    from edgecomp.data import input_specs, synthesize_feed
    from edgecomp.io import load_model
    from edgecomp.runtime import make_session, run_feed

    if feed is None:
        feed = synthesize_feed(input_specs(load_model(src)), shapes, values=values)
    ref = run_feed(make_session(src), feed)
    got = run_feed(make_session(ort_file), feed)
    diff = max((float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0)
               for a, b in zip(ref, got))
    if not diff <= atol:
        raise PassFailed(f"the ORT-format model differs from {src.name} by {diff:.3g} (> {atol}); nothing was written")
    return diff, {k: list(v.shape) for k, v in feed.items()}


def usability(src: Path) -> list[dict[str, Any]]:
    """onnxruntime's mobile usability check, one row per EP it knows (NNAPI, CoreML)."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo

    with _quiet():
        model = ModelProtoWithShapeInfo(src).model_with_shape_info
        rows = []
        for ep, (kind, config) in _EPS.items():
            def check(fixed: bool):
                if kind == "nnapi":
                    return uc.check_nnapi_partitions(model, fixed)
                return uc.check_coreml_partitions(model, fixed, config)

            as_is, with_fixed = check(True), check(False)
            rows.append({
                "EP": ep,
                "nodes supported": f"{as_is.num_supported_nodes}/{as_is.num_nodes}",
                "partitions": as_is.num_partitions,
                "unsupported ops": ", ".join(sorted(as_is.unsupported_ops)) or "-",
                "nodes held back by dynamic shapes": as_is.nodes_unsupported_due_to_dynamic_input,
                "suitable as is": as_is.suitability().name,
                "with fixed input shapes": with_fixed.suitability().name,
            })
    return rows
