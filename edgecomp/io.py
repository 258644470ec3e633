"""The one module that touches protobuf and files.

Everything else in edgecomp works on ``onnx_ir.Model``. Outputs are written to a temporary file
in the destination folder and renamed into place, so a crash never leaves a half-written file,
and an output path that names one of the inputs is refused before any work is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import onnx
import onnx_ir as ir

from edgecomp.errors import InputFileError, ModelLoadError, OutputError

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "existing_file",
    "load_model",
    "save_model",
    "model_bytes",
    "model_from_bytes",
    "to_proto",
    "from_proto",
    "model_size_bytes",
    "check_model",
    "check_output_path",
    "check_output_dir",
    "atomic_path",
    "write_json",
    "write_text",
]

#: Protobuf cannot serialize a message over 2 GiB; weights beyond this go to external data.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24


def existing_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Return ``path`` as a Path, or raise a one-line error if it is not a readable file."""
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{what} not found: {p} (check the path)")
    if not p.is_file():
        raise InputFileError(f"{what} is not a file: {p}")
    return p


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file (with its external data) into onnx-ir."""
    p = existing_file(path, "ONNX model")
    try:
        proto = onnx.load(str(p), load_external_data=True)
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning, OSError...
        raise ModelLoadError(
            f"{p} is not a valid ONNX model ({type(e).__name__}); export it again or check the file"
        ) from e
    if not proto.graph.node and not proto.graph.output:
        raise ModelLoadError(f"{p} parsed but holds no graph; is it really an ONNX model?")
    return ir.from_proto(proto)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Convert to protobuf, for third-party tools that only take protos."""
    return ir.to_proto(model)


def from_proto(proto: onnx.ModelProto) -> ir.Model:
    """Convert a protobuf model (from a third-party tool) back to onnx-ir."""
    return ir.from_proto(proto)


def model_from_bytes(data: bytes) -> ir.Model:
    """Parse a serialized model (from an exporter writing to memory)."""
    return ir.from_proto(onnx.load_from_string(data))


def model_bytes(model: ir.Model, extra_outputs: Iterable[str] = ()) -> bytes:
    """Serialize a model in memory (for onnxruntime sessions); raises past protobuf's 2 GiB.

    ``extra_outputs`` names intermediate values to expose as graph outputs (for calibration and
    shape probing); onnxruntime infers their types, so they are added untyped.
    """
    proto = ir.to_proto(model)
    present = {o.name for o in proto.graph.output}
    for name in extra_outputs:
        if name not in present:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return proto.SerializeToString()


def model_size_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a model, counting external data files that sit beside it."""
    p = Path(path)
    total = p.stat().st_size
    proto = onnx.load(str(p), load_external_data=False)
    seen = set()
    for t in _all_tensors(proto.graph):
        for entry in t.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                ext = p.parent / entry.value
                if ext.exists():
                    total += ext.stat().st_size
    return total


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t


def check_model(model: ir.Model) -> None:
    """Run ``onnx.checker`` (raises ``onnx.checker.ValidationError``)."""
    proto = ir.to_proto(model)
    if proto.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        onnx.checker.check_model(proto)


def check_output_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output that would overwrite an input or land in a missing folder."""
    o = Path(out)
    for i in inputs:
        ip = Path(i)
        same = (ip.exists() and o.exists() and os.path.samefile(ip, o)) or ip.resolve() == o.resolve()
        if same:
            raise OutputError(f"output {o} is also an argument of this command; choose another output path")
    parent = o.parent if str(o.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"output folder {parent} does not exist; create it first")
    if o.exists() and o.is_dir():
        raise OutputError(f"output {o} is a directory; give a file name")
    return o


def check_output_dir(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                     overwrite: bool = False) -> Path:
    """Refuse an output folder that is a file, holds one of the inputs, or is not empty (without
    ``overwrite``) — before any work is done."""
    o = Path(out)
    if o.exists() and not o.is_dir():
        raise OutputError(f"{o} is a file; -o names the output folder")
    if not o.parent.exists():
        raise OutputError(f"folder {o.parent} does not exist; create it first")
    for i in inputs:
        if i and (Path(i).resolve() == o.resolve() or o.resolve() in Path(i).resolve().parents):
            raise OutputError(f"input {i} lies inside the output folder {o}; choose another -o")
    if o.exists() and any(o.iterdir()) and not overwrite:
        raise OutputError(f"{o} exists and is not empty; choose another -o or pass --overwrite")
    return o


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success."""
    final = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_model(model: ir.Model, path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Write ``model`` atomically; weights over 2 GiB go to ``<name>.data`` beside it."""
    out = check_output_path(path, inputs)
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if total < EXTERNAL_DATA_THRESHOLD:
        with atomic_path(out) as tmp:
            ir.save(model, tmp)
        return out
    data_name = out.name + ".data"
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as d:
        staged = Path(d) / out.name
        ir.save(model, staged, external_data=data_name)
        os.replace(Path(d) / data_name, out.parent / data_name)
        os.replace(staged, out)
    return out


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically."""
    out = Path(path)
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically (numpy scalars are converted)."""
    return write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, np.dtype)):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
