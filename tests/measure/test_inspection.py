import numpy as np
import onnx_ir as ir
from onnx import helper

from edgecomp.measure.inspect import summarize
from tests.conftest import make_model, vinfo


def test_macs_and_params_against_hand_count():
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
             "dw": rng.standard_normal((8, 1, 3, 3)).astype(np.float32),
             "fc": rng.standard_normal((8, 5)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c1", "dw"], ["c2"], group=8, pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    m = ir.from_proto(make_model(nodes, [vinfo("x", ["N", 3, 16, 16])], [vinfo("y", ["N", 5])], inits))
    s = summarize(m, {"x": (2, 3, 16, 16)})
    conv1 = 2 * 8 * 16 * 16 * (3 * 3 * 3)
    dw = 2 * 8 * 8 * 8 * (1 * 3 * 3)
    fc = 2 * 5 * 8
    assert s.macs == conv1 + dw + fc
    assert s.int8_macs == 0
    assert s.params == 8 * 27 + 8 * 9 + 40
    assert s.params_by_dtype["float"] == (s.params, 4 * s.params)
    assert s.op_histogram["Conv"] == 2
