"""int4 MatMul weights (onnxruntime's MatMulNBits) against a numpy reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from edgecomp.errors import ConfigError
from edgecomp.io import to_proto
from edgecomp.passes.base import run_pass
from edgecomp.quantize.quantize_matmul_nbits import (
    QuantizeMatMulNBitsPass,
    dequantize_blocks_4bit,
    quantize_blocks_4bit,
)
from tests.conftest import make_model, run_ort, vinfo


def _mlp(k=80, n=24, seed=0):
    rng = np.random.default_rng(seed)
    inits = {"w1": rng.standard_normal((k, n)).astype(np.float32), "b1": rng.standard_normal(n).astype(np.float32),
             "w2": rng.standard_normal((n, 8)).astype(np.float32)}  # K = 24 < one block: stays float
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"), helper.make_node("Add", ["h0", "b1"], ["h"]),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [vinfo("x", ["N", k])], [vinfo("y", ["N", 8])], inits, opset=17), inits


def test_block_codes_round_trip_within_half_a_step():
    w = np.random.default_rng(1).standard_normal((70, 5)).astype(np.float32)  # K not a multiple of the block
    packed, scales, zps = quantize_blocks_4bit(w, 32)
    assert packed.shape == (5, 3, 16) and packed.dtype == np.uint8 and scales.shape == (15,) and zps.shape == (10,)
    back = dequantize_blocks_4bit(packed, scales, zps, 70)
    step = np.repeat(scales.reshape(5, 3), 32, axis=1)[:, :70].T
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6)
    zeros = np.zeros((32, 2), np.float32)
    np.testing.assert_array_equal(dequantize_blocks_4bit(*quantize_blocks_4bit(zeros, 32), 32), zeros)


@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_matmul_nbits_matches_the_numpy_reference(accuracy_level):
    proto, inits = _mlp()
    x = np.random.default_rng(2).standard_normal((3, 80)).astype(np.float32)
    res = run_pass(QuantizeMatMulNBitsPass(block_size=32, accuracy_level=accuracy_level), ir.from_proto(proto))
    out = to_proto(res.model)
    onnx.checker.check_model(out)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("MatMul") == 1  # fc2 (K = 24) stays float
    assert {r["layer"]: r["decision"] for r in res.rows} == {"fc1": "int4", "fc2": "float"}
    w_hat = dequantize_blocks_4bit(*quantize_blocks_4bit(inits["w1"], 32), 80)
    want = (x @ w_hat + inits["b1"]) @ inits["w2"]
    got = run_ort(out, {"x": x})[0]
    # level 0 dequantizes to float; level 4 also quantizes activations per block to int8 at run time
    tol = 1e-4 if accuracy_level == 0 else 0.02 * np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=tol)
    assert out.graph.output[0].name == "y"


def test_int4_weights_are_smaller_and_bad_options_refused():
    proto, _ = _mlp(k=256, n=64)
    res = run_pass(QuantizeMatMulNBitsPass(block_size=64), ir.from_proto(proto))
    before, after = (int(v) for v in res.summary["weight bytes"].split(" -> "))
    assert after < before / 6
    with pytest.raises(ConfigError, match="power of two"):
        QuantizeMatMulNBitsPass(block_size=24)
    untouched = run_pass(QuantizeMatMulNBitsPass(exclude=["fc"]), ir.from_proto(_mlp()[0]))
    assert not untouched.modified and all(r["decision"] == "float" for r in untouched.rows)
