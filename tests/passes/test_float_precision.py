"""Float16 models: the lift to float32 and the float16 storage back (against onnxruntime on the
float16 model and numpy), every command on float16 models keeping the float16 interface, and
one-line refusals of float types onnxruntime's CPU kernels cannot run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgecomp.cli import cli
from edgecomp.errors import ModelLoadError
from edgecomp.measure.validate import validate
from edgecomp.passes.base import run_pass
from edgecomp.passes.float_precision import (
    LiftFloat16Pass,
    StoreFloat16Pass,
    float32_tensor_names,
    refuse_unrunnable_floats,
)
from tests.conftest import run_ort, vinfo

F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT
#: cosine of the int8 model's outputs to the float16 model's (the issue's target)
MIN_COSINE = 0.99
#: float16 keeps 11 significant bits: outputs of these small nets agree to this relative error
HALF_RTOL = 4e-3


def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m


def half_mlp(dtype=np.float16) -> onnx.ModelProto:
    """x[N,64] → (MatMul + bias → Relu) ×2 → MatMul + bias → logits[N,10], all float16."""
    rng = np.random.default_rng(0)
    dims = [64, 128, 64, 10]
    inits, nodes, x = {}, [], "x"
    for i, (k, n) in enumerate(zip(dims, dims[1:])):
        inits[f"w{i}"] = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(dtype)
        inits[f"b{i}"] = (0.1 * rng.standard_normal(n)).astype(dtype)
        last = i == len(dims) - 2
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"fc{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], ["logits" if last else f"a{i}"], name=f"fc{i}_bias")]
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"h{i}"], name=f"relu{i}"))
            x = f"h{i}"
    t = F16 if dtype == np.float16 else F32
    return _model(nodes, [vinfo("x", ["N", 64], t)], [vinfo("logits", ["N", 10], t)], inits)


def half_cnn() -> onnx.ModelProto:
    """x[N,3,16,16] → Conv3x3(16)+Relu → Conv3x3(32)+Relu → GAP → Flatten → Gemm(10), float16."""
    rng = np.random.default_rng(1)
    h = lambda *s, fan: (rng.standard_normal(s) * np.sqrt(2 / fan)).astype(np.float16)  # noqa: E731
    inits = {"c0.w": h(16, 3, 3, 3, fan=27), "c0.b": h(16, fan=100), "c1.w": h(32, 16, 3, 3, fan=144),
             "c1.b": h(32, fan=100), "fc.w": h(10, 32, fan=32), "fc.b": h(10, fan=100)}
    nodes = [helper.make_node("Conv", ["x", "c0.w", "c0.b"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "c1.w", "c1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)]
    return _model(nodes, [vinfo("x", ["N", 3, 16, 16], F16)], [vinfo("logits", ["N", 10], F16)], inits)


def half_if() -> onnx.ModelProto:
    """An If on a bool input whose branches hold float16 Constants: then ``MatMul(x, W)``, else
    ``x * c`` — the shape of silero-vad's subgraphs, in float16."""
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float16), "W")
    c = numpy_helper.from_array(np.full((8,), 0.5, np.float16), "c")
    then = helper.make_graph([helper.make_node("Constant", [], ["W"], value=w),
                              helper.make_node("MatMul", ["x", "W"], ["t"])], "then", [], [vinfo("t", ["N", 8], F16)])
    other = helper.make_graph([helper.make_node("Constant", [], ["c"], value=c),
                               helper.make_node("Mul", ["x", "c"], ["e"])], "else", [], [vinfo("e", ["N", 8], F16)])
    nodes = [helper.make_node("If", ["flag"], ["y0"], then_branch=then, else_branch=other),
             helper.make_node("Cast", ["y0"], ["y"], to=F16)]
    return _model(nodes, [vinfo("x", ["N", 8], F16), vinfo("flag", [], TensorProto.BOOL)],
                  [vinfo("y", ["N", 8], F16)], {})


