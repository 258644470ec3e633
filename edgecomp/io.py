"""The one module that touches protobuf and files.

Everything else in edgecomp works on ``onnx_ir.Model``. Outputs are written to a temporary file
in the destination folder and renamed into place, so a crash never leaves a half-written file,
and an output path that names one of the inputs is refused before any work is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import onnx
import onnx_ir as ir

from edgecomp.errors import InvalidModelError, ModelLoadError, OutputError
from edgecomp.paths import existing_file

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "SESSION_WEIGHT_BYTES",
    "load_model",
    "save_model",
    "model_bytes",
    "external_data_files",
    "saved_size_bytes",
    "session_bytes",
    "model_from_bytes",
    "to_proto",
    "from_proto",
    "model_size_bytes",
    "check_model",
    "check_output_path",
    "check_output_dir",
    "OUTPUT_MARKER",
    "work_dir",
    "replace_dir",
    "atomic_path",
    "verify_model_file",
    "first_line",
    "copy_file",
    "write_json",
    "write_text",
]

#: Protobuf cannot serialize a message over 2 GiB; weights beyond this go to external data.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24
#: Past that, the initializers of at least this many bytes reach onnxruntime sessions as arrays.
SESSION_WEIGHT_BYTES = 2**20


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
    try:
        return ir.from_proto(proto)
    except Exception as e:  # onnx-ir's SerdeError on graphs it cannot represent
        raise ModelLoadError(f"{p} cannot be read as an ONNX graph ({first_line(e)}); check it with "
                             "onnx.checker or export it again") from e


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


def session_bytes(model: ir.Model, extra_outputs: Iterable[str] = ()) -> tuple[bytes, dict[str, Any]]:
    """:func:`model_bytes` for an onnxruntime session, past protobuf's 2 GiB too: when the main
    graph's initializers hold more than ``EXTERNAL_DATA_THRESHOLD`` bytes, those of
    ``SESSION_WEIGHT_BYTES`` or more are left out of the bytes (marked external) and returned as name → array, for the session's
    ``add_external_initializers``; otherwise the dict is empty."""
    tensors = {name: v.const_value for name, v in model.graph.initializers.items() if v.const_value is not None}
    if sum(t.nbytes for t in tensors.values()) < EXTERNAL_DATA_THRESHOLD:
        return model_bytes(model, extra_outputs), {}
    big = {name: t for name, t in tensors.items() if t.nbytes >= SESSION_WEIGHT_BYTES}
    held = {}
    try:  # a placeholder in the graph while it is serialized, so the weights are not copied into the proto
        for name, t in big.items():
            held[name] = t
            model.graph.initializers[name].const_value = ir.Tensor(np.zeros(0, t.dtype.numpy()), name=name)
        proto = ir.to_proto(model)
    finally:
        for name, t in held.items():
            model.graph.initializers[name].const_value = t
    for tp in proto.graph.initializer:
        if tp.name in big:
            t = big[tp.name]
            tp.ClearField("raw_data")
            del tp.dims[:]
            tp.dims.extend(int(d) for d in t.shape)
            tp.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", "edgecomp-in-memory"), ("offset", "0"), ("length", str(t.nbytes))):
                entry = tp.external_data.add()
                entry.key, entry.value = key, value
    present = {o.name for o in proto.graph.output}
    for name in extra_outputs:
        if name not in present:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return proto.SerializeToString(), {name: t.numpy() for name, t in big.items()}


def saved_size_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a model :func:`save_model` wrote (its ``<name>.data`` counted when there is
    one), without parsing the file."""
    p = Path(path)
    data = p.parent / (p.name + ".data")
    return p.stat().st_size + (data.stat().st_size if data.exists() else 0)


def model_size_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a model, counting external data files that sit beside it."""
    p = Path(path)
    return p.stat().st_size + sum(f.stat().st_size for f in external_data_files(p))


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external-data files a model file refers to that exist beside it (each once)."""
    p = Path(path)
    proto = onnx.load(str(p), load_external_data=False)
    found: dict[str, Path] = {}
    for t in _all_tensors(proto.graph):
        for entry in t.external_data:
            if entry.key == "location" and entry.value not in found and (p.parent / entry.value).is_file():
                found[entry.value] = p.parent / entry.value
    return list(found.values())


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
    """Refuse an output that would overwrite an input, land in a missing folder, or that names a
    folder (an existing one, or a path ending in a slash: ``Path`` would drop the slash and write a
    file named like the folder)."""
    if str(out).endswith(("/", os.sep)) or (os.altsep and str(out).endswith(os.altsep)):
        raise OutputError(f"output {out} names a folder; give a file name, e.g. {Path(out) / 'model.onnx'}")
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
        raise OutputError(f"output {o} is a folder; give a file name, e.g. {o / 'model.onnx'}")
    return o


#: The key edgecomp writes into the report of each output folder (report.json, sweep.json);
#: ``overwrite`` replaces only a folder whose report carries it.
OUTPUT_MARKER = "edgecomp_output"
_REPORTS = ("report.json", "sweep.json", "package.json")
_WORK, _OLD = "edgecomp-work", "edgecomp-old"
_LEGACY_REPORT = {"recipe", "steps", "host_isa", "gates"}  # report.json of convert before the marker existed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _written_by_edgecomp(folder: Path) -> bool:
    for name in _REPORTS:
        try:
            doc = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            continue
        if isinstance(doc, dict) and (doc.get(OUTPUT_MARKER) or _LEGACY_REPORT <= doc.keys()):
            return True
    return False


