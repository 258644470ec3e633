"""What a model computes survives every command that writes one (issue 25 §1).

- a paddle-style CRNN whose output is declared ``[1, seqlen]`` but returns ``[T, 1, C]`` keeps
  returning ``[T, 1, C]`` through optimize, quantize, prune (with and without data),
  reduce-embeddings (a text model of the same kind) and the steps of convert, and each says once
  that the declaration is wrong;
- a cleanup that trusted the declaration again is refused by the guard, in one line, with
  nothing written;
- weights that are graph inputs with a default (overridable initializers) stay inputs through
  every command, and what is fed there is what the written model computes with (compared with
  onnxruntime on the original model fed the same value).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from zoo import OVERRIDABLE_WEIGHTS, overridable_cnn_proto, paddle_crnn_proto

from edgecomp.cli import cli

CRNN_OUT = "softmax_0.tmp_0"


def _session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _declared(path: Path) -> list:
    return [d.dim_value or d.dim_param for d in onnx.load(str(path)).graph.output[0].type.tensor_type.shape.dim]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _invoke(*args: str):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res


@pytest.fixture(scope="module")
def crnn(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crnn")
    onnx.save(paddle_crnn_proto(), folder / "crnn.onnx")
    rng = np.random.default_rng(1)
    x = np.clip(rng.standard_normal((6, 3, 32, 48)) * 0.5, -1, 1).astype(np.float32)  # T = 12
    np.savez(folder / "calib.npz", x=x)
    return folder / "crnn.onnx", folder / "calib.npz", x


def _crnn_outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    s = _session(path)
    return [s.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))]


@pytest.mark.parametrize("cmd", ["optimize", "quantize", "prune", "prune_data"])
def test_runtime_output_shape_survives_each_command(crnn, tmp_path, cmd):
    model, calib, x = crnn
    out = tmp_path / f"{cmd}.onnx"
    extra = {"optimize": [], "quantize": ["--calibration", calib, "--families", "all"],
             "prune": ["--sparsity", "0.3", "--allow-degraded"],
             "prune_data": ["--sparsity", "0.3", "--data", calib, "--allow-degraded"]}[cmd]
    res = _invoke(cmd.split("_")[0], model, "-o", out, *extra)
    # a random-weight CRNN cut by 30% may fall below prune's fidelity floor: written with exit 3 when allowed
    assert res.exit_code in ((0, 3) if cmd.startswith("prune") else (0,)), res.output
    ref, got = _crnn_outputs(model, x), _crnn_outputs(out, x)
    assert [g.shape for g in got] == [r.shape for r in ref] == [(12, 1, 40)] * len(x)
    assert _declared(out) == [1, "seqlen"]  # the declaration is the model's: left as it was, and reported
    warned = [line for line in res.stderr.splitlines() if f"output '{CRNN_OUT}' is declared [1, seqlen]" in line]
    fed = "[12, 1, 40]" if cmd in ("quantize", "prune_data") else "[56, 1, 40]"  # calibration, else synthesized (w 224)
    assert len(warned) == 1 and f"returns {fed}" in warned[0]
    if cmd == "optimize":
        assert max(np.abs(r - g).max() for r, g in zip(ref, got)) <= 1e-5
    elif cmd == "quantize":
        assert min(_cos(r, g) for r, g in zip(ref, got)) >= 0.98
        assert any(n.op_type in ("ConvInteger", "QLinearConv", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
                   or n.domain == "com.microsoft" for n in onnx.load(str(out)).graph.node)
    else:  # a pruned model changes values, not shapes; each time step is still a distribution
        assert all(np.allclose(g.sum(-1), 1.0, atol=1e-4) for g in got)


def test_prune_of_unnamed_nodes_keeps_the_runtime_shape(crnn, tmp_path):
    """Layers are planned by node name: a converter's unnamed nodes are named first (they all
    shared the name "" and the plan cut the classifier's outputs)."""
    model, calib, x = crnn
    proto = paddle_crnn_proto()
    for node in proto.graph.node:
        node.name = ""
    src, out = tmp_path / "unnamed.onnx", tmp_path / "unnamed.pruned.onnx"
    onnx.save(proto, src)
    res = _invoke("prune", src, "-o", out, "--sparsity", "0.3", "--data", calib)
    assert res.exit_code == 0, res.output
    assert [g.shape for g in _crnn_outputs(out, x)] == [(12, 1, 40)] * len(x)


