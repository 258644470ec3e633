"""DATA: the sample format every command reads, and input specs read from a model.

DATA is either one ``.npz`` whose arrays are keyed by the model's input names with a leading
sample axis (sample ``i`` is fed as ``array[i:i+1]``), or a directory of ``.npz`` files, one feed
each (shapes may differ between files, e.g. token sequences of different lengths). Samples are
read lazily, one at a time, so memory does not grow with the size of DATA:

- an ``.npz`` saved with ``numpy.savez`` (members stored uncompressed) is read in place: a
  member's data starts at its zip local header (30 bytes + name + extra field, whose lengths are
  read from that header, zip64 included) plus the ``.npy`` header. A C-order array (what numpy
  writes by default) is read one sample at a time, ``prod(shape[1:]) * itemsize`` bytes at
  ``start + i * that``, with a plain file read: nothing is mapped, so memory holds the samples
  read and no more (a memory map faults in whole readahead windows, megabytes per sample, and
  counts them as the process's memory). A Fortran-order array, whose sample is strided over the
  whole file, is memory-mapped (``np.memmap`` in its own order);
- an ``.npz`` saved with ``numpy.savez_compressed`` cannot be mapped (a sample's bytes are only
  reachable by inflating everything before them), so it is read whole up to
  :data:`MAX_COMPRESSED_BYTES` of arrays and refused above that with one line saying to save it
  with ``numpy.savez``;
- a folder is read one file per sample.

What a sample holds (finite numbers) is checked when that sample is read, never by scanning DATA
up front; names, dtypes, ranks and sample counts come from the headers.

Commands that calibrate or fit use a bounded sample (:data:`DEFAULT_MAX_SAMPLES`, raised by
``--max-samples``) chosen by :meth:`Dataset.indices`: evenly spaced over DATA, because DATA is
often saved in order (by class, speaker, recording or time) and its first N samples would see
only the first classes; evenly spaced indices cover all of it, are the same on every run
(no seed), and read the file front to back.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.errors import DataError, DataNeeded, InputFileError, OptionError
from edgecomp.options import DEFAULT_MAX_SAMPLES  # declared with the options (light to import); re-exported
from edgecomp.passes.specialize_inputs import fixed_inputs

__all__ = [
    "InputSpec",
    "Dataset",
    "Feeds",
    "Labels",
    "as_data",
    "input_specs",
    "load_data",
    "load_labels",
    "check_label_range",
    "parse_shape",
    "synthesize_feed",
    "feed_defaults",
    "image_size_hint",
    "default_shape",
    "parse_value",
    "save_npz",
    "DEFAULT_MAX_SAMPLES",
    "MAX_COMPRESSED_BYTES",
]

Feed = dict[str, np.ndarray]


#: The most bytes of compressed (``numpy.savez_compressed``) arrays read whole; above it DATA is refused.
MAX_COMPRESSED_BYTES = 2**28

#: The largest input ``synthesize_feed`` makes: a typo'd shape fails with one line, not a swap storm.
MAX_SYNTHESIZED_BYTES = 2**32

_DTYPES = {
    "float32": np.float32, "float16": np.float16, "float64": np.float64,
    "int64": np.int64, "int32": np.int32, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype, and dims (int, or str for a symbolic dim, or None); ``fixed``:
    the value a specialized model accepts (``--value`` when it was specialized; its guard refuses others)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]
    fixed: np.ndarray | None = dataclasses.field(default=None, compare=False)

    def shape_text(self) -> str:
        return "x".join("?" if d is None else str(d) for d in self.dims)


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs are left out).

    A dim stored as a non-positive number (``dim_value: -1`` for "any batch", which onnxruntime
    accepts) is symbolic, like an unnamed dim: None."""
    specs, fixed = [], fixed_inputs(model)
    for v in model.graph.inputs:
        if v.name in model.graph.initializers:
            continue
        dtype = v.dtype.numpy() if v.dtype is not None else np.dtype(np.float32)
        dims: tuple = ()
        if v.shape is not None:
            dims = tuple((d if d > 0 else None) if isinstance(d, int) else (str(d) if d.value is not None else None)
                         for d in v.shape)
        specs.append(InputSpec(v.name, np.dtype(dtype), dims, fixed.get(v.name)))
    return specs


