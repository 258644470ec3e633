"""int4 layouts for size (edgecomp.quantize.int4 fit_layout / Int4Layout, int4_at_rest): symmetric grids
store no zero points, each layer has its own block size, the choice follows the measured error, the
per-layer choice measures the form that is written, and the bytes table accounts for every byte."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from edgecomp.data import Dataset
from edgecomp.errors import OptionError
from edgecomp.io import to_proto
from edgecomp.quantize.int4 import (
    Int4Layout,
    at_rest_bytes,
    choose_int4,
    fit_layout,
    gptq_codes,
    output_error,
    rtn_codes,
    written_form,
)
from edgecomp.quantize.int4_at_rest import BYTE_KINDS, apply_int4_at_rest, bytes_by_kind, int4_weights
from edgecomp.quantize.options import QuantizeOptions
from edgecomp.quantize.plan import build
from edgecomp.quantize.quantize_static import LayerPlan
from tests.conftest import make_model, run_ort, vinfo

K, N, S = 256, 96, 6
X_SCALE = 6.0 / 255


def _two_layers(rng, w1, w2):
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    return ir.from_proto(make_model(nodes, [vinfo("x", [1, "S", K])], [vinfo("y", [1, "S", w2.shape[1]])],
                                    {"w1": w1, "w2": w2}))


def _plan():
    return {"fc1": LayerPlan("fc1", "matmul", "x", X_SCALE, 128), "fc2": LayerPlan("fc2", "matmul", "r", X_SCALE, 0)}


def test_symmetric_codes_center_on_8_and_bound_the_error():
    w = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)
    c = rtn_codes(w, 64, symmetric=True)
    assert c.symmetric and (c.zp == 8).all() and c.q.max() <= 15
    # every value within half a step of its block's grid (none clipped: the grid reaches max|w| on the wider side)
    step = np.repeat(c.scale, 64, axis=0)
    assert (np.abs(c.dequantize() - w) <= step / 2 + 1e-6).all()
    assert at_rest_bytes(K, N, 64, True) == K * N // 2 + (K // 64) * N * 2
    assert at_rest_bytes(K, N, 32, False) == K * N // 2 + (K // 32) * N * 3


def test_mixed_layouts_at_rest_fold_to_the_int8_model_and_store_no_zero_points(tmp_path):
    """fc1 symmetric in blocks of 32, fc2 asymmetric in blocks of 128: the at-rest form loads, runs
    the int8 model's computation (equal after the session's folding; within one output step unfolded),
    and stores a zero-point array only for the asymmetric layer."""
    rng = np.random.default_rng(1)
    w1 = (rng.standard_normal((K, K)) / 16).astype(np.float32)
    w2 = (rng.standard_normal((K, N)) / 16).astype(np.float32)
    model = _two_layers(rng, w1, w2)
    codes = {"fc1": rtn_codes(w1, 32, symmetric=True), "fc2": rtn_codes(w2, 128)}
    plan = _plan()
    int8 = to_proto(build(int4_weights(model, codes), plan))
    at_rest = written_form(model, plan, codes, "int8")
    proto = to_proto(at_rest)
    onnx.checker.check_model(proto)
    zps = [t for t in proto.graph.initializer if "zero_point" in t.name and np.prod(t.dims) > 1]
    assert [t.name.split("_")[0] for t in zps] == ["fc2"] and tuple(zps[0].dims) == (K // 128, 1, N)
    x = rng.standard_normal((1, S, K)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(proto, {"x": x}, disable_opt=False)[0],
                                  run_ort(int8, {"x": x}, disable_opt=False)[0])
    # unfolded (the chain run as nodes): within one output step of the int8 computation
    r = np.maximum(x @ codes["fc1"].dequantize(), 0)
    step = X_SCALE * float(np.abs(w2).max()) / 127 * 2
    np.testing.assert_allclose(run_ort(proto, {"x": x})[0], run_ort(int8, {"x": x})[0], atol=step)
    # and the int8 computation is the int4 weights' product to within the activation grid's error
    ref = r @ codes["fc2"].dequantize()
    assert np.abs(run_ort(proto, {"x": x})[0] - ref).max() < 0.05 * np.abs(ref).max()
    # bytes: every initializer counted once; int4 codes are K*N/2 per layer, the symmetric one has no zero points
    rows = {r["kind"]: r["bytes"] for r in bytes_by_kind(at_rest)}
    assert sum(rows.values()) == sum(v.const_value.nbytes for v in at_rest.graph.initializers.values())
    assert rows[BYTE_KINDS[0]] == K * K // 2 + K * N // 2
    assert rows[BYTE_KINDS[2]] == (K // 128) * N + 4  # the symmetric layer: one float32 scalar 8
    assert rows[BYTE_KINDS[1]] == (K // 32) * K * 2 + (K // 128) * N * 2


def test_mixed_block_sizes_in_matmulnbits_match_numpy():
    rng = np.random.default_rng(2)
    w1 = (rng.standard_normal((K, K)) / 16).astype(np.float32)
    w2 = (rng.standard_normal((K, N)) / 16).astype(np.float32)
    model = _two_layers(rng, w1, w2)
    codes = {"fc1": rtn_codes(w1, 32, symmetric=True), "fc2": rtn_codes(w2, 128)}
    proto = to_proto(written_form(model, {}, codes, "nbits"))
    blocks = sorted(a.i for n in proto.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                    if a.name == "block_size")
    assert blocks == [32, 128]
    x = rng.standard_normal((1, S, K)).astype(np.float32)
    ref = np.maximum(x @ codes["fc1"].dequantize(), 0) @ codes["fc2"].dequantize()
    got = run_ort(proto, {"x": x})[0]  # accuracy level 4: activations in int8 per block
    assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()


def test_fit_layout_follows_the_measured_error():
    """A weight whose rows change magnitude every 32 rows (the large block's shared scale wastes levels)
    keeps block 32; an i.i.d. one takes the larger, smaller-at-rest block within the ratio; ratio 1 takes
    the least error whatever its size."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((512, K))
    h = x.T @ x
    iid = rng.standard_normal((K, N)).astype(np.float32)
    steps = (iid * np.repeat(10.0 ** rng.uniform(-2, 0, K // 32), 32)[:, None]).astype(np.float32)
    for w, small in ((steps, True), (iid, False)):
        codes, errs, tried = fit_layout(w, h, h, (32, 64, 128), (False, True), 1.25)
        best = min(t["error"] for t in tried)
        assert errs[codes.method] <= 1.25 * best
        fits = [t for t in tried if t["error"] <= 1.25 * best]
        assert at_rest_bytes(K, N, codes.block, codes.symmetric) == min(t["bytes"] for t in fits)
        assert (codes.block == 32) == small
    codes, errs, tried = fit_layout(iid, h, h, (32, 64, 128), (False, True), 1.0)
    assert errs[codes.method] == min(t["error"] for t in tried)
    assert output_error(iid, gptq_codes(iid, 128, h, True).dequantize(), h) > output_error(
        iid, gptq_codes(iid, 32, h, False).dequantize(), h)  # larger, symmetric blocks do cost error


class _Recorder:
    """An evaluator that records the ops of each candidate it is given (loss 0: every layer holds)."""

    def __init__(self):
        self.ops = []

    def drop(self, model):
        self.ops.append({n.op_type for n in model.graph})
        return None, 0.0


@pytest.mark.parametrize("compute, op", [("int8", "MatMulIntegerToFloat"), ("nbits", "MatMulNBits")])
def test_the_choice_measures_the_written_form(tmp_path, compute, op):
    rng = np.random.default_rng(4)
    model = _two_layers(rng, (rng.standard_normal((K, K)) / 16).astype(np.float32),
                        (rng.standard_normal((K, N)) / 16).astype(np.float32))
    for i in range(4):
        np.savez(tmp_path / f"{i}.npz", x=rng.standard_normal((1, S, K)).astype(np.float32))
    rec = _Recorder()
    choice = choose_int4(model, _plan(), Dataset(tmp_path), "auto", Int4Layout((32, 128), (False, True), 1.25),
                         compute=compute, evaluator=rec, bound=0.01)
    assert set(choice.codes) == {"fc1", "fc2"} and rec.ops
    assert all(op in ops for ops in rec.ops)
    assert all(("MatMulNBits" in ops) == (compute == "nbits") for ops in rec.ops)
    assert {r["int4 block"] for r in choice.rows.values()} <= {32, 128}


@pytest.mark.parametrize("field, value, says", [("int4_block", 48, "int4_block must be a power of two >= 16 or auto"),
                                                ("int4_grid", "sym", "int4_grid"),
                                                ("int4_error_ratio", 0.5, "int4_error_ratio must be >= 1")])
def test_bad_layout_values_are_refused_in_one_line(field, value, says):
    with pytest.raises(OptionError) as e:
        QuantizeOptions(int4="auto", **{field: value}).validate()
    assert says in str(e.value) and "\n" not in str(e.value)


def test_layout_from_options():
    assert Int4Layout.of(QuantizeOptions(int4_block="auto", int4_grid="auto")) == Int4Layout((32, 64, 128),
                                                                                              (False, True), 1.25)
    assert Int4Layout.of(QuantizeOptions(int4_block=64, int4_grid="symmetric")) == Int4Layout((64,), (True,), 1.25)


def test_apply_int4_at_rest_refuses_codes_of_another_weight():
    rng = np.random.default_rng(5)
    w1 = (rng.standard_normal((K, K)) / 16).astype(np.float32)
    w2 = (rng.standard_normal((K, N)) / 16).astype(np.float32)
    model = _two_layers(rng, w1, w2)
    codes = {"fc1": rtn_codes(w1, 32, symmetric=True)}
    int8 = build(int4_weights(model, {"fc1": rtn_codes(w1, 64)}), _plan())
    with pytest.raises(Exception, match="not made from these int4 codes"):
        apply_int4_at_rest(int8, codes, _plan())


def test_quantize_with_layouts_auto_writes_each_layer_in_its_layout(tmp_path):
    """The pipeline with int4_block and int4_grid auto: every int4 layer at rest in the layout fit_layout
    chose for it (the summary counts them), the model loads and keeps the fidelity floor it was held to."""
    from edgecomp.quantize import quantize_model
    from edgecomp.targets import host_isa
    from tests.quantize.test_quantize_int4 import _mlp

    rng = np.random.default_rng(6)
    for i in range(12):
        np.savez(tmp_path / f"{i:02d}.npz", x=rng.standard_normal((16, 64)).astype(np.float32))
    opts = QuantizeOptions(families="all", isa=host_isa(), smooth="off", int4=".", int4_compute="int8",
                           int4_block="auto", int4_grid="auto", min_cosine=0.9)
    proto = _mlp()
    res = quantize_model(ir.from_proto(proto), Dataset(tmp_path), opts)
    out = to_proto(res.model)
    onnx.checker.check_model(out)
    layouts = res.summary["int4 layouts"]
    assert sum(int(part.rsplit("x", 1)[1]) for part in layouts.split(", ")) == 3
    assert "per layer" in res.summary["int4"]
    # every layout's error relative to each layer's least: the least-error layout of a layer reads 1.00x or more
    ratios = {m[0]: float(m[1]) for m in re.findall(r"(block \d+ \w+) ([\d.]+)x", res.summary["int4 layout error"])}
    assert set(ratios) == {"block 32 asymmetric", "block 32 symmetric", "block 64 asymmetric", "block 64 symmetric"}
    assert min(ratios.values()) >= 1.0
    zps = [t for t in out.graph.initializer if t.name.endswith("int4_zero_point") and np.prod(t.dims) > 1]
    asym = sum(int(part.rsplit("x", 1)[1]) for part in layouts.split(", ") if "asymmetric" in part)
    assert len(zps) == asym and not any("MatMulNBits" == n.op_type for n in out.graph.node)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    ref, got = run_ort(proto, {"x": x})[0], run_ort(out, {"x": x}, disable_opt=False)[0]
    assert float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.98


@pytest.mark.parametrize("args, says", [(["--int4-block", "48"], "must be a power of two >= 16 or auto, got 48"),
                                        (["--int4-error-ratio", "0.5"], "must be >= 1")])
def test_the_cli_refuses_a_bad_layout_in_one_line_and_reads_numbers(tmp_path, mlp_path, args, says):
    from click.testing import CliRunner

    from edgecomp.cli import cli

    res = CliRunner().invoke(cli, ["quantize", str(mlp_path), "-o", str(tmp_path / "q.onnx"), "--int4", "auto", *args])
    assert res.exit_code == 2 and says in res.output and "Traceback" not in res.output
    assert len([line for line in res.output.splitlines() if line.startswith("Error")]) == 1
    assert not (tmp_path / "q.onnx").exists()


def test_the_fidelity_floor_is_an_option_of_the_cli(tmp_path, mlp_path, mlp_data):
    """``--min-cosine`` reaches the floor quantize holds (its summary names it); out of range is one line."""
    import json

    from click.testing import CliRunner

    from edgecomp.cli import cli

    bad = CliRunner().invoke(cli, ["quantize", str(mlp_path), "-o", str(tmp_path / "bad.onnx"), "--data",
                                   str(mlp_data[0]), "--min-cosine", "1.5"])
    assert bad.exit_code == 2 and "must be in (0, 1]" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "bad.onnx").exists()
    report = tmp_path / "q.json"
    res = CliRunner().invoke(cli, ["quantize", str(mlp_path), "-o", str(tmp_path / "q.onnx"), "--data",
                                   str(mlp_data[0]), "--families", "all", "--min-cosine", "0.9995", "--json", str(report)])
    assert res.exit_code in (0, 3), res.output
    assert "(floor 0.9995" in json.loads(report.read_text())["summary"]["fidelity"]