def test_a_cleanup_that_trusts_the_declaration_is_refused(crnn, tmp_path, monkeypatch):
    """With the declared shapes left on for folding (the bug of issue 25), onnxscript flattens the
    output to [1, T*C]; the guard refuses in one line and nothing is written."""
    import edgecomp.passes.optimize_graph as og

    monkeypatch.setattr(og, "_detach_declared_shapes", lambda model: ([], {}))
    monkeypatch.setattr(og, "_restore_declared_shapes", lambda model, declared: None)
    out = tmp_path / "o.onnx"
    res = _invoke("optimize", crnn[0], "-o", out)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and not out.exists()
    assert lines[0].startswith("Error: the optimize result would compute something else: output 'softmax_0.tmp_0' "
                               "differs in shape: the model as loaded returns [56, 1, 40], the result [1, 2240] "
                               "(synthesized feed 0)")


def test_convert_steps_keep_the_runtime_shape(crnn, tmp_path, monkeypatch):
    """optimize, prune and quantize as recipe steps (export replaced by a copy of the ONNX file)."""
    import edgecomp.export
    from edgecomp.export import ExportResult, step_result
    from edgecomp.io import load_model
    from edgecomp.pipeline.convert import Source, convert
    from edgecomp.pipeline.recipe import parse_recipe

    model, calib, x = crnn

    def copy_export(out, values, *, spec=None, hf=None):  # convert exports in memory (out None) and saves
        return step_result(ExportResult(None, "copy", None, ["x"], [CRNN_OUT], 0.0, 0.0, model=load_model(model)))

    monkeypatch.setattr(edgecomp.export, "run", copy_export)
    recipe = parse_recipe({"steps": [{"step": "export"}, {"step": "optimize"},
                                     {"step": "prune", "sparsity": 0.25},
                                     {"step": "quantize", "families": "all"}]})
    res = convert(Source(spec="unused:factory"), recipe, tmp_path / "out", calibration=str(calib))
    ref = _crnn_outputs(model, x)
    models = [s.model for s in res.steps if s.step != "export"]
    assert len(models) == 3
    for path in models:
        got = _crnn_outputs(Path(path), x)
        assert [g.shape for g in got] == [r.shape for r in ref], path


# --- reduce-embeddings: a text model of the same kind -------------------------------------------

