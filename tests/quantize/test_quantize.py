"""Static quantization on tiny models: numerics against numpy, methods on variable shapes,
accuracy-aware fallback, and bad inputs."""

import json
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import helper

from edgecomp.cli import cli
from edgecomp.data import Dataset
from edgecomp.errors import ConfigError, DataError, PassFailed
from edgecomp.io import to_proto
from edgecomp.passes.base import run_pass
from edgecomp.quantize import quantize_model
from edgecomp.quantize.layers import find_layers
from edgecomp.quantize.options import QuantizeOptions
from edgecomp.quantize.qparams import quantize_weight
from edgecomp.quantize.quantize_static import LayerPlan, QuantizeStaticPass
from edgecomp.targets import Isa, host_isa
from tests.conftest import RoundRobinClock, make_model, run_ort, vinfo

VNNI = Isa("x86_64", avx2=True, avx512=True, vnni=True)
AVX2 = Isa("x86_64", avx2=True)


def _fake_quant(x, scale, zp):
    return (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale


def _mlp_with_uneven_columns():
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((8, 16)) * np.geomspace(0.01, 3, 16)).astype(np.float32)  # column scales differ 300x
    inits = {"w1": w1, "b1": rng.standard_normal(16).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"), helper.make_node("Add", ["h0", "b1"], ["y"], name="fc1_bias")]
    return make_model(nodes, [vinfo("x", ["N", 8])], [vinfo("y", ["N", 16])], inits), inits


@pytest.mark.parametrize("per_channel", [True, False])
def test_matmul_numerics_against_numpy(per_channel):
    proto, inits = _mlp_with_uneven_columns()
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    scale, zp = np.float32(6.0 / 255), 128
    bits = 7 if host_isa().u8s8_saturates else 8  # 8-bit u8xs8 products saturate int16 on AVX2 without VNNI
    plan = {"fc1": LayerPlan("fc1", "matmul", "x", float(scale), zp, weight_bits=bits, per_channel=per_channel)}
    result = run_pass(QuantizeStaticPass(plan=plan), ir.from_proto(proto))
    out = to_proto(result.model)
    onnx.checker.check_model(out)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 1 and "DynamicQuantizeLinear" not in ops and "MatMul" not in ops
    got = run_ort(out, {"x": x})[0]
    wq, ws = quantize_weight(inits["w1"], bits, axis=1, per_channel=per_channel)
    want = _fake_quant(x, scale, zp) @ (wq.astype(np.float32) * ws) + inits["b1"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert out.graph.output[0].name == "y"  # interface unchanged


def test_per_channel_beats_per_tensor_on_uneven_columns():
    proto, inits = _mlp_with_uneven_columns()
    x = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    ref = run_ort(proto, {"x": x})[0]
    errs = {}
    bits = 7 if host_isa().u8s8_saturates else 8
    for pc in (True, False):
        plan = {"fc1": LayerPlan("fc1", "matmul", "x", 6.0 / 255, 128, weight_bits=bits, per_channel=pc)}
        got = run_ort(to_proto(run_pass(QuantizeStaticPass(plan=plan), ir.from_proto(proto)).model), {"x": x})[0]
        errs[pc] = np.abs(got - ref)[:, :4].max()  # the small-magnitude columns
    assert errs[True] < errs[False] / 10


def test_seven_bit_weights_stay_within_63():
    w = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    q, s = quantize_weight(w, 7, axis=1)
    assert np.abs(q).max() == 63
    np.testing.assert_allclose(q * s, w, atol=s.max() / 2 + 1e-7)


@pytest.fixture(scope="module")
def encoder_data(tmp_path_factory):
    """Variable-length token DATA folders: calibration (16) and evaluation (12)."""
    root = tmp_path_factory.mktemp("encdata")
    rng = np.random.default_rng(0)
    for split, n in (("calib", 16), ("eval", 12)):
        d = root / split
        d.mkdir()
        for i in range(n):
            length = int(rng.integers(4, 20))
            np.savez(d / f"{i:03d}.npz", input_ids=rng.integers(1, 1000, (1, length)),
                     attention_mask=np.ones((1, length), np.int64))
    return root / "calib", root / "eval"


def _quantize(path, calib, **kw):
    extra = {k: kw.pop(k) for k in ("eval_data", "labels") if k in kw}
    opts = QuantizeOptions(**{"families": "all", "isa": host_isa(), **kw})  # onnxruntime runs the result here
    return quantize_model(ir.load(str(path)), Dataset(calib), opts, **extra)


def _cosine_vs_float(path, model, eval_dir):
    ds = Dataset(eval_dir)
    q = to_proto(model)
    cos = []
    for feed in ds:
        a, b = run_ort(path, feed)[0], run_ort(q, feed)[0]
        cos.append(float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)))
    return float(np.mean(cos))


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_each_method_on_variable_length_samples(method, tiny_encoder_path, encoder_data):
    calib, ev = encoder_data
    res = _quantize(tiny_encoder_path, calib, method=method, families="matmul")  # attention: test_quantize_attention
    proto = to_proto(res.model)
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 12 and "DynamicQuantizeLinear" not in ops
    assert ops.count("QuantizeLinear") == 8  # Q/K/V share one per layer: 4 per layer
    assert _cosine_vs_float(tiny_encoder_path, res.model, ev) > 0.99
    skipped = [r for r in res.rows if r["decision"] == "float"]
    assert skipped and all(r["family"] == "attention" for r in skipped)  # attention products stay float


