"""``--value NAME=V`` on quantize, prune and optimize: layers behind an If on a mode input are
inlined (SpecializeInputsPass), then quantized or pruned like any other; the written model keeps
the input, reports another value as an error, and records the specialization. silero-vad's
release file (convs inside an If on ``sr``) quantizes with ``--value sr=16000``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgecomp.cli import cli
from edgecomp.passes.specialize_inputs import FIXED_INPUTS_KEY
from tests.conftest import make_model, run_ort, vinfo

_SILERO_SPEC = importlib.util.find_spec("silero_vad")
SILERO = Path(_SILERO_SPEC.origin).parent / "data" if _SILERO_SPEC else None


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def conv_mode_model() -> onnx.ModelProto:
    """y = Conv(Relu(Conv(x, W1)), W2) when mode == 1, else Conv(x, W3) (pad 2): different layers
    in each branch, all inside the If."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 2, 3)).astype(np.float32) * 0.5
    w2 = rng.standard_normal((3, 8, 1)).astype(np.float32) * 0.5
    w3 = rng.standard_normal((3, 2, 5)).astype(np.float32) * 0.5
    out = [vinfo("ty", [1, 3, 30])]
    then = helper.make_graph([helper.make_node("Conv", ["x", "w1"], ["t1"], name="then_conv1"),
                              helper.make_node("Relu", ["t1"], ["t2"]),
                              helper.make_node("Conv", ["t2", "w2"], ["ty"], name="then_conv2")], "then", [], out,
                             [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    els = helper.make_graph([helper.make_node("Conv", ["x", "w3"], ["e1"], pads=[0, 0], name="else_conv"),
                             helper.make_node("Slice", ["e1", "s0", "s1", "ax"], ["ey"])], "else", [],
                            [vinfo("ey", [1, 3, 30])], [numpy_helper.from_array(w3, "w3")])
    nodes = [helper.make_node("Equal", ["mode", "one"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=els, name="mode_if")]
    inits = {"one": np.array(1, np.int64), "s0": np.array([0], np.int64), "s1": np.array([30], np.int64),
             "ax": np.array([2], np.int64)}
    return make_model(nodes, [vinfo("x", [1, 2, 32]), vinfo("mode", [], TensorProto.INT64)], [vinfo("y", [1, 3, 30])],
                      inits)


@pytest.fixture
def mode_files(tmp_path):
    src = tmp_path / "mode.onnx"
    onnx.save(conv_mode_model(), str(src))
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(10):
        np.savez(data / f"{i:02d}.npz", x=rng.standard_normal((1, 2, 32)).astype(np.float32), mode=np.array(1))
    return src, data


def _cos(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _check_written(src: Path, out: Path, data: Path, min_cos: float):
    m = onnx.load(str(out))
    assert "If" not in [n.op_type for n in m.graph.node]
    assert [i.name for i in m.graph.input] == ["x", "mode"]
    assert {p.key: p.value for p in m.metadata_props}[FIXED_INPUTS_KEY] == "mode=1"
    for f in sorted(data.glob("*.npz"))[:4]:
        feed = {k: v for k, v in np.load(f).items()}
        assert _cos(run_ort(onnx.load(str(src)), feed)[0], run_ort(m, feed)[0]) >= min_cos
    with pytest.raises(Exception, match="guard: input mode must be 1"):
        run_ort(m, {**feed, "mode": np.array(0, np.int64)})
    return m


def test_quantize_prune_optimize_with_a_fixed_mode(mode_files, tmp_path):
    src, data = mode_files
    res = invoke("quantize", src, "-o", tmp_path / "q.onnx", "--calibration", data, "--value", "mode=1",
                 "--families", "all", "--json", tmp_path / "q.json")
    assert res.exit_code == 0, res.output
    assert "SpecializeInputsPass: modified" in res.output and "mode_if" in res.output
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["specialize"]["summary"]["Ifs inlined"] == 1
    assert {r["layer"]: r["decision"] for r in report["tables"]["layers"]}.get("then_conv2") == "int8"
    q = _check_written(src, tmp_path / "q.onnx", data, 0.99)
    assert any(n.op_type in ("QuantizeLinear", "QLinearConv", "ConvInteger") for n in q.graph.node)

    res = invoke("prune", src, "-o", tmp_path / "p.onnx", "--sparsity", "0.5", "--data", data, "--value", "mode=1",
                 "--allow-degraded")
    assert res.exit_code in (0, 3), res.output  # half of a random conv's channels: may fall below prune's floor
    p = _check_written(src, tmp_path / "p.onnx", data, 0.5)  # half the channels cut: close, not equal
    w1 = next(i for i in p.graph.initializer if numpy_helper.to_array(i).ndim == 3 and i.dims[1] == 2)
    assert w1.dims[0] < 8

    res = invoke("optimize", src, "-o", tmp_path / "o.onnx", "--value", "mode=1")
    assert res.exit_code == 0, res.output
    _check_written(src, tmp_path / "o.onnx", data, 0.999999)
    res = invoke("bench", tmp_path / "o.onnx", "--runs", "3", "--warmup", "1")  # no --value: the model's own
    assert res.exit_code == 0 and "guard" not in res.output, res.output


def test_without_the_value_the_layers_stay_out_of_reach(mode_files, tmp_path):
    src, data = mode_files
    hint = "(an If depends on input mode: --value mode=V fixes it and inlines the taken branch)"
    res = invoke("quantize", src, "-o", tmp_path / "q.onnx", "--calibration", data)
    assert res.exit_code != 0 and "inside an If subgraph" in res.output and hint in res.output, res.output
    res = invoke("prune", src, "-o", tmp_path / "p.onnx", "--data", data)
    assert res.exit_code != 0 and "layers in subgraphs are not pruned" in res.output and hint in res.output


@pytest.mark.parametrize("value, message", [
    ("rate=1", "value rate: not an input of the model; the model's inputs are x, mode"),
    ("mode=0.5", "value mode: the input is int64; give integers in"),
    ("mode=1,1", "value mode: the input has shape [] (1 values); give one value or 1, got 2"),
    ("mode", "'mode' is not NAME=VALUES"),
])
def test_bad_values_are_one_line(mode_files, tmp_path, value, message):
    src, data = mode_files
    for cmd in (["optimize"], ["quantize", "--calibration", data], ["prune", "--data", data]):
        res = invoke(*cmd[:1], src, "-o", tmp_path / "x.onnx", *cmd[1:], "--value", value)
        assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, (cmd, res.output)
        assert len(res.output.strip().splitlines()) == 1, res.output
        assert not (tmp_path / "x.onnx").exists()


def test_a_value_with_no_effect_warns(tmp_path):
    m = make_model([helper.make_node("Mul", ["x", "gain"], ["y"])], [vinfo("x", [2]), vinfo("gain", [])],
                   [vinfo("y", [2])])
    onnx.save(m, str(tmp_path / "m.onnx"))
    res = CliRunner().invoke(cli, ["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"),
                                                   "--value", "gain=2"])
    assert res.exit_code == 0
    assert res.stderr.strip() == ("warning: --value gain: decides no If, folds nothing and fixes no shape; "
                                  "the input is left as it was")
    assert not onnx.load(str(tmp_path / "o.onnx")).metadata_props


@pytest.mark.skipif(SILERO is None or not (SILERO / "silero_vad.onnx").exists(), reason="silero_vad not installed")
def test_silero_vad_quantizes_with_a_fixed_sample_rate(tmp_path):
    """Refused without --value (convs inside the If on sr); with --value sr=16000 the convs are in
    the main graph, quantized, and the streamed speech probability follows float's."""
    import onnxruntime as ort

    from tests.zoo import speech_like

    audio = speech_like(12 * 512 / 16000, seed=3)
    ref = ort.InferenceSession(str(SILERO / "silero_vad.onnx"), providers=["CPUExecutionProvider"])
    data = tmp_path / "chunks"
    data.mkdir()
    state, context, feeds = np.zeros((2, 1, 128), np.float32), np.zeros((1, 64), np.float32), []
    for i in range(12):  # silero's own streaming: 64 samples of context + a 512-sample chunk
        x = np.concatenate([context, audio[None, i * 512:(i + 1) * 512]], axis=1)
        feeds.append({"input": x, "state": state, "sr": np.array(16000, np.int64)})
        np.savez(data / f"{i:02d}.npz", **feeds[-1])
        state, context = ref.run(None, feeds[-1])[1], x[:, -64:]
    res = invoke("quantize", SILERO / "silero_vad.onnx", "-o", tmp_path / "q.onnx", "--calibration", data,
                 "--value", "sr=16000", "--json", tmp_path / "q.json")
    assert res.exit_code == 0, res.output
    layers = json.loads((tmp_path / "q.json").read_text())["tables"]["layers"]
    assert sum(r["op"] == "Conv" for r in layers) == 6 and any(r["decision"] == "int8" for r in layers)
    q = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    p_ref = np.array([ref.run(None, f)[0].item() for f in feeds])
    p_q = np.array([q.run(None, f)[0].item() for f in feeds])  # fed the float states: one-step error
    assert ((p_q > 0.5) == (p_ref > 0.5)).all() and p_ref.max() > 0.5 > p_ref.min(), (p_ref, p_q)
    assert _cos(p_q, p_ref) >= 0.99 and np.abs(p_q - p_ref).max() < 0.15, (p_ref, p_q)
    with pytest.raises(Exception, match="guard: input sr must be 16000"):
        q.run(None, {**feeds[0], "sr": np.array(8000, np.int64)})


def test_data_for_another_value_is_one_line(mode_files, tmp_path):
    """DATA feeding mode=1 to a model specialized with --value mode=0: refused before any work."""
    src, data = mode_files
    for cmd in (["quantize", "--calibration", data], ["prune", "--data", data]):
        res = invoke(cmd[0], src, "-o", tmp_path / "x.onnx", *cmd[1:], "--value", "mode=0")
        assert res.exit_code != 0 and "Traceback" not in res.output, res.output
        assert res.output.strip().splitlines()[-1] == (
            "Error: DATA array 'mode' holds [1] but the model was specialized with mode=0 (--value), which it accepts "
            "alone; give DATA for that value or specialize with the value the DATA holds"), (cmd, res.output)
        assert not (tmp_path / "x.onnx").exists()