def mixed_mlp() -> onnx.ModelProto:
    """A float16 layer, Cast to float32, a float32 layer (a deliberate float32 island), Cast back."""
    rng = np.random.default_rng(3)
    inits = {"w16": (rng.standard_normal((16, 32)) / 4).astype(np.float16),
             "w32": (rng.standard_normal((32, 16)) / 6).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w16"], ["a"], name="fc16"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Cast", ["r"], ["r32"], to=F32),
             helper.make_node("MatMul", ["r32", "w32"], ["b"], name="fc32"),
             helper.make_node("Cast", ["b"], ["y"], to=F16)]
    return _model(nodes, [vinfo("x", ["N", 16], F16)], [vinfo("y", ["N", 16], F16)], inits)


def _elem_types(m: onnx.ModelProto) -> tuple[list[int], list[int]]:
    return ([v.type.tensor_type.elem_type for v in m.graph.input],
            [v.type.tensor_type.elem_type for v in m.graph.output])


def _all_float_types(m: onnx.ModelProto) -> set[int]:
    """Element types of every value, initializer and Constant tensor (subgraphs included)."""
    seen = set()

    def walk(g):
        seen.update(t.data_type for t in g.initializer)
        seen.update(v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info])
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    seen.add(a.t.data_type)
                elif a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
    walk(m.graph)
    return seen & {F16, F32}


def _weight_bytes(m: onnx.ModelProto | Path) -> int:
    """Bytes of every initializer and Constant tensor (subgraphs included): what a file's size
    is made of, without the value_info a pass may add."""
    m = onnx.load(str(m)) if isinstance(m, Path) else m
    total = 0

    def walk(g):
        nonlocal total
        total += sum(numpy_helper.to_array(t).nbytes for t in g.initializer)
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    total += numpy_helper.to_array(a.t).nbytes
                elif a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
    walk(m.graph)
    return total


def _lifted(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, ir.Model]:
    model = ir.from_proto(proto)
    result = run_pass(LiftFloat16Pass(), model)
    assert result.modified
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    return out, model


def _x(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float16)


@pytest.mark.parametrize("build,shape", [(half_mlp, (5, 64)), (half_cnn, (2, 3, 16, 16))])
def test_lift_computes_in_float32_behind_the_float16_interface(build, shape):
    proto = build()
    out, _ = _lifted(proto)
    assert _elem_types(out) == ([F16], [F16])
    assert {t.data_type for t in out.graph.initializer} == {F32}
    x = _x(shape)
    ref = run_ort(proto, {"x": x})[0]
    got = run_ort(out, {"x": x})[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), rtol=HALF_RTOL,
                               atol=HALF_RTOL * float(np.abs(ref).max()))
    # float32 with the same weights (exact in float32): the lifted graph is that, rounded at the output
    w = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in proto.graph.initializer}
    if build is half_mlp:
        h = x.astype(np.float32)
        for i in range(3):
            h = h @ w[f"w{i}"] + w[f"b{i}"]
            h = np.maximum(h, 0) if i < 2 else h
        np.testing.assert_allclose(got.astype(np.float32), h.astype(np.float16).astype(np.float32), rtol=1e-3, atol=1e-3)


def test_lift_and_store_leave_a_float32_model_alone():
    model = ir.from_proto(half_mlp(np.float32))
    assert not run_pass(LiftFloat16Pass(), model).modified
    assert not run_pass(StoreFloat16Pass(keep_float32=float32_tensor_names(model)), model).modified