def test_target_isa_decides_weight_bits(tiny_encoder_path, encoder_data):
    calib, _ = encoder_data
    avx2 = _quantize(tiny_encoder_path, calib, isa=AVX2)
    assert set(avx2.summary["bits a/w"].split(", ")) <= {"8/7", "7/8"}  # never 8/8: could saturate int16
    assert all(p.act_bits + p.weight_bits == 15 for p in avx2.plan.values())
    assert all(p.act_zp <= 127 for p in avx2.plan.values() if p.act_bits == 7)
    res = _quantize(tiny_encoder_path, calib, isa=VNNI)
    assert res.summary["bits a/w"] == "8/8" and "int32" in res.summary["bits reason"]


def test_smoothing_is_chosen_by_simulated_error(tiny_encoder_path, encoder_data):
    calib, _ = encoder_data
    rows = _quantize(tiny_encoder_path, calib, smooth="auto").rows
    quant = [r for r in rows if r["decision"] == "int8" and r["family"] == "matmul"]  # weights: smoothing applies
    assert quant and all(r["sim error"] is not None for r in quant)
    fixed = {r["layer"]: r for r in _quantize(tiny_encoder_path, calib, smooth="0.5").rows}
    for r in quant:  # auto searches a grid that holds 0.5 and "none": never worse than either
        assert r["sim error"] <= fixed[r["layer"]]["sim error"] + 1e-12
    off = _quantize(tiny_encoder_path, calib, smooth="off").rows
    assert all(r.get("smoothquant α") is None for r in off)


def test_tolerance_keeps_sensitive_layers_float(tiny_encoder_path, encoder_data):
    calib, ev = encoder_data
    full = _quantize(tiny_encoder_path, calib, embeddings=False)
    full_loss = 1 - _cosine_vs_float(tiny_encoder_path, full.model, ev)
    tol = full_loss / 4
    res = _quantize(tiny_encoder_path, calib, embeddings=False, eval_data=Dataset(ev), metric="cosine", tolerance=tol)
    assert res.met_tolerance
    kept = [r for r in res.rows if r["reason"].startswith("among the most sensitive")]
    assert kept and len(res.plan) < len(full.plan)
    assert 1 - _cosine_vs_float(tiny_encoder_path, res.model, ev) <= tol + 1e-9
    sens = [r["sensitivity"] for r in res.rows if "sensitivity" in r]
    assert len(sens) == len(full.plan)
    assert min(r["sensitivity"] for r in kept) >= max(
        r["sensitivity"] for r in res.rows if r.get("decision") == "int8")


