"""Static quantization on the shapes third-party ONNX files take: old opsets (PaddlePaddle at
11/12), every emitted node valid at opset 13, two-head PReLU CNNs (MTCNN P-Net), 1-D convolutions
and If subgraphs (silero-vad), Constant/Identity-fed weights, ``dim_value: -1`` batch dims, and
weight-shared layers calibrated on variable lengths (ALBERT).

Numerics are checked against the float model in onnxruntime on this host (weight bits from
``host_isa()``: 8-bit u8×s8 products saturate on x86 without VNNI)."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgecomp.cli import cli
from edgecomp.data import Dataset, input_specs
from edgecomp.embeddings.quantize_embeddings import QuantizeEmbeddingsPass
from edgecomp.errors import PassFailed
from edgecomp.io import to_proto
from edgecomp.passes.base import run_pass
from edgecomp.passes.optimize_graph import OptimizeGraphPass
from edgecomp.passes.upgrade_opset import UpgradeOpsetPass, drop_unsupported_defaults, opset_violations
from edgecomp.quantize import quantize_model
from edgecomp.quantize.layers import find_layers
from edgecomp.quantize.options import QuantizeOptions
from edgecomp.targets import host_isa
from tests.conftest import make_model, vinfo

MIN_COSINE = 0.99
_SILERO_SPEC = importlib.util.find_spec("silero_vad")
SILERO = Path(_SILERO_SPEC.origin).parent / "data" if _SILERO_SPEC else None  # the package's release ONNX files


def _opts(**kw) -> QuantizeOptions:
    return QuantizeOptions(**{"families": "all", "isa": host_isa(), **kw})  # onnxruntime runs the result here


def _session(model, optimized: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if optimized:
        so.optimized_model_filepath = optimized
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else to_proto(model).SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _valid(model: ir.Model, opset: int = 13) -> onnx.ModelProto:
    """The model as a proto: declared default opset ``opset``, onnx.checker (full) and onnxruntime accept it."""
    proto = to_proto(model)
    assert {o.domain: o.version for o in proto.opset_import}[""] == opset
    onnx.checker.check_model(proto, full_check=True)
    assert not opset_violations(model)
    _session(proto)
    return proto


def _cosine(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Mean cosine over samples and outputs (each output flattened per sample)."""
    cs = []
    for a, b in zip(ref, got):
        a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
        cs += list((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30))
    return float(np.mean(cs))


def _compare(float_proto: onnx.ModelProto, quantized, feed) -> float:
    return _cosine(_session(float_proto).run(None, feed), _session(quantized).run(None, feed))


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


# --- 1. opset < 13 -------------------------------------------------------------------------

