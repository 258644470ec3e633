"""The QDQ form of static int8 (``format="qdq"``): only ai.onnx ops, the same numbers as the
contrib form (both forms share every scale), close to fp32, and numpy's fake-quant reference for
one layer; the CLI writes it with ``--format qdq`` and the contrib form stays the default."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import helper

from edgecomp.cli import cli
from edgecomp.data import Dataset
from edgecomp.errors import OptionError, PassFailed
from edgecomp.io import to_proto
from edgecomp.passes.base import run_pass
from edgecomp.quantize import quantize_model
from edgecomp.quantize.options import QuantizeOptions
from edgecomp.quantize.qparams import quantize_weight, uint8_qparams
from edgecomp.graph import MS_DOMAIN
from edgecomp.quantize.quantize_static import LayerPlan, QuantizeStaticPass
from edgecomp.targets import host_isa
from tests.conftest import make_model, run_ort, vinfo, write_token_files

# Measured on the three models below (x86 AVX-512 VNNI host, 2026-12-02): both forms share every
# input scale and integer weight; with node units (node_units=True) the QDQ form also rounds each
# MatMul/Gemm output to its own calibrated grid (one step is the range / 255, ~0.4% of it per
# layer), so QDQ and contrib outputs differ by at most 2.2% of the largest output (convs: 0, they
# had output grids in both forms), and QDQ keeps cosine >= 0.9998 to fp32; the default QDQ form
# (no output grids) computes what the contrib form does. A wrong scale, zero point, axis or bias
# moves outputs by far more than these bounds.
PARITY = 0.05  # max |qdq - contrib| / max |contrib|
MIN_COSINE = 0.997  # per output, QDQ vs fp32


def _cnn():
    """x[N,3,8,8] -> Conv 3x3 (8) -> Relu -> Conv 3x3 (4) -> y."""
    rng = np.random.default_rng(0)
    inits = {"w1": (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32),
             "b1": rng.standard_normal(8).astype(np.float32) * 0.1,
             "w2": (rng.standard_normal((4, 8, 3, 3)) * 0.2).astype(np.float32),
             "b2": rng.standard_normal(4).astype(np.float32) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    return make_model(nodes, [vinfo("x", ["N", 3, 8, 8])], [vinfo("y", ["N", 4, 8, 8])], inits)


@pytest.fixture(scope="module")
def cases(tmp_path_factory, mlp_path, mlp_data, tiny_encoder_path):
    """name -> (float model path, calibration DATA, evaluation feeds)."""
    root = tmp_path_factory.mktemp("qdq")
    rng = np.random.default_rng(3)
    cnn = root / "cnn.onnx"
    onnx.save(_cnn(), str(cnn))
    np.savez(root / "cnn.npz", x=rng.standard_normal((32, 3, 8, 8)).astype(np.float32))
    tokens = write_token_files(root / "tokens", 12, rng)
    calib = {"mlp": (mlp_path, mlp_data[0]), "encoder": (tiny_encoder_path, tokens), "cnn": (cnn, root / "cnn.npz")}
    return {k: (path, data, list(Dataset(data))[:8]) for k, (path, data) in calib.items()}


def _quantize(path, data, **kw) -> onnx.ModelProto:
    opts = QuantizeOptions(**{"families": "all", "isa": host_isa(), **kw})
    return to_proto(quantize_model(ir.load(str(path)), Dataset(data), opts).model)


def _cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("name", ["mlp", "encoder", "cnn"])
def test_qdq_form_is_ai_onnx_only_and_matches_contrib_and_float(cases, name):
    path, data, feeds = cases[name]
    qdq, contrib = _quantize(path, data, format="qdq"), _quantize(path, data)
    onnx.checker.check_model(qdq)
    ops = {(n.domain, n.op_type) for n in qdq.graph.node}
    assert {d for d, _ in ops} <= {"", "ai.onnx"} and {o.domain for o in qdq.opset_import} <= {"", "ai.onnx"}
    assert {o for _, o in ops} >= {"QuantizeLinear", "DequantizeLinear"}
    if name == "cnn":  # convolutions have always been written in QDQ form
        assert [n.op_type for n in qdq.graph.node] == [n.op_type for n in contrib.graph.node]
    else:
        assert MS_DOMAIN not in {n.domain for n in qdq.graph.node} and {"MatMul"} <= {o for _, o in ops}
    for feed in feeds:
        ref = run_ort(str(path), feed)
        got_q, got_c = run_ort(qdq, feed, disable_opt=False), run_ort(contrib, feed, disable_opt=False)
        assert len(got_q) == len(ref)
        for q, c, f in zip(got_q, got_c, ref):
            if not np.issubdtype(f.dtype, np.floating):
                continue
            assert np.abs(q - c).max() <= PARITY * np.abs(c).max()
            assert _cosine(q, f) >= MIN_COSINE


def _single_layer(op: str):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 16)) * np.geomspace(0.01, 3, 16)).astype(np.float32)  # [K, N]
    b = rng.standard_normal(16).astype(np.float32)
    if op == "gemm":
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)]
        inits = {"w": w.T.copy(), "b": b}
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), helper.make_node("Add", ["h", "b"], ["y"])]
        inits = {"w": w, "b": b}
    return make_model(nodes, [vinfo("x", ["N", 8])], [vinfo("y", ["N", 16])], inits), w, b


def _units(model: onnx.ModelProto) -> list[str]:
    """Why each quantized op (a MatMul/Gemm/Conv reading a DequantizeLinear, an Add whose inputs
    all are) is not a whole DQ → op → Q unit; [] when all are."""
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    bad = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm", "Conv", "Add"):
            continue
        ins = [producer.get(i) for i in n.input if i]
        dq = [p is not None and p.op_type == "DequantizeLinear" for p in ins]
        if not any(dq) or (n.op_type == "Add" and not all(dq)):
            continue  # a float op (a transformer's residual Add of a layer's output to the float stream)
        if not all(dq):
            bad.append(f"{n.name}: an input is not a DequantizeLinear")
        y = n.output[0]
        after = readers.get(y, [])
        if len(after) == 1 and after[0].op_type in ("Relu", "Clip"):  # fused into the conv's unit
            y, after = after[0].output[0], readers.get(after[0].output[0], [])
        if not after or y in outputs or any(r.op_type != "QuantizeLinear" for r in after):
            bad.append(f"{n.name}: its output is not read by QuantizeLinear alone")
    return bad


@pytest.mark.parametrize("name", ["mlp", "encoder", "cnn"])
def test_qdq_layers_are_whole_node_units(cases, name):
    """Every quantized op reads DequantizeLinear inputs only and writes to a QuantizeLinear only
    (XNNPACK/NNAPI/QNN then take the whole unit in int8); no com.microsoft op."""
    path, data, _ = cases[name]
    qdq = _quantize(path, data, format="qdq", node_units=True)
    assert {n.domain for n in qdq.graph.node} <= {"", "ai.onnx"}
    assert _units(qdq) == []
    assert sum(n.op_type in ("MatMul", "Gemm", "Conv") for n in qdq.graph.node) >= 2


@pytest.mark.parametrize("op", ["matmul", "gemm"])
def test_one_qdq_layer_with_output_grids_against_numpy(op):
    """The whole unit chain against numpy's fake quantization: x → Q/DQ → MatMul → Q/DQ (h) → Add
    (bias as uint8) → Q/DQ (y); Gemm: the bias inside (int32, as a conv's), one output grid."""

    proto, w, b = _single_layer(op)
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    scale, zp = 6.0 / 255, 128
    plan = {"fc": LayerPlan("fc", op, "x", scale, zp, out_scale=30.0 / 255, out_zp=120,
                            mid_scale=None if op == "gemm" else 28.0 / 255, mid_zp=None if op == "gemm" else 125)}
    out = to_proto(run_pass(QuantizeStaticPass(plan=plan, format="qdq"), ir.from_proto(proto)).model)
    onnx.checker.check_model(out)
    assert _units(out) == [] and out.graph.output[0].name == "y"

    def fq(v, s, z):
        s = np.float32(s)
        return ((np.clip(np.round(v / s) + z, 0, 255) - z) * s).astype(np.float32)

    wq, ws = quantize_weight(w, 8, axis=1)
    h = fq(x, scale, zp) @ (wq.astype(np.float32) * ws)
    if op == "matmul":
        bs, bz = uint8_qparams(b.min(), b.max())
        h = fq(h, 28.0 / 255, 125) + fq(b, bs, int(bz))
    else:  # the Gemm unit's bias: int32 on the grid a_scale * w_scale
        bscale = (np.float64(scale) * ws).astype(np.float32)
        h = h + (np.round(b.astype(np.float64) / bscale) * bscale).astype(np.float32)
    want = fq(h, 30.0 / 255, 120)
    got = run_ort(out, {"x": x})[0]  # optimizations off: every Q/DQ runs as written
    # float32 sums in another order can put a value on the other side of a rounding tie: one step
    step = np.float32(30.0 / 255)
    assert np.abs(got - want).max() <= step * 1.001
    assert np.mean(np.abs(got - want) > 1e-6) <= 0.05


@pytest.mark.parametrize("op", ["matmul", "gemm"])
def test_one_qdq_layer_against_numpy_fake_quant(op):
    proto, w, b = _single_layer(op)
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    scale, zp, smooth = 6.0 / 255, 128, np.linspace(0.5, 2.0, 8).astype(np.float32)
    plan = {"fc": LayerPlan("fc", op, "x", scale, zp, weight_bits=8, smooth=smooth)}
    out = to_proto(run_pass(QuantizeStaticPass(plan=plan, format="qdq"), ir.from_proto(proto)).model)
    onnx.checker.check_model(out)
    assert "Mul" in [n.op_type for n in out.graph.node]  # SmoothQuant's 1/s stays a float Mul
    got = run_ort(out, {"x": x})[0]  # optimizations off: DequantizeLinear and MatMul run as written
    x_s = (x / smooth).astype(np.float32)
    x_dq = (np.clip(np.round(x_s / np.float32(scale)) + zp, 0, 255) - zp) * np.float32(scale)
    wq, ws = quantize_weight(w * smooth[:, None], 8, axis=1)
    want = x_dq @ (wq.astype(np.float32) * ws) + b
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert out.graph.output[0].name == "y"


def test_cli_format_qdq_writes_the_qdq_form(tmp_path, mlp_path, mlp_data):
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(cli, ["quantize", str(mlp_path), "-o", str(out), "--calibration", str(mlp_data[0]),
                                   "--families", "all", "--format", "qdq"])
    assert res.exit_code == 0, res.output
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert {n.domain for n in model.graph.node} <= {""} and "MatMulIntegerToFloat" not in ops
    assert ops.count("MatMul") == 2 and "QuantizeLinear" in ops
    assert "format: qdq" in res.output


def test_contrib_form_stays_the_default(mlp_path, mlp_data):
    assert QuantizeOptions().resolved_format() == "contrib"  # unset: the CPU EP's form (no target EP)
    model = _quantize(mlp_path, mlp_data[0])
    assert "MatMulIntegerToFloat" in [n.op_type for n in model.graph.node if n.domain == MS_DOMAIN]


def test_qdq_preconditions():
    proto, _, _ = _single_layer("matmul")
    plan = {"fc": LayerPlan("fc", "matmul", "x", 6.0 / 255, 128)}
    with pytest.raises(OptionError, match="contrib, qdq"):
        QuantizeStaticPass(plan=plan, format="qlinear")
    old = proto.__deepcopy__()
    old.opset_import[0].version = 12
    with pytest.raises(PassFailed, match="opset 13"):
        run_pass(QuantizeStaticPass(plan=plan, format="qdq"), ir.from_proto(old))
    contrib_op = proto.__deepcopy__()
    contrib_op.graph.node.append(helper.make_node("Gelu", ["y"], ["g"], domain=MS_DOMAIN))
    contrib_op.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    with pytest.raises(PassFailed, match="com.microsoft.Gelu"):
        run_pass(QuantizeStaticPass(plan=plan, format="qdq"), ir.from_proto(contrib_op))
