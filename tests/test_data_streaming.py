"""DATA at real sizes: memory-mapped .npz members, bounded calibration samples, compressed files."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import edgecomp.data as data_module
from edgecomp.cli import cli
from edgecomp.data import DEFAULT_MAX_SAMPLES, Dataset, InputSpec, load_data
from edgecomp.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def write_npz_streamed(path: Path, name: str, shape: tuple[int, ...], dtype, chunk: np.ndarray,
                       compress: int = zipfile.ZIP_STORED) -> None:
    """An .npz whose one array (C order) is written chunk by chunk, never held whole, with a zip64
    local header (numpy.savez writes the same form)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    total = int(np.prod(shape)) * np.dtype(dtype).itemsize
    with zipfile.ZipFile(path, "w", compression=compress) as zf, zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, header)
        raw = np.ascontiguousarray(chunk, dtype=dtype).tobytes()
        written = 0
        while written < total:
            piece = raw[: total - written]
            f.write(piece)
            written += len(piece)


def test_savez_members_are_memory_mapped_in_their_own_order(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 3, 5)).astype(np.float32)
    b = np.asfortranarray(rng.integers(-9, 9, (40, 7)).astype(np.int64))
    c = rng.standard_normal((40, 2)).astype(np.float16)
    np.savez(tmp_path / "d.npz", a=a, b=b, c=c)
    ds = Dataset(tmp_path / "d.npz")
    assert not any(isinstance(x, np.ndarray) and not isinstance(x, np.memmap) for x in ds._arrays.values())
    for i in (0, 13, 39):
        feed = ds[i]
        for k, ref in (("a", a), ("b", b), ("c", c)):
            assert feed[k].dtype == ref.dtype
            np.testing.assert_array_equal(feed[k], ref[i : i + 1])
    with pytest.raises(IndexError):
        ds[40]


def test_zip64_member_written_in_chunks_reads_back_exactly(tmp_path):
    chunk = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    write_npz_streamed(tmp_path / "d.npz", "x", (6, 4), np.float32, chunk)
    ds = Dataset(tmp_path / "d.npz")
    assert not isinstance(ds._arrays["x"], np.ndarray)  # read in place, sample by sample
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in ds]), chunk)


def test_small_compressed_npz_is_read_and_a_large_one_refused_in_one_line(tmp_path, monkeypatch):
    x = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    np.savez_compressed(tmp_path / "c.npz", x=x)
    ds = Dataset(tmp_path / "c.npz")
    np.testing.assert_array_equal(ds[7]["x"], x[7:8])
    monkeypatch.setattr(data_module, "MAX_COMPRESSED_BYTES", x.nbytes - 1)
    with pytest.raises(DataError, match=r"compressed \(numpy.savez_compressed\).*save it with numpy.savez"):
        Dataset(tmp_path / "c.npz")


@pytest.mark.parametrize("n, limit, want", [(10, None, list(range(10))), (10, 20, list(range(10))),
                                            (10, 5, [0, 2, 4, 6, 8]), (1000, 3, [0, 333, 666]), (7, 7, list(range(7)))])
def test_a_bounded_read_takes_evenly_spaced_samples(tmp_path, n, limit, want):
    np.savez(tmp_path / "d.npz", x=np.arange(n, dtype=np.float32)[:, None])
    ds = Dataset(tmp_path / "d.npz")
    assert list(ds.indices(limit)) == want
    specs = [InputSpec("x", np.dtype(np.float32), ("N", 1))]
    assert [int(f["x"][0, 0]) for f in ds.feeds_for(specs, limit)] == want
    assert ds.describe_used(limit) == f"{len(want)} of {n}"


def test_values_are_checked_when_a_sample_is_read_not_up_front(tmp_path):
    x = np.ones((10, 4), np.float32)
    x[3, 1] = np.nan
    np.savez(tmp_path / "d.npz", x=x)
    specs = [InputSpec("x", np.dtype(np.float32), ("N", 4))]
    ds = load_data(tmp_path / "d.npz", specs)  # opening reads headers only
    assert len(list(ds.feeds_for(specs, 5))) == 5  # samples 0 2 4 6 8: not 3
    with pytest.raises(DataError, match=r"array 'x' sample 3 holds NaN or Inf"):
        list(ds.feeds_for(specs))


def test_truncated_and_object_members_are_one_line(tmp_path):
    np.savez(tmp_path / "o.npz", x=np.array(["a", "b"]))
    with pytest.raises(DataError, match=r"array 'x' holds <U1 values; DATA arrays must be numbers"):
        Dataset(tmp_path / "o.npz")
    np.savez(tmp_path / "t.npz", x=np.ones((100, 4), np.float32))
    raw = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"cannot read .*t.npz as .npz"):
        Dataset(tmp_path / "t.npz")


_MEASURE = """
import sys, numpy as np
from edgecomp.data import Dataset, InputSpec

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

before = rss("VmRSS:")
ds = Dataset(sys.argv[1])
specs = [InputSpec("x", np.dtype(np.float32), ("N", 256))]
ds.check_against(specs)
total = sum(float(f["x"].sum()) for f in ds.feeds_for(specs, int(sys.argv[2])))
print(len(ds), total, rss("VmHWM:") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS read from /proc")
def test_streamed_data_keeps_memory_bounded_on_a_1gb_file(tmp_path):
    n, width = 2**20, 256  # 1 GiB of float32
    path = tmp_path / "big.npz"
    write_npz_streamed(path, "x", (n, width), np.float32, np.ones((4096, width), np.float32))
    assert path.stat().st_size > 2**30
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(DEFAULT_MAX_SAMPLES)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    count, total, grown = out.stdout.split()
    assert int(count) == n
    assert float(total) == DEFAULT_MAX_SAMPLES * width  # exactly the bounded sample, every value read
    assert int(grown) < 64 * 2**20, f"peak RSS grew by {int(grown) / 2**20:.0f} MiB reading 1 GiB of DATA"


def test_quantize_calibrates_on_the_bounded_sample_and_says_so(tmp_path, mlp_path):
    x = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32)
    x[1, 0] = np.nan  # not among the 300 evenly spaced samples: never read by default
    np.savez(tmp_path / "d.npz", x=x)
    res = CliRunner().invoke(cli, ["quantize", str(mlp_path), "-o", str(tmp_path / "q.onnx"), "--calibration",
                                   str(tmp_path / "d.npz"), "--families", "matmul"])
    assert res.exit_code == 0, res.output
    assert "calibration samples: 300 of 1000" in res.output
    res = CliRunner().invoke(cli, ["quantize", str(mlp_path), "-o", str(tmp_path / "q2.onnx"), "--calibration",
                                   str(tmp_path / "d.npz"), "--max-samples", "1000"])
    assert res.exit_code == 1 and "sample 1 holds NaN or Inf" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "q2.onnx").exists()