def _paddle_like_cnn(opset: int, batch=-1) -> tuple[onnx.ModelProto, dict]:
    """Conv → BN → Relu → MaxPool → Reshape → MatMul + bias → Softmax, weights of a Paddle export."""
    rng = np.random.default_rng(0)
    inits = {"w": (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "b": rng.standard_normal(8).astype(np.float32),
             "gamma": np.ones(8, np.float32), "beta": np.zeros(8, np.float32), "mean": np.zeros(8, np.float32),
             "var": np.ones(8, np.float32), "shape": np.array([0, -1], np.int64),
             "w2": (rng.standard_normal((8 * 8 * 8, 10)) * 0.05).astype(np.float32), "b2": np.zeros(10, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Reshape", ["p", "shape"], ["f"]), helper.make_node("MatMul", ["f", "w2"], ["m"], name="fc"),
             helper.make_node("Add", ["m", "b2"], ["a"]), helper.make_node("Softmax", ["a"], ["y"], axis=1)]
    m = make_model(nodes, [vinfo("x", [batch, 3, 16, 16])], [vinfo("y", [batch, 10])], inits, opset=opset)
    m.ir_version = 6
    onnx.checker.check_model(m, full_check=True)
    return m, {"x": rng.standard_normal((8, 3, 16, 16)).astype(np.float32)}


@pytest.mark.parametrize("opset", [11, 12])
def test_old_opset_model_is_upgraded_to_13_and_quantized(tmp_path, opset):
    proto, feed = _paddle_like_cnn(opset)
    res = quantize_model(ir.from_proto(proto), Dataset(_npz(tmp_path / "c.npz", **feed)), _opts())
    assert res.summary["opset"] == f"upgraded {opset} → 13 (per-channel DequantizeLinear needs 13)"
    q = _valid(res.model, 13)
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(_ops(q)) and res.summary["layers int8"] == 2
    x = np.random.default_rng(7).standard_normal((4, 3, 16, 16)).astype(np.float32)
    assert _compare(proto, q, {"x": x}) >= MIN_COSINE


def test_failed_opset_upgrade_refuses_before_calibration(tmp_path, monkeypatch):
    proto, feed = _paddle_like_cnn(11)
    data = Dataset(_npz(tmp_path / "c.npz", **feed))

    def boom(*a, **k):
        raise RuntimeError("No Adapter For Foo\nmore detail")

    def no_calibration(*a, **k):
        raise AssertionError("calibration ran before the opset check")

    monkeypatch.setattr(onnx.version_converter, "convert_version", boom)
    monkeypatch.setattr("edgecomp.quantize.step.calibrate", no_calibration)
    with pytest.raises(PassFailed) as e:
        quantize_model(ir.from_proto(proto), data, _opts(tolerance=0.01), eval_data=data)
    msg = str(e.value)
    assert "\n" not in msg and "opset 11" in msg and "13" in msg and "No Adapter For Foo" in msg


def test_upgrade_pass_leaves_new_opsets_alone():
    proto, _ = _paddle_like_cnn(17)
    res = run_pass(UpgradeOpsetPass(min_opset=13), ir.from_proto(proto))
    assert not res.modified and res.model.opset_imports[""] == 17


# --- 2. every emitter valid at opset 13 ----------------------------------------------------

def _emitter_model(case: str):
    """(model at opset 13, feed, quantize options, ops the quantized model must hold)."""
    rng = np.random.default_rng(1)
    f32 = lambda *s, k=1.0: (rng.standard_normal(s) * k).astype(np.float32)  # noqa: E731
    if case == "matmul-bias-smooth":
        w = f32(16, 8) * np.geomspace(0.05, 3, 16)[:, None].astype(np.float32)
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), helper.make_node("Add", ["h", "b"], ["y"])]
        m = make_model(nodes, [vinfo("x", ["N", 16])], [vinfo("y", ["N", 8])], {"w": w, "b": f32(8)}, opset=13)
        return m, {"x": f32(32, 16) * np.geomspace(3, 0.05, 16).astype(np.float32)}, \
            {"smooth": "0.5", "bias_correction": "on"}, {"Mul", "QuantizeLinear", "MatMulIntegerToFloat"}
    if case == "gemm-transb":
        nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1, name="gemm")]
        m = make_model(nodes, [vinfo("x", ["N", 12])], [vinfo("y", ["N", 6])], {"w": f32(6, 12), "c": f32(6)}, opset=13)
        return m, {"x": f32(32, 12)}, {}, {"QuantizeLinear", "MatMulIntegerToFloat"}
    if case in ("conv-relu-clip-residual", "conv1d-depthwise"):
        two_d = case.startswith("conv-relu")
        k = [3, 3] if two_d else [3]
        pads = [1, 1, 1, 1] if two_d else [1, 1]
        ws = {"w1": f32(8, 3, *k, k=0.3), "b1": f32(8), "w2": f32(8, 1, *k, k=0.3), "b2": f32(8),
              "w3": f32(8, 8, *k, k=0.2), "lo": np.array(0, np.float32), "hi": np.array(6, np.float32)}
        nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=pads, name="conv1"),
                 helper.make_node("Relu", ["c1"], ["r1"]),
                 helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=pads, group=8, name="dw"),
                 helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"]),
                 helper.make_node("Conv", ["r2", "w3"], ["c3"], pads=pads, name="conv3"),
                 helper.make_node("Add", ["c3", "r1"], ["y"], name="residual")]
        shape = ["N", 3, 12, 12] if two_d else ["N", 3, 40]
        m = make_model(nodes, [vinfo("x", shape)], [vinfo("y", None)], ws, opset=13)
        return m, {"x": f32(16, *shape[1:])}, {}, {"QuantizeLinear", "DequantizeLinear", "Conv"}
    if case == "embedding-int8":
        nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="emb"),
                 helper.make_node("MatMul", ["e", "w"], ["y"], name="fc")]
        m = make_model(nodes, [vinfo("ids", ["N", "S"], TensorProto.INT64)], [vinfo("y", ["N", "S", 4])],
                       {"table": f32(1200, 8), "w": f32(8, 4)}, opset=13)
        return m, {"ids": rng.integers(0, 1200, (4, 7)).astype(np.int64)}, {}, {"Gather", "Cast", "Mul"}
    raise KeyError(case)