def test_lift_reaches_if_subgraphs():
    proto = half_if()
    out, _ = _lifted(proto)
    assert _all_float_types(out) == {F16, F32}  # float16 only at the interface
    assert _elem_types(out) == ([F16, TensorProto.BOOL], [F16])
    branch = next(n for n in out.graph.node if n.op_type == "If").attribute
    assert all(n.attribute[0].t.data_type == F32 for a in branch for n in a.g.node if n.op_type == "Constant")
    x = _x((3, 8))
    then = next(a.g for a in proto.graph.node[0].attribute if a.name == "then_branch")
    w = numpy_helper.to_array(then.node[0].attribute[0].t).astype(np.float32)
    for flag, want in ((True, x.astype(np.float32) @ w), (False, x.astype(np.float32) * 0.5)):
        got = run_ort(out, {"x": x, "flag": np.array(flag)})[0]
        ref = run_ort(proto, {"x": x, "flag": np.array(flag)})[0]
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float16).astype(np.float32), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), rtol=HALF_RTOL,
                                   atol=HALF_RTOL * float(np.abs(ref).max()))


def test_store_writes_float16_weights_back_exactly_and_subgraph_constants_too():
    for proto in (half_mlp(), half_if()):
        model = ir.from_proto(proto)
        keep = float32_tensor_names(model)
        run_pass(LiftFloat16Pass(), model)
        lifted = ir.to_proto(model)
        report = run_pass(StoreFloat16Pass(keep_float32=keep, min_elements=8), model)
        assert report.modified and report.summary["stored float16"] > 0
        out = ir.to_proto(model)
        onnx.checker.check_model(out, full_check=True)
        assert _weight_bytes(out) * 2 == _weight_bytes(lifted)
        x = {"x": _x((4, proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value))}
        if len(proto.graph.input) > 1:
            x["flag"] = np.array(True)
        np.testing.assert_array_equal(run_ort(out, x)[0], run_ort(lifted, x)[0])  # float16 weights round-trip exactly
    stored = {t.name: t.data_type for t in out.graph.initializer}
    assert not stored  # half_if's weights are Constant nodes: they stay Constants, in float16
    branch = next(n for n in out.graph.node if n.op_type == "If").attribute
    assert {n.attribute[0].t.data_type for a in branch for n in a.g.node if n.op_type == "Constant"} == {F16}


def test_store_keeps_float32_islands_scales_and_values_float16_cannot_hold():
    model = ir.from_proto(mixed_mlp())
    keep = float32_tensor_names(model)
    run_pass(LiftFloat16Pass(), model)
    g = model.graph
    tiny = ir.Value(name="tiny", const_value=ir.tensor(np.full((16,), 1e-7, np.float32), name="tiny"))
    big = ir.Value(name="big", const_value=ir.tensor(np.full((16,), 1e5, np.float32), name="big"))
    scale = ir.Value(name="scale", const_value=ir.tensor(np.full((16,), 0.5, np.float32), name="scale"))
    for v in (tiny, big, scale):
        g.register_initializer(v)
    y = g.outputs[0].producer().inputs[0]  # the float32 value the output Cast reads
    adds = [ir.Node("", "Add", [y, tiny], num_outputs=1), ir.Node("", "Add", [y, big], num_outputs=1),
            ir.Node("", "DequantizeLinear", [ir.Value(name="q", const_value=ir.tensor(np.zeros(16, np.int8), name="q")),
                                             scale, None], num_outputs=1, attributes={"axis": ir.AttrInt64("axis", 0)})]
    for n in adds:
        g.append(n)
    report = run_pass(StoreFloat16Pass(keep_float32=keep), model)
    dtypes = {name: v.const_value.dtype for name, v in g.initializers.items()}
    assert dtypes["w32"] == ir.DataType.FLOAT  # stored float32 in the input: stays
    assert dtypes["w16_float16"] == ir.DataType.FLOAT16 and "w16" not in dtypes  # read through Cast as "w16"
    assert dtypes["tiny"] == dtypes["big"] == dtypes["scale"] == ir.DataType.FLOAT
    assert report.summary["kept float32 (outside float16's range)"] == 2
    assert report.summary["kept float32 (a consumer needs float32)"] == 1


