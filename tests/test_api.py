"""The Python API (edgecomp.quantize(...) etc.): models as paths, protos or onnx-ir models, data
as numpy feeds, options checked by the CLI's own declarations, and results from the capability."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import edgecomp
from edgecomp.data import Feeds
from edgecomp.errors import ConfigError, DataError, OptionError
from tests.conftest import run_ort


@pytest.fixture(scope="module")
def feeds(mlp_data):
    return {"x": np.load(mlp_data[0])["x"]}


def _model_bytes(result) -> bytes:
    return ir.to_proto(result.model).SerializeToString()


def test_import_edgecomp_loads_no_model_library():
    code = "import sys, edgecomp\nprint([m for m in ('numpy', 'onnx', 'onnx_ir', 'onnxruntime', 'torch') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_quantize_takes_a_path_a_proto_or_an_ir_model_and_any_form_of_data(tmp_path, mlp_path, mlp_data, feeds):
    from_path = edgecomp.quantize(mlp_path, mlp_data[0], families="all")
    proto = onnx.load(str(mlp_path))
    from_feeds = edgecomp.quantize(proto, feeds, families="all")
    samples = [{"x": feeds["x"][i:i + 1]} for i in range(len(feeds["x"]))]
    model = ir.load(str(mlp_path))
    before = ir.to_proto(model).SerializeToString()
    from_list = edgecomp.quantize(model, iter(samples), families="all", output=tmp_path / "q.onnx")
    assert ir.to_proto(model).SerializeToString() == before  # the caller's ir.Model is left as it was
    # one calibration set, three spellings: the same int8 model
    assert _model_bytes(from_path) == _model_bytes(from_feeds) == _model_bytes(from_list)
    assert from_path.summary["layers int8"] == 2 and from_path.summary["calibration samples"] == "32 of 32"
    x = feeds["x"][:8]
    want = run_ort(proto, {"x": x})[0]
    got = run_ort(str(tmp_path / "q.onnx"), {"x": x})[0]
    assert not np.array_equal(got, want)  # int8, not the float model
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())


def test_options_are_the_declarations_of_the_cli(mlp_path, feeds):
    with pytest.raises(ConfigError, match=r"^quantize has no option 'sparsity'; its options are method, percentile"):
        edgecomp.quantize(mlp_path, feeds, sparsity=0.5)
    with pytest.raises(OptionError, match=r"^sparsity must be in \(0, 1\), got 1.5$"):
        edgecomp.prune(mlp_path, feeds, sparsity=1.5)
    with pytest.raises(OptionError, match=r"^method must be one of minmax, percentile, entropy, mse, got 'best'$"):
        edgecomp.quantize(mlp_path, feeds, method="best")
    with pytest.raises(OptionError, match=r"^max_samples expected int, got '8'$"):
        edgecomp.quantize(mlp_path, feeds, max_samples="8")
    res = edgecomp.quantize(mlp_path, feeds, families="all", max_samples=8)
    assert res.summary["calibration samples"] == "8 of 32"


def test_prune_validate_and_bench_take_feeds(mlp_path, mlp_data, feeds):
    pruned = edgecomp.prune(mlp_path, feeds, sparsity=0.25, allow_degraded=True)
    assert pruned.summary["channels removed"] == 4
    labels = np.load(mlp_data[1])
    v = edgecomp.validate(mlp_path, pruned.model, feeds, labels=labels)
    ref = run_ort(onnx.load(str(mlp_path)), {"x": feeds["x"]})[0]
    assert v.ref_accuracy == pytest.approx(float((ref.argmax(1) == labels).mean()))
    assert 0.5 < v.outputs[0].cosine_mean < 1.0
    b = edgecomp.bench(mlp_path, pruned.model, data=feeds, runs=3, warmup=1)
    assert len(b.models) == 2


def test_subpackage_names_stay_modules_and_api_functions():
    import edgecomp.quantize.options

    assert callable(edgecomp.quantize) and callable(edgecomp.prune) and callable(edgecomp.distill)
    assert edgecomp.quantize.options.OPTIONS[0].name == "method"
    assert edgecomp.quantize.run is not None  # the package's own names are still there


def test_feeds_are_checked_like_data_on_disk():
    with pytest.raises(DataError, match=r"different sample counts"):
        Feeds({"x": np.zeros((3, 8), np.float32), "m": np.zeros((2, 8), np.float32)})
    with pytest.raises(DataError, match=r"^feed 1 is a list, not a dict of arrays"):
        Feeds([{"x": np.zeros((1, 8), np.float32)}, [1, 2]])
    bad = Feeds({"x": np.full((2, 8), np.nan, np.float32)})
    with pytest.raises(DataError, match=r"holds NaN or Inf"):
        bad[1]
    with pytest.raises(DataError, match=r"^feed 1 is keyed \['y'\] but feed 0 is keyed \['x'\]"):
        Feeds([{"x": np.zeros((1, 8), np.float32)}, {"y": np.zeros((1, 8), np.float32)}])[1]