@pytest.mark.parametrize("case", ["matmul-bias-smooth", "gemm-transb", "conv-relu-clip-residual", "conv1d-depthwise",
                                  "embedding-int8"])
def test_each_quantize_emitter_is_valid_at_opset_13(tmp_path, case):
    proto, feed, kw, want_ops = _emitter_model(case)
    res = quantize_model(ir.from_proto(proto), Dataset(_npz(tmp_path / "d.npz", **feed)), _opts(**kw))
    q = _valid(res.model)
    assert want_ops <= set(_ops(q)), _ops(q)
    assert "opset" not in res.summary  # already at 13: no conversion
    if case.startswith("conv-relu"):
        producers = {o: n.op_type for n in q.graph.node for o in n.output}
        quantized = [producers.get(n.input[0]) for n in q.graph.node if n.op_type == "QuantizeLinear"]
        assert "Add" in quantized and "Clip" not in producers.values()  # residual QLinearAdd, ReLU6 folded
    assert _compare(proto, q, feed) >= MIN_COSINE


def _table_model(tied: bool):
    rng = np.random.default_rng(2)
    table = rng.standard_normal((64, 16)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="emb"), helper.make_node("Relu", ["e"], ["y"])]
    outs = [vinfo("y", ["N", "S", 16])]
    if tied:
        nodes.append(helper.make_node("Gemm", ["h", "table"], ["logits"], transB=1, name="head"))
        outs.append(vinfo("logits", ["B", 64]))
    ins = [vinfo("ids", ["N", "S"], TensorProto.INT64)] + ([vinfo("h", ["B", 16])] if tied else [])
    m = make_model(nodes, ins, outs, {"table": table}, opset=13)
    feed = {"ids": rng.integers(0, 64, (3, 5)).astype(np.int64)}
    if tied:
        feed["h"] = rng.standard_normal((2, 16)).astype(np.float32)
    return m, feed


@pytest.mark.parametrize("bits,block,tied", [(8, None, False), (8, 4, False), (4, 4, False), (4, 8, True)])
def test_embedding_emitters_are_valid_at_opset_13(bits, block, tied):
    proto, feed = _table_model(tied)
    res = run_pass(QuantizeEmbeddingsPass(bits=bits, block=block, min_rows=10, tied=tied), ir.from_proto(proto))
    assert res.modified
    q = _valid(res.model)
    assert ("BitShift" in _ops(q)) == (bits == 4)
    unsq = [n for n in q.graph.node if n.op_type == "Unsqueeze"]
    assert all(len(n.input) == 2 and not n.attribute for n in unsq)  # axes an input at opset 13
    assert _compare(proto, q, feed) >= MIN_COSINE


def test_embedding_unsqueeze_uses_the_attribute_form_before_opset_13():
    proto, feed = _table_model(False)
    proto.opset_import[0].version = 12
    res = run_pass(QuantizeEmbeddingsPass(bits=8, block=4, min_rows=10), ir.from_proto(proto))
    q = _valid(res.model, 12)
    assert all(len(n.input) == 1 and n.attribute[0].name == "axes" for n in q.graph.node if n.op_type == "Unsqueeze")
    assert _compare(proto, q, feed) >= MIN_COSINE