def test_refuses_bfloat16_and_float8_naming_the_type():
    for dtype, name in ((TensorProto.BFLOAT16, "bfloat16"), (TensorProto.FLOAT8E4M3FN, "float8e4m3fn")):
        m = _model([helper.make_node("Cast", ["x"], ["c"], to=dtype), helper.make_node("Cast", ["c"], ["y"], to=F32)],
                   [vinfo("x", ["N", 4])], [vinfo("y", ["N", 4])], {})
        with pytest.raises(ModelLoadError, match=name):
            refuse_unrunnable_floats(ir.from_proto(m))
    refuse_unrunnable_floats(ir.from_proto(half_mlp()))  # float16 is runnable


# --- the commands on float16 models ----------------------------------------------------------

def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _write(tmp_path: Path, proto: onnx.ModelProto, name: str, shape: tuple, n: int = 24) -> tuple[Path, Path]:
    path = tmp_path / f"{name}.onnx"
    onnx.save(proto, str(path))
    data = tmp_path / f"{name}.npz"  # float32 DATA for a float16 input: cast like any float array
    np.savez(data, x=np.random.default_rng(5).standard_normal((n, *shape)).astype(np.float32))
    return path, data


@pytest.mark.parametrize("build,shape", [(half_mlp, (64,)), (half_cnn, (3, 16, 16))])
def test_quantize_float16_model_keeps_float16_io_and_fidelity_and_does_not_grow(tmp_path, build, shape):
    model, data = _write(tmp_path, build(), build.__name__, shape)
    out = tmp_path / "q.onnx"
    kept = {"half_mlp": "fc0", "half_cnn": "conv0"}[build.__name__]  # one layer left float, by --exclude
    res = _cli("quantize", model, "-o", out, "--calibration", data, "--families", "all", "--exclude", kept)
    assert res.exit_code == 0, res.output
    q = onnx.load(str(out))
    assert _elem_types(q) == ([F16], [F16])
    ops = {n.op_type for n in q.graph.node}
    assert ops & {"MatMulIntegerToFloat", "ConvInteger", "QLinearConv", "DynamicQuantizeLinear", "QuantizeLinear"}
    layer = next(n for n in q.graph.node if n.name == kept)
    weight = next(n for n in q.graph.node if n.output[0] == layer.input[1])  # Cast(float16 weight)
    assert weight.op_type == "Cast" and {t.name: t.data_type for t in q.graph.initializer}[weight.input[0]] == F16
    readers = {i: n for n in q.graph.node for i in n.input}
    for t in q.graph.initializer:  # float32 is left only where quantization reads it (scales, int8 biases)
        if t.data_type == F32 and np.prod(t.dims) >= 16:
            assert readers[t.name].domain == "com.microsoft" or readers[t.name].op_type in ("QuantizeLinear", "DequantizeLinear"), t.name
    assert out.stat().st_size <= model.stat().st_size
    fid = validate(model, out, data).outputs[0]  # the float16 model run by onnxruntime is the reference
    assert fid.cosine_mean >= MIN_COSINE and fid.cosine_min >= MIN_COSINE - 0.01
    assert fid.top1_agreement >= 0.9


def test_quantize_mixed_precision_model(tmp_path):
    model, data = _write(tmp_path, mixed_mlp(), "mixed", (16,))
    out = tmp_path / "q.onnx"
    res = _cli("quantize", model, "-o", out, "--calibration", data, "--families", "all")
    assert res.exit_code == 0, res.output
    assert _elem_types(onnx.load(str(out))) == ([F16], [F16])
    assert validate(model, out, data).outputs[0].cosine_mean >= MIN_COSINE


