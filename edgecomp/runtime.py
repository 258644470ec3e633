"""onnxruntime sessions: the one place sessions are configured."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from edgecomp.errors import DataError, ModelLoadError
from edgecomp.io import first_line, session_bytes

__all__ = ["make_session", "run_feed", "with_input_floats"]

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def make_session(model: ir.Model | str | os.PathLike, threads: int = 1, optimization: str = "all",
                 extra_outputs: Iterable[str] = (), profile_prefix: str | None = None) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads and one inter-op thread.

    ``extra_outputs`` exposes intermediate values as outputs (in-memory models only);
    ``profile_prefix`` turns on onnxruntime's profiler (``end_profiling()`` writes the trace).
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = _LEVELS[optimization]
    if profile_prefix:
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
    arrays: dict = {}
    values: list = []
    if isinstance(model, (str, Path)):
        source = str(model)
    else:  # past 2 GiB the largest weights go to onnxruntime as arrays, not inside the bytes
        source, arrays = session_bytes(model, extra_outputs)
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in arrays.values()]
        if arrays:
            opts.add_external_initializers(list(arrays), values)
    try:
        session = ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
        session._edgecomp_weights = (arrays, values)  # read in place by onnxruntime: kept as long as the session
        return session
    except Exception as e:
        name = model if isinstance(model, (str, Path)) else (model.graph.name or "model")
        raise ModelLoadError(f"onnxruntime cannot load {name}: {first_line(e)}") from e


_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def with_input_floats(session: ort.InferenceSession, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feed`` with its float arrays cast to the session's float input types, as DATA's float
    arrays are cast to any float input: one feed serves a float32 model and its float16 export."""
    want = {i.name: _FLOATS.get(i.type) for i in session.get_inputs()}
    return {k: v.astype(want[k]) if want.get(k) is not None and v.dtype.kind == "f" and v.dtype != want[k] else v
            for k, v in feed.items()}


def run_feed(session: ort.InferenceSession, feed: Mapping[str, np.ndarray],
             outputs: list[str] | None = None) -> list[np.ndarray]:
    try:
        return session.run(outputs, dict(feed))
    except Exception as e:
        raise DataError(f"onnxruntime rejected the input: {first_line(e)}") from e