def test_cleanup_does_not_write_reshape_allowzero_into_opset_13():
    """onnxscript materializes a dynamic Reshape shape with allowzero=1 (opset 14) when it knows the
    output shape. A shape only recorded in value_info no longer counts (a declaration can be wrong,
    issue 25): the Reshape stays dynamic and the model valid at opset 13. Where the rewriter does
    write allowzero=1 with a constant shape without 0, the cleanup drops it (the same meaning)."""
    rng = np.random.default_rng(3)
    inits = {"w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "st": np.array([0], np.int64),
             "en": np.array([1], np.int64), "m1": np.array([-1], np.int64),
             "w2": rng.standard_normal((8 * 16 * 16, 4)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Shape", ["c"], ["s"]),
             helper.make_node("Slice", ["s", "st", "en"], ["s0"]), helper.make_node("Concat", ["s0", "m1"], ["ns"], axis=0),
             helper.make_node("Reshape", ["c", "ns"], ["f"]), helper.make_node("MatMul", ["f", "w2"], ["y"])]
    m = make_model(nodes, [vinfo("x", ["N", 3, 16, 16])], [vinfo("y", ["N", 4])], inits, opset=13)
    m.graph.value_info.append(vinfo("f", ["N", 2048]))  # exporters record it; the rewriter then materializes
    model = ir.from_proto(m)
    res = run_pass(OptimizeGraphPass(), model)
    q = _valid(model)
    assert all(not n.attribute for n in q.graph.node if n.op_type == "Reshape")
    assert "Shape" in _ops(q) and res.summary.get("attributes dropped", 0) == 0
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(_session(q).run(None, {"x": x})[0], _session(m).run(None, {"x": x})[0], rtol=1e-4, atol=1e-3)
    reshape = next(n for n in model.graph if n.op_type == "Reshape")  # what the rewriter writes
    reshape.replace_input_with(1, ir.Value(name="fixed", const_value=ir.tensor(np.array([-1, 2048], np.int64))))
    reshape.attributes["allowzero"] = ir.AttrInt64("allowzero", 1)
    assert drop_unsupported_defaults(model) == ["Reshape.allowzero (not in opset 13, same meaning without it)"]
    assert "allowzero" not in reshape.attributes


# --- 3. two heads, PReLU, MaxPool (MTCNN P-Net) ------------------------------------------------

def _pnet(tmp_path: Path) -> Path:
    import torch
    import torch.nn as nn

    from edgecomp.export import export_model

    torch.manual_seed(0)

    class PNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.p1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
            self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.c2, self.p2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
            self.c3, self.p3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
            self.cls, self.box = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

        def forward(self, x):
            x = self.p3(self.c3(self.p2(self.c2(self.pool(self.p1(self.c1(x)))))))
            return torch.softmax(self.cls(x), 1), self.box(x)

    out = tmp_path / "pnet.onnx"
    export_model(PNet(), torch.randn(1, 3, 24, 24), out, exporter="torchscript", dynamic={"x": {0: "b", 2: "h", 3: "w"}})
    return out


def test_two_head_prelu_cnn_quantizes_without_a_cycle(tmp_path):
    path = _pnet(tmp_path)
    rng = np.random.default_rng(0)
    data = Dataset(_npz(tmp_path / "c.npz", x=rng.standard_normal((8, 3, 24, 24)).astype(np.float32)))
    res = quantize_model(ir.load(str(path)), data, _opts())
    assert res.summary["layers int8"] == 5
    q = _valid(res.model, res.model.opset_imports[""])
    assert [o.name for o in q.graph.output] == [o.name for o in onnx.load(str(path)).graph.output]
    x = rng.standard_normal((4, 3, 30, 40)).astype(np.float32)  # another image size: shapes stay dynamic
    assert _compare(onnx.load(str(path)), q, {"x": x}) >= MIN_COSINE


def test_quantized_conv_output_that_is_a_graph_output_and_feeds_another_conv():
    """A conv head whose output is both a graph output and the input of a further conv: the output
    moves to the DequantizeLinear, the QuantizeLinear keeps reading the float tensor."""
    rng = np.random.default_rng(4)
    inits = {"w1": (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32),
             "w2": (rng.standard_normal((2, 4, 1, 1)) * 0.3).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["feat"], name="c1"),
             helper.make_node("Conv", ["feat", "w2"], ["head"], name="c2")]
    m = make_model(nodes, [vinfo("x", ["N", 3, 10, 10])], [vinfo("feat", None), vinfo("head", None)], inits, opset=13)
    x = rng.standard_normal((8, 3, 10, 10)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        res = quantize_model(ir.from_proto(m), Dataset(_npz(Path(d) / "c.npz", x=x)), _opts())
    q = _valid(res.model)
    assert [o.name for o in q.graph.output] == ["feat", "head"]
    assert _compare(m, q, {"x": x}) >= MIN_COSINE


def test_a_failure_inside_the_pass_is_one_line(tmp_path, monkeypatch):
    proto, feed = _paddle_like_cnn(13)

    def broken(*a, **k):
        raise ValueError("something unforeseen\nsecond line")

    monkeypatch.setattr("edgecomp.quantize.quantize_static._Builder.conv", broken)
    with pytest.raises(PassFailed, match="QuantizeStaticPass failed on this model: ValueError: something unforeseen$"):
        quantize_model(ir.from_proto(proto), Dataset(_npz(tmp_path / "c.npz", **feed)), _opts())


# --- 4. 1-D convolutions, subgraphs ------------------------------------------------------------

def test_1d_conv_net_quantizes_and_fuses_to_qlinearconv(tmp_path):
    import torch
    import torch.nn as nn

    from edgecomp.export import export_model

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv1d(4, 16, 5, padding=2)
            self.b = nn.Conv1d(16, 16, 3, padding=1, groups=16)
            self.c = nn.Conv1d(16, 32, 3, stride=2)
            self.fc = nn.Linear(32, 3)

        def forward(self, x):
            x = torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))
            return self.fc(x.mean(-1))

    path = tmp_path / "c1d.onnx"
    export_model(Net(), torch.randn(1, 4, 64), path, exporter="torchscript", dynamic={"x": {0: "b", 2: "t"}})
    rng = np.random.default_rng(0)
    data = Dataset(_npz(tmp_path / "c.npz", x=rng.standard_normal((16, 4, 64)).astype(np.float32)))
    res = quantize_model(ir.load(str(path)), data, _opts())
    assert {r["layer"]: r["decision"] for r in res.rows if r["op"] == "Conv"} == {
        "/a/Conv": "int8", "/b/Conv": "int8", "/c/Conv": "int8"}
    q = _valid(res.model, res.model.opset_imports[""])
    _session(q, optimized=str(tmp_path / "opt.onnx"))
    assert _ops(onnx.load(str(tmp_path / "opt.onnx"))).count("QLinearConv") == 3  # onnxruntime fuses 1-D too
    x = rng.standard_normal((8, 4, 50)).astype(np.float32)
    assert _compare(onnx.load(str(path)), q, {"x": x}) >= MIN_COSINE