def test_cli_writes_best_model_and_exits_3_when_tolerance_unmet(tmp_path, tiny_encoder_path, encoder_data):
    calib, ev = encoder_data
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(cli, ["quantize", str(tiny_encoder_path), "-o", str(out), "--calibration", str(calib),
                                   "--eval", str(ev), "--metric", "mae", "--tolerance", "0", "--families", "all",
                                   "--embeddings",  # int8 tables asked for: auto would meet 0 with float tables
                                   "--json", str(tmp_path / "q.json")])
    assert res.exit_code == 3, res.output
    assert out.exists() and "layers:" in res.output
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["summary"]["met tolerance"] is False and len(report["tables"]["layers"]) >= 12


def test_cnn_conv_layers_quantize_with_accuracy(digits_onnx):
    model, data, labels = digits_onnx
    x = np.load(data)["x"]
    y = np.load(labels)
    calib = data.parent / "calib.npz"
    np.savez(calib, x=x[:100])
    res = _quantize(model, calib)
    proto = to_proto(res.model)
    onnx.checker.check_model(proto)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in proto.graph.node}
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    q_of = [producers.get(n.input[0]) for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert "Add" in q_of  # residual adds quantized (QLinearAdd)
    assert "Clip" not in q_of and "Clip" not in producers.values()  # ReLU6 folded into the uint8 range
    ref = run_ort(model, {"x": x[100:]})[0].argmax(1)
    got = run_ort(proto, {"x": x[100:]}, disable_opt=False)[0].argmax(1)
    assert np.mean(got == y[100:]) >= np.mean(ref == y[100:]) - 0.02


def test_bad_inputs(tmp_path, mlp_path, tiny_encoder_path, encoder_data):
    calib, _ = encoder_data
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .npz"):
        Dataset(empty)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, tokens=np.ones((2, 5), np.int64))
    with pytest.raises(DataError, match="missing"):
        _quantize(tiny_encoder_path, wrong)
    quantized = _quantize(tiny_encoder_path, calib).model
    with pytest.raises(PassFailed, match="already quantized"):
        quantize_model(quantized, Dataset(calib), QuantizeOptions())
    relu_only = make_model([helper.make_node("Relu", ["x"], ["y"])], [vinfo("x", [1, 4])], [vinfo("y", [1, 4])])
    d = tmp_path / "x.npz"
    np.savez(d, x=np.ones((2, 4), np.float32))
    with pytest.raises(PassFailed, match="no quantizable layer"):
        quantize_model(ir.from_proto(relu_only), Dataset(d), QuantizeOptions())
    with pytest.raises(ConfigError, match=r"^smooth must be auto, off, or an alpha in \(0, 1\), got '2.0'$"):
        QuantizeOptions(smooth="2.0").validate()
    with pytest.raises(ConfigError, match="^smooth must be"):
        QuantizeOptions(smooth="strong").validate()
    runner = CliRunner()
    res = runner.invoke(cli, ["quantize", str(mlp_path), "-o", str(mlp_path), "--calibration", str(d)])
    assert res.exit_code != 0 and "is also an argument" in res.output


def test_unsupported_layers_are_reported():
    w3 = np.ones((2, 1, 3, 3, 3), np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv3d"),
             helper.make_node("MatMul", ["a", "b"], ["z"], name="actmm")]
    m = make_model(nodes, [vinfo("x", [1, 1, 4, 4, 4]), vinfo("a", [2, 3]), vinfo("b", [3, 2])],
                   [vinfo("y", None), vinfo("z", None)], {"w": w3})
    layers, skipped = find_layers(ir.from_proto(m))
    reasons = {r["layer"]: r["reason"] for r in skipped}
    assert reasons["conv3d"].startswith("3-D convolution")
    assert [(l.node, l.family, l.act, l.act_b) for l in layers] == [("actmm", "attention", "a", "b")]