def parse_shape(text: str) -> tuple[tuple[int, ...], np.dtype | None]:
    """Parse ``1x3x224x224[:dtype]`` into (shape, dtype or None)."""
    shape_part, _, dtype_part = text.partition(":")
    if not re.fullmatch(r"\d+(x\d+)*", shape_part.strip()):
        raise DataError(f"bad shape {text!r}; write it like 1x3x224x224 or 1x128:int64")
    dtype = None
    if dtype_part:
        if dtype_part not in _DTYPES:
            raise DataError(f"unknown dtype {dtype_part!r} in {text!r}; use one of {', '.join(_DTYPES)}")
        dtype = np.dtype(_DTYPES[dtype_part])
    return tuple(int(s) for s in shape_part.split("x")), dtype


#: Sizes ``synthesize_feed`` gives symbolic dims no ``--shape`` fixes (printed with every feed).
DEFAULT_BATCH, DEFAULT_SEQUENCE, DEFAULT_IMAGE = 1, 128, 224


def default_shape(spec: InputSpec, image_size: int | None = None) -> tuple[tuple[int, ...], list[str]]:
    """A concrete shape for ``spec`` and what was assumed: batch 1 for a symbolic leading dim,
    the image size (metadata, else 224) for the spatial dims of a 4-D float input, and 128
    (a sequence length) for any other symbolic dim."""
    shape, notes = [], []
    for axis, dim in enumerate(spec.dims):
        if isinstance(dim, int):
            shape.append(dim)
            continue
        if axis == 0 or (isinstance(dim, str) and "batch" in dim.lower()):
            size, what = DEFAULT_BATCH, "batch"
        elif len(spec.dims) == 4 and axis >= 2 and np.issubdtype(spec.dtype, np.floating):
            size, what = image_size or DEFAULT_IMAGE, "image side"
        else:
            size, what = DEFAULT_SEQUENCE, "sequence"
        shape.append(size)
        notes.append(f"{what} {size}")
    return tuple(shape), notes


def image_size_hint(model: ir.Model) -> int | None:
    """An image side recorded in the model's metadata (``image_size``, ``img_size``, ``input_size``)."""
    for key, value in model.metadata_props.items():
        if key.lower() in ("image_size", "img_size", "input_size", "imagesize"):
            digits = re.findall(r"\d+", str(value))
            if digits and 0 < int(digits[-1]) <= 8192:
                return int(digits[-1])
    return None


def synthesize_feed(specs: Sequence[InputSpec], shapes: Mapping[str, Sequence[int]] | None = None,
                    seed: int = 0, values: Mapping[str, np.ndarray] | None = None,
                    image_size: int | None = None) -> Feed:
    """Random inputs that fit ``specs``; ``shapes`` fills symbolic dims (``--shape NAME=1x128``),
    ``values`` fixes whole inputs (``--value sr=16000``); other symbolic dims get
    :func:`default_shape`'s sizes.

    Float inputs are standard normal, integer inputs small non-negative ids (masks get ones), so
    the same feed works for CNNs and token models alike.
    """
    shapes, values = dict(shapes or {}), dict(values or {})
    names = {s.name for s in specs}
    for what, given in (("shapes", shapes), ("values", values)):  # DataError: inspect notes it and goes on
        if set(given) - names:
            raise DataError(f"{what} name unknown input(s) {sorted(set(given) - names)}; the model's inputs are "
                            f"{sorted(names)}")
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in specs:
        if spec.name in values or spec.fixed is not None:  # a specialized model's value unless told otherwise
            feed[spec.name] = _fixed_value(spec, values[spec.name] if spec.name in values else spec.fixed)
            continue
        if spec.name in shapes:
            shape = tuple(int(d) for d in shapes[spec.name])
            _check_dims(spec, shape)
        else:
            shape = default_shape(spec, image_size)[0]
        nbytes = int(np.prod(shape, dtype=object)) * spec.dtype.itemsize
        if nbytes > MAX_SYNTHESIZED_BYTES:
            raise DataError(f"input {spec.name!r} of shape {'x'.join(map(str, shape))} would need "
                            f"{nbytes / 2**30:.1f} GiB; give a smaller shape")
        if np.issubdtype(spec.dtype, np.floating):
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif "mask" in spec.name.lower() or spec.dtype == np.bool_:
            feed[spec.name] = np.ones(shape, dtype=spec.dtype)
        else:
            feed[spec.name] = rng.integers(0, 100, size=shape).astype(spec.dtype)
    return feed