def _if_model():
    """A top-level MatMul, then an If whose branches each hold a MatMul and a 1-D Conv."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 6)).astype(np.float32)

    def branch(tag):
        return helper.make_graph(
            [helper.make_node("MatMul", ["h", f"w_{tag}"], [f"m_{tag}"], name=f"mm_{tag}"),
             helper.make_node("Unsqueeze", [f"m_{tag}", "one"], [f"u_{tag}"]),
             helper.make_node("Conv", [f"u_{tag}", f"k_{tag}"], [f"c_{tag}"], pads=[1, 1], name=f"conv_{tag}"),
             helper.make_node("Squeeze", [f"c_{tag}", "one"], [f"out_{tag}"])],
            tag, [], [vinfo(f"out_{tag}", ["N", 6])],
            [numpy_helper.from_array(w, f"w_{tag}"), numpy_helper.from_array(np.ones((1, 1, 3), np.float32), f"k_{tag}")])

    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="top_mm"),
             helper.make_node("If", ["flag"], ["y"], then_branch=branch("then"), else_branch=branch("else"), name="if")]
    m = make_model(nodes, [vinfo("x", ["N", 6]), vinfo("flag", [], TensorProto.BOOL)], [vinfo("y", ["N", 6])],
                   {"w0": w, "one": np.array([1], np.int64)}, opset=13)
    onnx.checker.check_model(m, full_check=True)
    return m


def test_layers_inside_if_subgraphs_are_reported(tmp_path):
    m = _if_model()
    layers, skipped = find_layers(ir.from_proto(m))
    assert [l.node for l in layers] == ["top_mm"]
    sub = {r["layer"]: r["reason"] for r in skipped}
    assert set(sub) == {"mm_then", "conv_then", "mm_else", "conv_else"}
    assert all(r.startswith("inside an If subgraph: not quantized") for r in sub.values())
    feed = {"x": np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32), "flag": np.array(True)}
    d = tmp_path / "d"
    d.mkdir()
    np.savez(d / "0.npz", **feed)
    res = quantize_model(ir.from_proto(m), Dataset(d), _opts())
    decisions = {r["layer"]: r["decision"] for r in res.rows}
    assert decisions["top_mm"] == "int8" and decisions["mm_then"] == "float"
    q = _valid(res.model)
    assert _compare(m, q, feed) >= MIN_COSINE


def test_no_quantizable_layer_says_which_ops_and_why(tmp_path):
    m = _if_model()
    m.graph.node[0].input[:] = ["w0", "x_t"]  # top MatMul now multiplies a constant by an activation
    m.graph.node.insert(0, helper.make_node("Transpose", ["x"], ["x_t"]))
    d = tmp_path / "d"
    d.mkdir()
    np.savez(d / "0.npz", x=np.ones((6, 6), np.float32), flag=np.array(True))
    with pytest.raises(PassFailed) as e:
        quantize_model(ir.from_proto(m), Dataset(d), _opts())
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("no quantizable layer")
    assert "MatMul: weight is not a constant" in msg
    assert "MatMul x2: inside an If subgraph: not quantized" in msg and "Conv x2: inside an If subgraph" in msg
    assert "the model's ops:" in msg and "If" in msg


@pytest.mark.skipif(SILERO is None or not (SILERO / "silero_vad.onnx").exists(), reason="silero_vad not installed")
def test_real_silero_vad(tmp_path):
    """The If-wrapped release refuses with the reason; the 16 kHz opset-15 export (top-level 1-D
    convs) quantizes all six convs and fuses them to QLinearConv. Its STFT conv feeds a magnitude
    (sqrt(re² + im²)): the per-tensor uint8 grid of its output wrecks the quiet bins and the LSTM
    state (cosine ~0.9), so the default fidelity check keeps the most sensitive convs float, and
    the streamed speech probability stays within 0.05 of float on every chunk."""
    rng = np.random.default_rng(0)
    t = np.arange(512 * 24) / 16000
    audio = (0.3 * np.sin(2 * np.pi * (200 + 800 * t) * t) * (np.sin(2 * np.pi * 1.5 * t) > 0)
             + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)
    chunks = [audio[i * 512:(i + 1) * 512][None] for i in range(24)]
    sr = np.array(16000, np.int64)
    src = SILERO / "silero_vad_16k_op15.onnx"
    ref = _session(onnx.load(str(src)))
    calib = tmp_path / "calib"
    calib.mkdir()
    state = np.zeros((2, 1, 128), np.float32)
    for i, ch in enumerate(chunks[:16]):  # the states a stream reaches
        np.savez(calib / f"{i:02d}.npz", input=ch, state=state, sr=sr)
        state = ref.run(None, {"input": ch, "state": state, "sr": sr})[1]
    with pytest.raises(PassFailed, match="Conv x12: inside an If subgraph: not quantized"):
        quantize_model(ir.load(str(SILERO / "silero_vad.onnx")), Dataset(calib), _opts())

    plain = quantize_model(ir.load(str(src)), Dataset(calib), _opts(min_cosine=None))
    assert plain.summary["layers int8"] == 6 and "fidelity" not in plain.summary
    _session(_valid(plain.model, 15), optimized=str(tmp_path / "opt.onnx"))
    assert _ops(onnx.load(str(tmp_path / "opt.onnx"))).count("QLinearConv") == 6

    res = quantize_model(ir.load(str(src)), Dataset(calib), _opts())
    assert 1 <= res.summary["layers int8"] < 6 and "floor 0.99)" in res.summary["fidelity"]
    # Which convs fall back depends on the host's int8 numerics (7-bit weights without VNNI); some must.
    assert sum(r["decision"] == "float" for r in res.rows) >= 6 - res.summary["layers int8"]
    q = _session(_valid(res.model, 15))
    s_ref = s_q = np.zeros((2, 1, 128), np.float32)
    diffs = []
    for ch in chunks:
        a = ref.run(None, {"input": ch, "state": s_ref, "sr": sr})
        b = q.run(None, {"input": ch, "state": s_q, "sr": sr})
        s_ref, s_q = a[1], b[1]
        diffs.append(abs(float(a[0].item()) - float(b[0].item())))
    assert max(diffs) <= 0.05, diffs


def test_fidelity_check_keeps_a_layer_float_when_an_output_drifts(tmp_path):
    """A conv whose output channels differ 10^4x in scale, one of them a graph output of its own:
    one per-tensor uint8 grid rounds the small channel away. Without a tolerance, the default
    fidelity check (every output's cosine >= 0.99 on calibration) keeps that conv float."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((2, 1, 5)).astype(np.float32)
    w[0] *= 100.0
    w[1] *= 0.01
    inits = {"w": w, "st": np.array([1], np.int64), "en": np.array([2], np.int64), "ax": np.array([1], np.int64),
             "w2": (rng.standard_normal((3, 2, 1)) * 0.3).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[2, 2], name="front"),
             helper.make_node("Slice", ["c", "st", "en", "ax"], ["small"]),
             helper.make_node("Conv", ["c", "w2"], ["y"], name="mix")]
    m = make_model(nodes, [vinfo("x", ["N", 1, 32])], [vinfo("y", ["N", 3, 32]), vinfo("small", ["N", 1, 32])],
                   inits, opset=13)
    x = rng.standard_normal((16, 1, 32)).astype(np.float32)
    data = Dataset(_npz(tmp_path / "c.npz", x=x))
    blind = quantize_model(ir.from_proto(m), data, _opts(min_cosine=None))
    assert _compare(m, to_proto(blind.model), {"x": x[:1]}) < 0.99  # the small output is lost
    res = quantize_model(ir.from_proto(m), data, _opts())
    assert {r["layer"]: r["decision"] for r in res.rows}["front"] == "float"
    assert "kept float so every output keeps cosine >= 0.99" in {r["layer"]: r["reason"] for r in res.rows}["front"]
    q = _valid(res.model)
    for i in range(4):
        feed = {"x": x[i:i + 1]}
        for a, b in zip(_session(m).run(None, feed), _session(q).run(None, feed)):
            assert _cosine([a], [b]) >= 0.99