def test_equal_timings_keep_every_family_float_and_a_real_gain_is_taken(tiny_encoder_path, encoder_data, monkeypatch):
    """The family choice under a clock that shows no difference (a busy machine's worst case)
    keeps float; a clock on which int8 is clearly faster picks int8."""
    import edgecomp.measure.bench as bench

    calib, _ = encoder_data
    real = bench.compare_latency

    def clocked(durations):
        def compare(models, feed, **kw):
            kw["timer"] = RoundRobinClock([durations[0]] + [durations[1]] * (len(models) - 1))
            return real(models, feed, **kw)
        return compare

    monkeypatch.setattr(bench, "compare_latency", clocked([1.0, 1.0]))
    res = _quantize(tiny_encoder_path, calib, families="auto", embeddings=False)
    assert "MatMulIntegerToFloat" not in {n.op_type for n in to_proto(res.model).graph.node}
    assert all(r["decision"] != "chosen" for r in res.families) and res.families[0]["rounds"] == 10
    monkeypatch.setattr(bench, "compare_latency", clocked([1.0, 0.6]))
    res = _quantize(tiny_encoder_path, calib, families="auto", embeddings=False)
    assert "MatMulIntegerToFloat" in {n.op_type for n in to_proto(res.model).graph.node}
    assert any(r["decision"] == "chosen" and "[" in r["95% interval"] for r in res.families)


def test_forced_families_report_the_measured_speed_and_warn_when_slower(mlp_path, mlp_data, monkeypatch,
                                                                        real_speed_check):
    """With --families all the written model is timed against float; not faster beyond noise is a
    warning and ``forced_not_faster`` (exit 5: tests/quantize/test_never_slower.py)."""
    import edgecomp.measure.bench as bench

    calib, _ = mlp_data
    res = _quantize(mlp_path, calib)
    assert re.fullmatch(r"\d+\.\d{3} \[\d+\.\d{3}, \d+\.\d{3}\] over \d+ rounds", res.summary["latency vs float (this host)"])
    slower = bench.RatioEstimate("int8", 1.3, 1.2, 1.4, 6)
    monkeypatch.setattr(bench, "compare_latency", lambda *a, **k: [slower])
    res = _quantize(mlp_path, calib)
    assert res.warnings == ["the written int8 model runs 1.30x the float model's latency on this host (1.300 [1.200, "
                            "1.400] over 6 rounds, 95% interval not below 1): families all were forced, so the int8 "
                            "model is written; exit status 5 (families auto falls back to float where int8 does not "
                            "pay)"]
    assert res.forced_not_faster and "MatMulIntegerToFloat" in {n.op_type for n in to_proto(res.model).graph.node}
    assert _quantize(mlp_path, calib, isa=Isa("aarch64", arm_dot=True)).warnings == []  # another target's latency


def test_tolerance_evaluator_names_its_option_and_data_neutrally():
    from edgecomp.errors import DataError, OptionError
    from edgecomp.measure.evaluate import Evaluator
    from edgecomp.measure.metrics import METRICS

    with pytest.raises(OptionError, match="^metric must be one of .*, got 'bogus'"):
        Evaluator(None, [{}], "bogus", None, 1)
    with pytest.raises(DataError, match="^the eval data holds no samples"):
        Evaluator(None, [], METRICS[0], None, 1)


def test_auto_families_that_keep_everything_float_say_so(mlp_path, mlp_data, monkeypatch):
    """A quantize whose timing keeps every family float writes float weights and warns: never a silent copy."""
    import edgecomp.measure.bench as bench

    calib, _ = mlp_data
    monkeypatch.setattr(bench, "compare_latency", lambda variants, *a, **k: [
        bench.RatioEstimate(str(i), 1.0, 0.95, 1.05, 10) for i in range(1, len(variants))])
    res = _quantize(mlp_path, calib, families="auto")
    assert res.plan == {} and res.summary["layers int8"] == 0
    assert res.warnings == ["no layer was made int8 (no combination is >= 3% faster beyond noise: all float); the "
                            "weights written are float (families all forces int8)"]
    assert not any("no layer was made int8" in w for w in _quantize(mlp_path, calib).warnings)