def test_prune_and_optimize_keep_float16_io(tmp_path):
    model, data = _write(tmp_path, half_cnn(), "cnn", (3, 16, 16))
    # a random CNN cut by a quarter may fall below prune's fidelity floor: allowed, written with exit 3
    for args in (["prune", model, "-o", tmp_path / "p.onnx", "--sparsity", "0.25", "--data", data, "--allow-degraded"],
                 ["optimize", model, "-o", tmp_path / "o.onnx"]):
        res = _cli(*args)
        assert res.exit_code in ((0, 3) if args[0] == "prune" else (0,)), res.output
        written = Path(args[3])
        assert _elem_types(onnx.load(str(written))) == ([F16], [F16])
        assert _weight_bytes(written) <= _weight_bytes(model)
        assert validate(model, written, data).outputs[0].cosine_mean >= (0.9 if args[0] == "prune" else 0.9999)


def half_embedding() -> onnx.ModelProto:
    """ids[N,S] → Gather(table [500,64] float16, near rank 24) → MatMul(64x16) → y[N,S,16], float16."""
    rng = np.random.default_rng(4)
    table = rng.standard_normal((500, 24)) @ rng.standard_normal((24, 64)) / 8 + 0.01 * rng.standard_normal((500, 64))
    inits = {"table": table.astype(np.float16),  # rank 24 plus noise: rank 48 keeps it
             "w": (rng.standard_normal((64, 16)) / 8).astype(np.float16)}
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["y"])]
    return _model(nodes, [vinfo("ids", ["N", "S"], TensorProto.INT64)], [vinfo("y", ["N", "S", 16], F16)], inits)


@pytest.mark.parametrize("args", [["--bits", "8"], ["--rank", "48"]])
def test_reduce_embeddings_keeps_float16_io_and_float16_factors(tmp_path, args):
    model = tmp_path / "emb.onnx"
    onnx.save(half_embedding(), str(model))
    data = tmp_path / "ids.npz"
    np.savez(data, ids=np.random.default_rng(6).integers(0, 500, (16, 1, 12)).reshape(16, 12))
    out = tmp_path / "r.onnx"
    res = _cli("reduce-embeddings", model, "-o", out, *args)
    assert res.exit_code == 0, res.output
    r = onnx.load(str(out))
    assert _elem_types(r) == ([TensorProto.INT64], [F16])
    assert _weight_bytes(out) < _weight_bytes(model)
    if "--rank" in args:  # the factors left float are stored in float16
        assert {t.data_type for t in r.graph.initializer if len(t.dims) == 2} == {F16}
    assert validate(model, out, data).outputs[0].cosine_min >= 0.995


def test_validate_float16_against_its_float32_original(tmp_path):
    f32, data = _write(tmp_path, half_mlp(np.float32), "mlp32", (64,))
    f16 = tmp_path / "mlp16.onnx"
    onnx.save(half_mlp(), str(f16))  # the same weights rounded to float16
    for ref, cand in ((f32, f16), (f16, f32)):
        res = _cli("validate", ref, cand, "--data", data)
        assert res.exit_code == 0, res.output
        assert validate(ref, cand, data).outputs[0].cosine_min >= 0.999


@pytest.mark.parametrize("cmd", ["quantize", "prune", "optimize", "reduce-embeddings", "validate"])
def test_bfloat16_model_refused_in_one_line_before_any_work(tmp_path, cmd):
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [vinfo("x", ["N", 8], TensorProto.BFLOAT16)], [vinfo("y", ["N", 8], TensorProto.BFLOAT16)],
                              [helper.make_tensor("w", TensorProto.BFLOAT16, [8, 8], np.eye(8).ravel().tolist())])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = tmp_path / "bf16.onnx"
    onnx.save(m, str(model))
    data = tmp_path / "d.npz"
    np.savez(data, x=np.ones((2, 8), np.float32))
    out = tmp_path / "out.onnx"
    args = {"quantize": ["--calibration", data], "prune": ["--sparsity", "0.5", "--data", data], "optimize": [],
            "reduce-embeddings": ["--bits", "8"]}
    res = _cli(cmd, model, *([model, "--data", data] if cmd == "validate" else ["-o", out, *args[cmd]]))
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "bfloat16" in lines[0], res.stderr
    assert "internal error" not in lines[0] and not out.exists()