def _tagger(overridable: bool = False) -> onnx.ModelProto:
    """ids [1, seq] → token table [1200, 16] (+ an optional second table that is a graph input with a
    default) → MatMul to 8 tags → Transpose to [seq, 1, 8] → Reshape to its own run-time shape, the
    output declared [1, seqlen] (rank and sizes both wrong)."""
    rng = np.random.default_rng(0)
    w = {"tok": rng.standard_normal((1200, 16)).astype(np.float32), "proj": rng.standard_normal((16, 8)).astype(np.float32),
         "extra": rng.standard_normal((1200, 16)).astype(np.float32) * 0.5}
    nodes = [helper.make_node("Gather", ["tok", "ids"], ["e"], name="embed")]
    if overridable:
        nodes += [helper.make_node("Gather", ["extra", "ids"], ["e2"], name="embed_extra"),
                  helper.make_node("Add", ["e", "e2"], ["e_sum"], name="add_extra")]
    nodes += [helper.make_node("MatMul", ["e_sum" if overridable else "e", "proj"], ["m"], name="tags"),
              helper.make_node("Transpose", ["m"], ["t"], perm=[1, 0, 2], name="transpose"),
              helper.make_node("Shape", ["t"], ["s"], name="shape")]
    for i in range(3):
        nodes.append(helper.make_node("Slice", ["s", f"at{i}", f"at{i + 1}"], [f"d{i}"], name=f"dim{i}"))
        w[f"at{i}"] = np.array([i], np.int64)
    w["at3"] = np.array([3], np.int64)
    nodes += [helper.make_node("Concat", ["d0", "d1", "d2"], ["target"], axis=0, name="concat"),
              helper.make_node("Reshape", ["t", "target"], ["tags_out"], name="reshape")]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "seq"])]
    if overridable:
        inputs.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1200, 16]))
    else:
        del w["extra"]
    g = helper.make_graph(nodes, "tagger", inputs, [helper.make_tensor_value_info("tags_out", TensorProto.FLOAT, [1, "seqlen"])],
                          [numpy_helper.from_array(v, k) for k, v in w.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("overridable", [False, True])
def test_reduce_embeddings_keeps_shape_and_overridable_tables(tmp_path, overridable):
    src, out = tmp_path / "tagger.onnx", tmp_path / "tagger.emb.onnx"
    onnx.save(_tagger(overridable), src)
    res = _invoke("reduce-embeddings", src, "-o", out, "--bits", "8")
    assert res.exit_code == 0, res.output
    assert "declared [1, seqlen]" in res.stderr and "returns [128, 1, 8]" in res.stderr
    ids = np.random.default_rng(3).integers(0, 1200, (1, 9)).astype(np.int64)
    ref, got = _session(src), _session(out)
    r, g = ref.run(None, {"ids": ids})[0], got.run(None, {"ids": ids})[0]
    assert r.shape == g.shape == (9, 1, 8) and _cos(r, g) >= 0.999
    assert "tok" not in {t.name for t in onnx.load(str(out)).graph.initializer}  # the constant table was reduced
    if overridable:
        assert [i.name for i in got.get_overridable_initializers()] == ["extra"]
        alt = (np.random.default_rng(4).standard_normal((1200, 16)) * 0.5).astype(np.float32)
        r_fed, g_fed = ref.run(None, {"ids": ids, "extra": alt})[0], got.run(None, {"ids": ids, "extra": alt})[0]
        assert _cos(r_fed, g_fed) >= 0.999 and np.abs(g_fed - g).max() > 0.1  # what is fed is used


# --- overridable initializers through optimize, quantize, prune ---------------------------------

@pytest.fixture(scope="module")
def overridable(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ov")
    onnx.save(overridable_cnn_proto(), folder / "cnn.onnx")
    x = np.random.default_rng(2).standard_normal((10, 3, 16, 16)).astype(np.float32)
    np.savez(folder / "calib.npz", x=x)
    return folder / "cnn.onnx", folder / "calib.npz", x


#: per command: the least cosine between the written model's response to a fed weight (fed minus
#: default output) and the original's. 1e-5-exact for optimize; int8 and pruning move both.
RESPONSE_COS = {"optimize": 0.99999, "quantize": 0.99, "prune_data": 0.98}


@pytest.mark.parametrize("cmd", list(RESPONSE_COS))
def test_overridable_weights_stay_inputs_and_are_read(overridable, tmp_path, cmd):
    model, calib, x = overridable
    out = tmp_path / f"{cmd}.onnx"
    extra = {"optimize": [], "quantize": ["--calibration", calib, "--families", "all"],
             "prune_data": ["--sparsity", "0.3", "--data", calib]}[cmd]
    res = _invoke(cmd.split("_")[0], model, "-o", out, *extra)
    assert res.exit_code == 0, res.output
    ref, got = _session(model), _session(out)
    assert {i.name for i in got.get_overridable_initializers()} == set(OVERRIDABLE_WEIGHTS)
    defaults = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(model)).graph.initializer}
    rng = np.random.default_rng(7)
    for name in OVERRIDABLE_WEIGHTS:
        d = defaults[name]
        alt = (d * 0.8 + 0.1 * np.abs(d).mean() * rng.standard_normal(d.shape)).astype(np.float32)
        r0, r1 = ref.run(None, {"x": x})[0], ref.run(None, {"x": x, name: alt})[0]
        g0, g1 = got.run(None, {"x": x})[0], got.run(None, {"x": x, name: alt})[0]
        assert np.linalg.norm(g1 - g0) > 0.5 * np.linalg.norm(r1 - r0), f"{cmd}: what is fed to {name} is ignored"
        assert _cos(r1 - r0, g1 - g0) >= RESPONSE_COS[cmd], name
        if cmd == "optimize":
            assert np.abs(g1 - r1).max() <= 1e-5
    if cmd == "quantize":
        rows = res.stdout
        assert "fc1" in rows and "weight is a graph input (a default the caller may feed): kept float" in rows


def test_an_ir3_export_lists_weights_as_inputs_and_they_are_constants(tmp_path):
    """Before IR 4 every initializer is listed as an input and onnxruntime reads them as constants:
    they are quantized like any weight, and the written model (IR 4) has the one real input."""
    rng = np.random.default_rng(0)
    w = {"W1": rng.standard_normal((16, 32)).astype(np.float32), "W2": rng.standard_normal((32, 4)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"], name="fc1"), helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])] + [
        helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in w.items()]
    g = helper.make_graph(nodes, "ir3", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                          [numpy_helper.from_array(v, k) for k, v in w.items()])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 8)])
    proto.ir_version = 3
    src, out, calib = tmp_path / "ir3.onnx", tmp_path / "ir3.int8.onnx", tmp_path / "calib.npz"
    onnx.save(proto, src)
    x = rng.standard_normal((8, 16)).astype(np.float32)
    np.savez(calib, x=x)
    assert [i.name for i in _session(src).get_inputs()] == ["x"] and not _session(src).get_overridable_initializers()
    res = _invoke("quantize", src, "-o", out, "--calibration", calib, "--families", "all")
    assert res.exit_code == 0, res.output
    written = onnx.load(str(out))
    assert [i.name for i in written.graph.input] == ["x"] and "layers int8: 2" in res.stdout
    r, g_ = _session(src).run(None, {"x": x[:1]})[0], _session(out).run(None, {"x": x[:1]})[0]
    assert _cos(r, g_) >= 0.99