def feed_defaults(specs: Sequence[InputSpec], shapes: Mapping[str, Sequence[int]] | None = None,
                  values: Mapping[str, np.ndarray] | None = None, image_size: int | None = None) -> list[str]:
    """What :func:`synthesize_feed` assumed for the inputs neither ``shapes`` nor ``values`` fix."""
    given = set(shapes or {}) | set(values or {}) | {s.name for s in specs if s.fixed is not None}
    notes = [n for s in specs if s.name not in given for n in default_shape(s, image_size)[1]]
    return list(dict.fromkeys(notes))


def parse_value(text: str) -> tuple[str, np.ndarray]:
    """``NAME=16000`` or ``NAME=0.5,0.5`` into (name, values)."""
    name, sep, raw = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, np.array([float(v) for v in raw.split(",")])
    except ValueError:
        raise OptionError("values", f"{text!r} is not NAME=VALUES; write NAME=16000 or NAME=0.5,0.5") from None


def _fixed_value(spec: InputSpec, raw: np.ndarray) -> np.ndarray:
    """``raw`` as the input's dtype: a scalar for rank 0, one value filling the input's shape, or
    exactly as many values as a fixed-shape input holds."""
    if np.issubdtype(spec.dtype, np.integer) and not np.all(raw == np.round(raw)):
        raise DataError(f"the value of input {spec.name!r}: the model wants {spec.dtype}, got {raw.tolist()}")
    arr = raw.astype(spec.dtype)
    shape = default_shape(spec)[0]
    if arr.size == 1:
        return np.full(shape, arr[0], dtype=spec.dtype)
    if arr.size != int(np.prod(shape)) or not all(isinstance(d, int) for d in spec.dims):
        raise DataError(f"the value of input {spec.name!r}: give one value (it fills {'x'.join(map(str, shape)) or 'the scalar'}) "
                        f"or exactly {int(np.prod(shape))} for its fixed shape")
    return arr.reshape(shape)


def _check_dims(spec: InputSpec, shape: Sequence[int]) -> None:
    if spec.dims and len(shape) != len(spec.dims):
        raise DataError(f"input {spec.name!r} has rank {len(spec.dims)} ({spec.shape_text()}), "
                        f"got shape {'x'.join(map(str, shape))}")
    for i, (want, got) in enumerate(zip(spec.dims, shape)):
        if isinstance(want, int) and want != got:
            raise DataError(f"input {spec.name!r} needs size {want} at axis {i} ({spec.shape_text()}), "
                            f"got {'x'.join(map(str, shape))}; fix the data or the shape")


def _holds_fixed(arr: np.ndarray, spec: InputSpec) -> bool:
    """Whether a fed array is the value a specialized input was fixed to (one value fills it)."""
    want = np.ravel(spec.fixed).astype(spec.dtype)
    got = np.ravel(arr).astype(spec.dtype)
    return bool(got.size and (np.all(got == want[0]) if want.size == 1 else np.array_equal(got, want)))


def _check_values(a: np.ndarray, where: str) -> None:
    """Refuse object, string and non-finite arrays with one line naming where they are."""
    _check_kind(a.dtype, where)
    if a.dtype.kind in "fc" and not np.isfinite(a).all():
        raise DataError(f"{where} holds NaN or Inf; remove or fix that sample")