# --- 5. Constant / Identity weights ------------------------------------------------------------

def test_constant_node_and_identity_fed_weights_are_quantized(tmp_path):
    rng = np.random.default_rng(6)
    w1, w2 = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((16, 4)).astype(np.float32)
    cw = (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Identity", ["cw_init"], ["cw"]),
             helper.make_node("Conv", ["img", "cw"], ["c"], name="conv"),
             helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1)),
             helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Identity", ["w2_init"], ["w2"]),
             helper.make_node("Gemm", ["h", "w2"], ["y"], name="fc2")]
    m = make_model(nodes, [vinfo("x", ["N", 8]), vinfo("img", ["N", 3, 8, 8])],
                   [vinfo("y", ["N", 4]), vinfo("c", ["N", 4, 6, 6])], {"w2_init": w2, "cw_init": cw}, opset=13)
    feed = {"x": rng.standard_normal((8, 8)).astype(np.float32), "img": rng.standard_normal((8, 3, 8, 8)).astype(np.float32)}
    res = quantize_model(ir.from_proto(m), Dataset(_npz(tmp_path / "d.npz", **feed)), _opts())
    assert {r["layer"]: r["decision"] for r in res.rows} == {"conv": "int8", "fc1": "int8", "fc2": "int8"}
    q = _valid(res.model)
    assert "Constant" not in _ops(q) and "Identity" not in _ops(q)
    assert _compare(m, q, feed) >= MIN_COSINE


