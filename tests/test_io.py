import os

import numpy as np
import onnx
import pytest

from edgecomp.errors import InputFileError, ModelLoadError, OutputError
from edgecomp.io import atomic_path, load_model, model_size_bytes, save_model


def test_roundtrip_preserves_weights(mlp_path, tmp_path):
    m = load_model(mlp_path)
    out = save_model(m, tmp_path / "copy.onnx", inputs=[mlp_path])
    a, b = onnx.load(str(mlp_path)), onnx.load(str(out))
    wa = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    wb = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])
    assert model_size_bytes(out) == os.path.getsize(out)


def test_garbage_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\xffnot a protobuf at all" * 10)
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        load_model(bad)
    with pytest.raises(InputFileError, match="not found"):
        load_model(tmp_path / "missing.onnx")


def test_output_that_names_an_input_is_refused_and_input_untouched(mlp_path):
    before = mlp_path.read_bytes()
    with pytest.raises(OutputError, match="is also an argument"):
        save_model(load_model(mlp_path), mlp_path, inputs=[mlp_path])
    assert mlp_path.read_bytes() == before


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_output_folder(mlp_path, tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        save_model(load_model(mlp_path), tmp_path / "no" / "such" / "dir.onnx")