class Dataset:
    """Lazily read samples from DATA; ``iter(ds)`` yields one feed dict per sample."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise InputFileError(f"DATA not found: {self.path} (give a .npz file or a folder of .npz files)")
        if self.path.is_dir():
            self._files = sorted(self.path.glob("*.npz"))
            if not self._files:
                raise DataError(f"DATA folder {self.path} holds no .npz files; put one feed per .npz in it")
            self._arrays = None
            self.names = tuple(self[0])
        else:
            if self.path.suffix != ".npz":
                raise DataError(f"DATA {self.path} is not a .npz file; save samples with numpy.savez")
            self._arrays = _checked_arrays(open_npz(self.path), self.path)
            self.names = tuple(self._arrays)
            self._files = None
        if len(self) == 0:
            raise DataError(f"DATA {self.path} holds no samples")

    def __len__(self) -> int:
        if self._files is not None:
            return len(self._files)
        return next(iter(self._arrays.values())).shape[0]

    def __getitem__(self, i: int) -> Feed:
        if self._files is not None:
            return self._read_file(self._files[i])
        i = range(len(self))[i]  # IndexError past the end, like a list
        feed = {k: a.sample(i) if isinstance(a, _StoredArray) else a[i : i + 1] for k, a in self._arrays.items()}
        for k, a in feed.items():
            _check_values(a, f"DATA {self.path} array {k!r} sample {i}")
        return feed

    def indices(self, limit: int | None = None) -> Sequence[int]:
        """The samples a bounded read uses: all of them (a range, however many), or ``limit``
        evenly spaced over DATA (``floor(j * len / limit)``, increasing, sample 0 first)."""
        n = len(self)
        if limit is None or limit >= n:
            return range(n)
        return [j * n // limit for j in range(limit)]

    def describe_used(self, limit: int | None) -> str:
        """``N of M samples`` for reports."""
        return f"{len(self.indices(limit))} of {len(self)}"

    def _read_file(self, f: Path) -> Feed:
        """One feed of a DATA folder, refused with one line when corrupt, keyed otherwise or not finite."""
        try:
            with np.load(f, allow_pickle=False) as z:
                feed = {k: z[k] for k in z.files}
        except Exception as e:
            raise DataError(f"cannot read {f} as .npz ({type(e).__name__}); save each feed with numpy.savez") from e
        names = getattr(self, "names", None)
        if names is not None and set(feed) != set(names):
            raise DataError(f"{f} is keyed {sorted(feed)} but {self._files[0].name} is keyed {sorted(names)}; "
                            "every feed in a DATA folder needs the same arrays")
        for k, a in feed.items():
            _check_values(a, f"DATA {f} array {k!r}")
        return feed

    def __iter__(self) -> Iterator[Feed]:
        for i in range(len(self)):
            yield self[i]

    def check_against(self, specs: Sequence[InputSpec]) -> None:
        """Raise a one-line DataError if names, ranks, fixed dims or dtypes do not fit ``specs``."""
        want = {s.name for s in specs}
        have = set(self.names)
        if want != have:
            missing, extra = sorted(want - have), sorted(have - want)
            raise DataError(f"DATA {self.path} is keyed {sorted(have)} but the model's inputs are "
                            f"{sorted(want)} (missing {missing}, unexpected {extra}); rename the arrays")
        self._check_feed(self[0], specs)

    def _check_feed(self, feed: Feed, specs: Sequence[InputSpec]) -> None:
        for spec in specs:
            arr = feed[spec.name]
            _check_dims(spec, arr.shape)
            if arr.dtype == np.bool_ and spec.dtype != np.bool_:
                raise DataError(f"DATA array {spec.name!r} is bool but the model wants {spec.dtype}; "
                                "store numbers (e.g. astype(numpy.float32))")
            if not np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                raise DataError(f"DATA array {spec.name!r} is {arr.dtype} but the model wants {spec.dtype}")
            if spec.fixed is not None and not _holds_fixed(arr, spec):
                fixed = ",".join(f"{v:g}" for v in np.ravel(spec.fixed))
                raise DataError(f"DATA array {spec.name!r} holds {np.ravel(arr)[:4].tolist()} but the model was "
                                f"specialized with {spec.name}={fixed} (--value), which it accepts alone; "
                                f"give DATA for that value or specialize with the value the DATA holds")

    def feeds_for(self, specs: Sequence[InputSpec], limit: int | None = None) -> Iterator[Feed]:
        """Feeds cast to the model's dtypes (e.g. int32 ids to int64): every sample, or ``limit``
        of them chosen by :meth:`indices`."""
        for i in self.indices(limit):
            yield self.feed_for(i, specs)

    def feed_for(self, i: int, specs: Sequence[InputSpec]) -> Feed:
        """Sample ``i`` checked against ``specs`` and cast to their dtypes."""
        feed = self[i]
        if i:  # sample 0 was checked by check_against
            self._check_feed(feed, specs)
        dtypes = {s.name: s.dtype for s in specs}
        return {k: np.ascontiguousarray(v, dtype=dtypes[k]) for k, v in feed.items() if k in dtypes}

    def reread(self, specs: Sequence[InputSpec], limit: int | None = None) -> "_Feeds":
        """:meth:`feeds_for` as a sized iterable that reads DATA again on every pass."""
        return _Feeds(self, specs, limit)


def _checked_arrays(arrays: dict, where) -> dict:
    """The arrays of one DATA (a .npz or a dict in memory), refused unless each has the same
    leading sample axis and a numeric kind."""
    if not arrays:
        raise DataError(f"DATA {where} holds no arrays")
    scalars = [k for k, a in arrays.items() if a.ndim == 0]
    if scalars:
        raise DataError(f"arrays {scalars} in {where} have no sample axis; store shape [N, ...] per input")
    counts = {k: a.shape[0] for k, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"arrays in {where} have different sample counts {counts}; "
                        "every array needs the same leading sample axis")
    for k, a in arrays.items():
        _check_kind(a.dtype, f"DATA {where} array {k!r}")
    return arrays


class Feeds(Dataset):
    """DATA held in memory, for the Python API: a dict of arrays keyed by input name with a leading
    sample axis (like one ``.npz``: sample ``i`` is ``array[i:i+1]``), or an iterable of feed dicts
    (like a DATA folder: each fed as it is; an iterator is read once, into memory). The same checks
    as DATA on disk, with the same messages (naming it ``<numpy feeds>``)."""

    def __init__(self, feeds: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]]):
        self.path = Path("<numpy feeds>")
        self._files = None
        if isinstance(feeds, Mapping):
            self._list = None
            self._arrays = _checked_arrays({str(k): np.asarray(v) for k, v in feeds.items()}, self.path)
            self.names = tuple(self._arrays)
        else:
            self._arrays = None
            self._list = [_feed_dict(f, j) for j, f in enumerate(feeds)]
            if not self._list:
                raise DataError("the feeds given are empty; give at least one feed (a dict of arrays)")
            self.names = tuple(self._list[0])
        if len(self) == 0:
            raise DataError(f"DATA {self.path} holds no samples")

    def __len__(self) -> int:
        return len(self._list) if self._list is not None else super().__len__()

    def __getitem__(self, i: int) -> Feed:
        if self._list is None:
            return super().__getitem__(i)
        feed = self._list[i]
        if set(feed) != set(self.names):
            raise DataError(f"feed {range(len(self))[i]} is keyed {sorted(feed)} but feed 0 is keyed "
                            f"{sorted(self.names)}; every feed needs the same arrays")
        for k, a in feed.items():
            _check_values(a, f"feed {range(len(self))[i]} array {k!r}")
        return dict(feed)


def _feed_dict(feed, j: int) -> Feed:
    if not isinstance(feed, Mapping):
        raise DataError(f"feed {j} is a {type(feed).__name__}, not a dict of arrays keyed by input name")
    out = {str(k): np.asarray(v) for k, v in feed.items()}
    for k, a in out.items():
        _check_kind(a.dtype, f"feed {j} array {k!r}")
    return out


def as_data(data: str | os.PathLike | Dataset | Mapping | Iterable | None) -> str | os.PathLike | Dataset | None:
    """What a :class:`StepData` field holds for ``data``: a DATA path as given, a Dataset, or numpy
    feeds wrapped in :class:`Feeds`."""
    if data is None or isinstance(data, (str, os.PathLike, Dataset)):
        return data
    return Feeds(data)


@dataclasses.dataclass(frozen=True, eq=False)
class Labels:
    """Class ids held in memory (the Python API), read by :func:`load_labels` like a ``.npy``."""

    ids: np.ndarray

    def __str__(self) -> str:
        return "<labels array>"


class _Feeds:
    """:meth:`Dataset.feeds_for` as a sequence that can be iterated again (each pass reads DATA
    anew), indexed and sized: what a consumer that runs several models over DATA (validate, the
    eval data of a tolerance search) holds instead of a list of every feed."""

    def __init__(self, ds: "Dataset", specs: Sequence[InputSpec], limit: int | None):
        self.ds, self.specs, self.limit = ds, specs, limit

    def __len__(self) -> int:
        return len(self.ds.indices(self.limit))

    def __iter__(self) -> Iterator[Feed]:
        return self.ds.feeds_for(self.specs, self.limit)

    def __getitem__(self, j: int) -> Feed:
        return self.ds.feed_for(self.ds.indices(self.limit)[j], self.specs)


class _StoredArray:
    """A C-order array stored uncompressed at ``offset`` in ``path``, read one sample at a time."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype):
        self.path, self.offset, self.shape, self.dtype = path, offset, tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def sample(self, i: int) -> np.ndarray:
        """Sample ``i`` as an array with a leading axis of 1 (read-only, like np.load's memory maps)."""
        with open(self.path, "rb") as f:
            f.seek(self.offset + i * self.row_bytes)
            raw = f.read(self.row_bytes)
        if len(raw) != self.row_bytes:
            raise DataError(f"DATA {self.path} ends inside sample {i}; save it again with numpy.savez")
        return np.frombuffer(raw, self.dtype).reshape((1, *self.shape[1:]))