def _refuse_protected_dir(o: Path, resolved: Path) -> None:
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputError(f"output folder {o} is the current folder or holds it; name a new subfolder, e.g. -o out/run1")
    if resolved.parent == resolved or resolved == Path.home().resolve():
        raise OutputError(f"output folder {o} is the filesystem root or the home folder; name a new subfolder")


def check_output_dir(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                     overwrite: bool = False) -> Path:
    """Refuse an unusable output folder before any work is done.

    Refused: a file; a missing parent; the current folder, the home folder, the root, or any
    folder above one of them; a folder that holds an input or lies inside an input folder; a
    non-empty folder without ``overwrite``; and, with ``overwrite``, a folder edgecomp did not
    write (its report carries :data:`OUTPUT_MARKER`).
    """
    o = Path(out)
    if o.exists() and not o.is_dir():
        raise OutputError(f"{o} is a file; -o names the output folder")
    if not o.parent.exists():
        raise OutputError(f"folder {o.parent} does not exist; create it first")
    resolved = o.resolve()
    _refuse_protected_dir(o, resolved)
    for i in inputs:
        if not i:
            continue
        ri = Path(i).resolve()
        if ri == resolved or resolved in ri.parents:
            raise OutputError(f"input {i} lies inside the output folder {o}; choose another -o")
        if ri in resolved.parents and ri.is_dir():
            raise OutputError(f"output folder {o} lies inside the input folder {i}; choose another -o")
    if o.exists() and any(o.iterdir()):
        if not overwrite:
            raise OutputError(f"{o} exists and is not empty; choose another -o or pass --overwrite")
        if not _written_by_edgecomp(o):
            raise OutputError(f"{o} was not written by edgecomp (no report.json of its own), so --overwrite "
                              "will not replace it; choose another -o or empty it yourself")
    return o


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(out: Path) -> None:
    """Remove work folders of dead edgecomp runs on ``out``; put back an old ``out`` a run moved aside."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.({_WORK}|{_OLD})-(\d+)-")
    for sibling in out.parent.iterdir():
        m = pattern.match(sibling.name)
        if not m or not sibling.is_dir() or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == _OLD and not out.exists():
            os.replace(sibling, out)
        else:
            shutil.rmtree(sibling, ignore_errors=True)


@contextlib.contextmanager
def work_dir(out: str | os.PathLike) -> Iterator[Path]:
    """A hidden folder beside ``out`` to build it in, removed on any failure, SIGTERM included.

    Work folders of edgecomp runs that died (SIGKILL) are removed first.
    """
    final = Path(out)
    _clean_stale(final)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_WORK}-{os.getpid()}-", dir=final.parent))
    os.chmod(work, 0o777 & ~_umask())
    with _sigterm_raises():
        try:
            yield work
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise


class Terminated(SystemExit):
    """SIGTERM, as SystemExit(143): code that turns a user's own SystemExit into an error lets it through."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into SystemExit(143) so cleanup code runs (main thread only)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _terminate(signum, frame):
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def replace_dir(staged: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Move the finished folder ``staged`` onto ``out``; an existing ``out`` is moved aside first
    and removed only once the new one is in place."""
    staged, final = Path(staged), Path(out)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.{_OLD}-{os.getpid()}-{os.urandom(4).hex()}"
        os.replace(final, old)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    The file gets the permissions the user's umask gives a new file.
    """
    final = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~_umask())
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def verify_model_file(path: str | os.PathLike, what: str = "the model") -> None:
    """``onnx.checker`` and an onnxruntime CPU session on a written file, or InvalidModelError."""
    _verify(str(path), str(path), what)


def _verify(checked: str | onnx.ModelProto, loaded: str | bytes, what: str) -> None:
    """``onnx.checker`` on ``checked`` (a path or a proto) and an onnxruntime CPU session on
    ``loaded`` (a path or the serialized bytes), or InvalidModelError."""
    import onnxruntime as ort

    try:
        onnx.checker.check_model(checked)
    except Exception as e:
        raise InvalidModelError(f"{what} fails onnx.checker ({first_line(e)}); nothing was written") from e
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        ort.InferenceSession(loaded, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise InvalidModelError(f"onnxruntime cannot load {what} ({first_line(e)}); nothing was written") from e


def save_model(model: ir.Model, path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Verify and write ``model`` atomically; weights over 2 GiB go to ``<name>.data`` beside it.

    The model is verified once, as it is written: serialized in memory, checked (``onnx.checker``
    and an onnxruntime session on those bytes), and the same bytes written and renamed into place,
    so nothing is read back from disk. Past 2 GiB the staged files are verified before the rename.
    """
    out = check_output_path(path, inputs)
    what = f"the model for {out}"
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if total < EXTERNAL_DATA_THRESHOLD:
        proto = ir.to_proto(model)
        data = proto.SerializeToString()
        _verify(proto, data, what)
        with atomic_path(out, suffix=".onnx") as tmp:
            Path(tmp).write_bytes(data)
        return out
    data_name = out.name + ".data"
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as d:
        staged = Path(d) / out.name
        ir.save(model, staged, external_data=data_name)
        verify_model_file(staged, what)
        for f in (Path(d) / data_name, staged):
            os.chmod(f, 0o666 & ~_umask())
        os.replace(Path(d) / data_name, out.parent / data_name)
        os.replace(staged, out)
    return out


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a file atomically (the copy keeps the user's umask, not the source's mode)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)




def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type when
    it has none."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


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