def test_lift_on_silero_vad_fp16_matches_the_float32_original(tmp_path):
    """A real float16 model with If subgraphs (silero-vad through onnxruntime's float16
    converter): lifted, every float inside is float32, the interface stays float16, and the
    speech probabilities match the float32 model the wheel ships."""
    from zoo import ZOO, outputs, pooled_cosine, silero_dir

    model, data = ZOO["silero_vad_fp16"].build(tmp_path)
    lifted = tmp_path / "lifted.onnx"
    out, _ = _lifted(onnx.load(str(model)))
    onnx.save(out, str(lifted))
    assert _elem_types(out) == ([F16, F16, TensorProto.INT64], [F16, F16])
    subgraphs = [a.g for n in out.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    assert subgraphs and all(F16 not in _all_float_types(onnx.helper.make_model(g)) for g in subgraphs)
    _, ref = outputs(silero_dir() / "silero_vad.onnx", data, limit=12)
    _, got = outputs(lifted, data, limit=12)
    assert pooled_cosine(ref[0], got[0]) >= 0.999  # speech probability of each chunk
    assert max(float(np.abs(r - g.astype(np.float32)).max()) for r, g in zip(ref[0], got[0])) < 5e-3


def test_lift_keeps_an_overridable_float16_initializer_an_input_that_is_read():
    proto = half_mlp()
    w0 = next(t for t in proto.graph.initializer if t.name == "w0")
    proto.graph.input.append(vinfo("w0", list(w0.dims), F16))  # a default the caller may override (IR >= 4)
    out, _ = _lifted(proto)
    assert [(v.name, v.type.tensor_type.elem_type) for v in out.graph.input] == [("x", F16), ("w0", F16)]
    assert {t.name: t.data_type for t in out.graph.initializer}["w0"] == F16
    x = _x((3, 64))
    other = np.zeros((64, 128), np.float16)
    np.testing.assert_array_equal(run_ort(out, {"x": x, "w0": other})[0], run_ort(proto, {"x": x, "w0": other})[0])
    assert not np.array_equal(run_ort(out, {"x": x, "w0": other})[0], run_ort(out, {"x": x})[0])


def test_bench_runs_a_float32_model_and_its_float16_export_on_one_feed(tmp_path):
    f32, data = _write(tmp_path, half_mlp(np.float32), "mlp32", (64,))
    f16 = tmp_path / "mlp16.onnx"
    onnx.save(half_mlp(), str(f16))
    for extra in ([], ["--data", data]):  # a made-up feed from the first model, or DATA: cast for each model
        for first, second in ((f32, f16), (f16, f32)):
            res = _cli("bench", first, second, "--runs", "3", "--warmup", "1", *extra)
            assert res.exit_code == 0, res.output
            assert str(second) in res.output


def test_a_float16_quantize_that_keeps_every_layer_float_writes_the_model_as_given(tmp_path):
    """Nothing int8 (a fidelity floor no int8 layer meets): the float copy would carry Casts in front of
    float16 weights and be bigger, so the model as given is what comes back."""
    from edgecomp.data import StepData
    from edgecomp.io import load_model
    from edgecomp.quantize import run
    from edgecomp.quantize.options import QuantizeOptions

    model, data = _write(tmp_path, half_mlp(), "mlp", (64,))
    res = run(load_model(model), QuantizeOptions(families="all", min_cosine=1.0), StepData(calibration=str(data)))
    assert not res.evidence["int8 layers"] and "the model as given" in res.summary["written"]
    from edgecomp.io import to_proto

    written = to_proto(res.model)
    assert _weight_bytes(written) == _weight_bytes(onnx.load(str(model)))
    assert _elem_types(written) == ([F16], [F16])