def _check_kind(dtype: np.dtype, where: str) -> None:
    if dtype.kind in "OUSVMm":
        raise DataError(f"{where} holds {dtype} values; DATA arrays must be numbers")


def open_npz(path: Path) -> dict[str, np.ndarray | _StoredArray]:
    """The arrays of one ``.npz`` without reading their data: stored members read in place,
    whole arrays for compressed members up to :data:`MAX_COMPRESSED_BYTES` (see the module doc)."""
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            members = [m for m in zf.infolist() if not m.is_dir()]
            compressed = sum(m.file_size for m in members if m.compress_type != zipfile.ZIP_STORED)
            if compressed > MAX_COMPRESSED_BYTES:
                raise DataError(f"DATA {path} is compressed (numpy.savez_compressed) and holds "
                                f"{compressed / 2**30:.1f} GiB of arrays, which cannot be read sample by sample; "
                                "save it with numpy.savez (uncompressed) instead")
            return {_member_key(m): _member_array(zf, raw, m, path) for m in members}
    except DataError:
        raise
    except Exception as e:  # BadZipFile, a bad .npy header, a truncated member, an encrypted one
        raise DataError(f"cannot read {path} as .npz ({type(e).__name__}); save it with numpy.savez") from e


def _member_key(m: zipfile.ZipInfo) -> str:
    return m.filename[:-4] if m.filename.endswith(".npy") else m.filename  # np.load's keys