def test_identity_in_an_if_branch_is_left_alone():
    """Bypassing ``out = Identity(outer)`` in a branch would rename an outer-scope value."""
    m = _if_model()
    m.graph.node[1].attribute[1].g.CopyFrom(helper.make_graph(
        [helper.make_node("Identity", ["h"], ["out_else"])], "else", [], [vinfo("out_else", ["N", 6])]))
    model = ir.from_proto(m)
    run_pass(OptimizeGraphPass(), model)
    proto = _valid(model)
    branches = [a.g for n in proto.graph.node if n.op_type == "If" for a in n.attribute if a.type == a.GRAPH]
    assert any([n.op_type for n in g.node] == ["Identity"] and g.output[0].name == "out_else" and g.node[0].input == ["h"]
               for g in branches)  # the Identity still reads the outer value under its own name


# --- 6. dim_value -1 ---------------------------------------------------------------------------

def test_negative_batch_dim_works_through_the_cli(tmp_path):
    proto, _ = _paddle_like_cnn(11, batch=-1)
    proto.graph.input[0].type.tensor_type.shape.dim[2].Clear()  # ? x ? spatial, as Paddle OCR writes
    proto.graph.input[0].type.tensor_type.shape.dim[3].Clear()
    proto.graph.node[4].input[1] = "shape"
    src = tmp_path / "ocr.onnx"
    onnx.save(proto, str(src))
    assert input_specs(ir.from_proto(proto))[0].dims == (None, 3, None, None)
    x = np.random.default_rng(8).standard_normal((6, 3, 16, 16)).astype(np.float32)
    data = _npz(tmp_path / "c.npz", x=x)
    out = tmp_path / "ocr.int8.onnx"
    res = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(out), "--calibration", str(data), "--families", "all"])
    assert res.exit_code == 0, res.output
    assert "opset: upgraded 11 → 13 (per-channel DequantizeLinear needs 13)" in res.output
    q = onnx.load(str(out))
    dim0 = q.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_value == -1 or (not dim0.HasField("dim_value"))  # still "any batch"
    onnx.checker.check_model(q, full_check=True)
    assert _compare(proto, q, {"x": x[:2]}) >= MIN_COSINE  # batch 2 though calibrated at 1


