"""KeepLayerNormPass: a residual Add read only by a LayerNormalization becomes Sum, which onnxruntime
does not fuse into SkipLayerNormalization (it does fuse the Add when the shapes are static); the
outputs are unchanged, and an Add with other readers is left alone."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper

from edgecomp.io import to_proto
from edgecomp.passes.base import run_pass
from edgecomp.passes.keep_layernorm import KeepLayerNormPass
from tests.conftest import make_model, run_ort, vinfo

SHAPE = [1, 4, 8]


def _model(extra_reader: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Add", ["a", "b"], ["s"], name="residual"),
             helper.make_node("LayerNormalization", ["s", "g", "be"], ["y"], name="ln", axis=-1)]
    outputs = [vinfo("y", SHAPE)]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["s"], ["r"], name="relu"))
        outputs.append(vinfo("r", SHAPE))
    inits = {"g": rng.standard_normal(8).astype(np.float32), "be": rng.standard_normal(8).astype(np.float32)}
    return make_model(nodes, [vinfo("a", SHAPE), vinfo("b", SHAPE)], outputs, inits)


def _ort_ops(proto: onnx.ModelProto, tmp_path) -> list[str]:
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def test_residual_add_becomes_sum_and_is_not_fused(tmp_path):
    proto = _model(extra_reader=False)
    assert "SkipLayerNormalization" in _ort_ops(proto, tmp_path)  # what the pass prevents
    model = ir.from_proto(proto)
    report = run_pass(KeepLayerNormPass(), model)
    out = to_proto(model)
    onnx.checker.check_model(out)
    assert report.modified and report.summary == {"residual adds written as Sum": 1}
    ops = _ort_ops(out, tmp_path)
    assert "SkipLayerNormalization" not in ops and "LayerNormalization" in ops
    rng = np.random.default_rng(1)
    feed = {k: rng.standard_normal(SHAPE).astype(np.float32) for k in ("a", "b")}
    np.testing.assert_array_equal(run_ort(out, feed)[0], run_ort(proto, feed)[0])


def test_add_with_other_readers_is_left_alone():
    model = ir.from_proto(_model(extra_reader=True))
    report = run_pass(KeepLayerNormPass(), model)
    assert not report.modified and [n.op_type for n in model.graph][0] == "Add"