def _member_array(zf: zipfile.ZipFile, raw, m: zipfile.ZipInfo, path: Path) -> np.ndarray | _StoredArray:
    """One member: read in place when stored, else read whole (it is small: see open_npz)."""
    with zf.open(m) as f:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = header(f)
        _check_kind(dtype, f"DATA {path} array {_member_key(m)!r}")
        if m.compress_type != zipfile.ZIP_STORED:
            with zf.open(m) as whole:
                return np.lib.format.read_array(whole, allow_pickle=False)
        start = f.tell()  # the .npy header's length
    count = int(np.prod(shape, dtype=np.int64))
    if m.file_size != start + count * dtype.itemsize:
        raise DataError(f"DATA {path} array {_member_key(m)!r} is truncated; save it again with numpy.savez")
    if count == 0:
        return np.empty(shape, dtype)
    raw.seek(m.header_offset)
    sig, *_, name_len, extra_len = struct.unpack("<4s5H3I2H", raw.read(30))
    if sig != b"PK\x03\x04":
        raise zipfile.BadZipFile("bad local file header")
    offset = m.header_offset + 30 + name_len + extra_len + start
    if not fortran or len(shape) == 1:
        return _StoredArray(path, offset, shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def load_data(path: str | os.PathLike | Dataset, specs: Sequence[InputSpec] | None = None) -> Dataset:
    """Open DATA (or take a Dataset, e.g. :class:`Feeds`) and, given the model's input specs, check
    that it fits them."""
    ds = path if isinstance(path, Dataset) else Dataset(path)
    if specs is not None:
        ds.check_against(specs)
    return ds


def load_labels(path: str | os.PathLike | Labels, n: int) -> np.ndarray:
    """Integer class labels from a ``.npy`` (or held in memory, :class:`Labels`), one per sample."""
    if isinstance(path, Labels):
        p, labels = path, np.asarray(path.ids)
    else:
        p = Path(path)
        if not p.is_file():
            raise InputFileError(f"labels not found: {p} (give a .npy of integer class ids)")
        try:  # mapped: dtype and count are checked from the header before any id is read
            labels = np.load(p, allow_pickle=False, mmap_mode="r")
        except Exception as e:
            raise DataError(f"cannot read labels {p} ({type(e).__name__}); save them with numpy.save") from e
    if not isinstance(labels, np.ndarray) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels {p} must be a .npy array of integer class ids (numpy.save)")
    labels = labels.reshape(-1)
    if labels.shape[0] != n:
        raise DataError(f"labels {p} hold {labels.shape[0]} entries but DATA has {n} samples")
    if labels.size and labels.min() < 0:
        raise DataError(f"labels {p} hold negative class id {int(labels.min())}; class ids start at 0")
    return np.array(labels, dtype=np.int64)  # a copy in memory: the file may change or go


def check_label_range(labels: np.ndarray, classes: int, where: str = "labels") -> None:
    """Refuse class ids the model cannot predict (an accuracy of 0.0 would be reported)."""
    if labels.size and labels.max() >= classes:
        raise DataError(f"{where} hold class id {int(labels.max())} but the model predicts {classes} classes "
                        f"(ids 0..{classes - 1}); check that the labels belong to this model")


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write DATA atomically (used by scripts and the demo)."""
    from edgecomp.io import atomic_path

    out = Path(path)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # a file object: savez would append .npz to a path
    return out


@dataclasses.dataclass(frozen=True)
class StepData:
    """The data a command or recipe step may read: DATA to calibrate (and fit repairs, train) on,
    held-out eval DATA and its labels, a text corpus and the tokenizer that reads it. Paths, or
    for the Python API DATA and labels in memory (:class:`Feeds`, :class:`Labels`)."""

    calibration: str | Dataset | None = None
    eval: str | Dataset | None = None
    labels: str | Labels | None = None
    text: str | None = None
    tokenizer: str | None = None
    train_labels: str | None = None  # class ids or target vectors of the calibration samples (finetune)

    def __post_init__(self) -> None:
        if self.labels and not self.eval:
            raise DataNeeded("eval", "labels")  # labels score the eval samples

    def need(self, key: str, what: str, option: str | None = None) -> str:
        """The path for ``key``, or :class:`DataNeeded` saying that ``what`` needs it."""
        path = getattr(self, key)
        if not path:
            raise DataNeeded(key, what, option)
        return path

    def available(self) -> dict[str, bool]:
        return {f.name: bool(getattr(self, f.name)) for f in dataclasses.fields(self)}