def test_negative_batch_dim_is_not_folded_into_a_size():
    """A ``Shape(x)[0]`` of a ``dim_value: -1`` batch must not fold to the constant -1 (an Expand
    would then get a negative size): the cleanup turns -1 dims into symbolic ones first."""
    rng = np.random.default_rng(12)
    inits = {"w": rng.standard_normal((8, 4)).astype(np.float32), "row": rng.standard_normal((1, 4)).astype(np.float32),
             "i0": np.array([0], np.int64), "four": np.array([4], np.int64)}
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
             helper.make_node("Concat", ["b", "four"], ["bs"], axis=0),
             helper.make_node("Expand", ["row", "bs"], ["bias"]),
             helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), helper.make_node("Add", ["h", "bias"], ["y"])]
    m = make_model(nodes, [vinfo("x", [-1, 8])], [vinfo("y", [-1, 4])], inits, opset=13)
    x = rng.standard_normal((8, 8)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        res = quantize_model(ir.from_proto(m), Dataset(_npz(Path(d) / "c.npz", x=x)), _opts())
    q = _valid(res.model)
    assert res.summary["cleanup"]["negative dims made symbolic"] >= 1
    assert _compare(m, q, {"x": x[:3]}) >= MIN_COSINE


# --- 7. weight-shared layers, variable length ----------------------------------------------------

def test_weight_shared_matmul_calibrates_over_variable_lengths(tmp_path):
    """ALBERT-like: one weight read by three MatMuls, residual Adds of bias Adds, token lengths
    that vary between samples (no statistic may be per position)."""
    rng = np.random.default_rng(9)
    d, v = 16, 40
    inits = {"emb": rng.standard_normal((v, d)).astype(np.float32), "p": (rng.standard_normal((d, d)) * 0.3).astype(np.float32),
             "pb": rng.standard_normal(d).astype(np.float32), "w": (rng.standard_normal((d, d)) * 0.3).astype(np.float32),
             "b": rng.standard_normal(d).astype(np.float32)}
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"]), helper.make_node("MatMul", ["e", "p"], ["p0"], name="proj"),
             helper.make_node("Add", ["p0", "pb"], ["h0"])]
    for i in range(3):  # the shared layer, applied three times
        nodes += [helper.make_node("MatMul", [f"h{i}", "w"], [f"m{i}"], name=f"shared_{i}"),
                  helper.make_node("Add", [f"m{i}", "b"], [f"t{i}"]),
                  helper.make_node("Add", [f"h{i}", f"t{i}"], [f"a{i}"], name=f"residual_{i}"),
                  helper.make_node("Tanh", [f"a{i}"], [f"h{i + 1}"])]
    m = make_model(nodes, [vinfo("ids", ["N", "S"], TensorProto.INT64)], [vinfo("h3", ["N", "S", d])], inits, opset=13)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(10):
        np.savez(calib / f"{i}.npz", ids=rng.integers(0, v, (1, int(rng.integers(3, 25)))).astype(np.int64))
    res = quantize_model(ir.from_proto(m), Dataset(calib), _opts())  # smooth auto: off for a shared weight
    assert {r["layer"] for r in res.rows if r["decision"] == "int8"} == {"proj", "shared_0", "shared_1", "shared_2"}
    q = _valid(res.model)
    int8_weights = [t for t in q.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8_weights) == 2  # the shared weight is stored once, like the float one
    for length in (2, 11, 40):
        ids = rng.integers(0, v, (2, length)).astype(np.int64)
        assert _compare(m, q, {"ids": ids}) >= MIN_COSINE
