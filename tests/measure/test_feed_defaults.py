"""Inputs a user's model declares without sizes: documented defaults, --value for inputs that
select behaviour, and inspect that works without shapes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from edgecomp.cli import cli
from edgecomp.data import InputSpec, feed_defaults, parse_value, synthesize_feed
from edgecomp.errors import DataError, OptionError
from tests.conftest import make_model, run_ort, save, vinfo


def _token_model(tmp_path):
    emb = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["h"]),
             helper.make_node("ReduceMean", ["h"], ["y"], axes=[1], keepdims=0)]
    m = make_model(nodes, [vinfo("input_ids", ["batch", "sequence"], TensorProto.INT64)], [vinfo("y", ["batch", 8])],
                   {"table": emb}, opset=17)
    return save(m, tmp_path / "tok.onnx")


def _branch_model(tmp_path):
    """y = x * 2 when sr == 16000, else x * 3 (a scalar input that selects a branch, like silero-vad's)."""
    two, three = (helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in (("two", 2.0), ("three", 3.0)))
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "c2"], ["t"])], "then", [], [vinfo("t", [1, 4])],
                               [two])
    then_g.initializer[0].name = "c2"
    else_g = helper.make_graph([helper.make_node("Mul", ["x", "c3"], ["e"])], "else", [], [vinfo("e", [1, 4])],
                               [three])
    else_g.initializer[0].name = "c3"
    nodes = [helper.make_node("Equal", ["sr", "k16"], ["is16"]),
             helper.make_node("If", ["is16"], ["y"], then_branch=then_g, else_branch=else_g)]
    m = make_model(nodes, [vinfo("x", [1, 4]), vinfo("sr", [], TensorProto.INT64)], [vinfo("y", [1, 4])],
                   {"k16": np.array(16000, np.int64)})
    return save(m, tmp_path / "branch.onnx")


def test_symbolic_dims_get_documented_defaults():
    specs = [InputSpec("input_ids", np.dtype(np.int64), ("batch", "sequence")),
             InputSpec("pixel_values", np.dtype(np.float32), ("batch", 3, "height", "width")),
             InputSpec("audio", np.dtype(np.float32), (None, "time"))]
    feed = synthesize_feed(specs)
    assert feed["input_ids"].shape == (1, 128) and feed["pixel_values"].shape == (1, 3, 224, 224)
    assert feed["audio"].shape == (1, 128)
    assert feed_defaults(specs) == ["batch 1", "sequence 128", "image side 224"]
    assert synthesize_feed(specs[1:2], image_size=96)["pixel_values"].shape == (1, 3, 96, 96)
    assert feed_defaults(specs[:1], shapes={"input_ids": (2, 16)}) == []


def test_values_fix_scalars_and_fill_inputs(tmp_path):
    specs = [InputSpec("sr", np.dtype(np.int64), ()), InputSpec("state", np.dtype(np.float32), (2, 1, 3))]
    feed = synthesize_feed(specs, values=dict([parse_value("sr=16000"), parse_value("state=0")]))
    assert feed["sr"].shape == () and int(feed["sr"]) == 16000 and feed["sr"].dtype == np.int64
    assert feed["state"].shape == (2, 1, 3) and not feed["state"].any()
    with pytest.raises(DataError, match="wants int64"):
        synthesize_feed(specs, values={"sr": np.array([0.5])})
    with pytest.raises(DataError, match=r"^values name unknown input\(s\) \['rate'\]"):
        synthesize_feed(specs, values={"rate": np.array([1.0])})
    with pytest.raises(OptionError, match="^values 'sr' is not NAME=VALUES"):
        parse_value("sr")
    res = CliRunner().invoke(cli, ["bench", str(_token_model(tmp_path)), "--value", "sr"])
    assert res.exit_code == 1 and res.stderr.startswith("Error: --value 'sr' is not NAME=VALUES"), res.output


def test_bench_prints_the_defaults_it_assumed(tmp_path):
    path = _token_model(tmp_path)
    res = CliRunner().invoke(cli, ["bench", str(path), "--runs", "3", "--warmup", "1", "--json", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    assert "input_ids=1x128" in res.output and "assumed batch 1, sequence 128" in res.output
    assert json.loads((tmp_path / "b.json").read_text())["feed_shapes"]["input_ids"] == [1, 128]


def test_value_selects_the_branch_and_inspect_runs_without_shapes(tmp_path):
    path = _branch_model(tmp_path)
    x = np.ones((1, 4), np.float32)
    assert run_ort(path, {"x": x, "sr": np.array(16000, np.int64)})[0][0, 0] == 2.0
    feed = synthesize_feed([InputSpec("sr", np.dtype(np.int64), ())], values={"sr": np.array([16000.0])})
    assert run_ort(path, {"x": x, **feed})[0][0, 0] == 2.0
    res = CliRunner().invoke(cli, ["inspect", str(path), "--value", "sr=16000"])
    assert res.exit_code == 0, res.output
    assert "If" in res.output and "MACs:" in res.output


def test_inspect_without_a_runnable_feed_still_lists_ops_and_parameters(tmp_path):
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
    m = make_model(nodes, [vinfo("x", ["batch", "n"])], [vinfo("y", [3, 5])], {"shape": np.array([3, 5], np.int64)})
    path = save(m, tmp_path / "rs.onnx")  # 1x128 cannot be reshaped to 3x5
    res = CliRunner().invoke(cli, ["inspect", str(path)])
    assert res.exit_code == 0, res.output
    assert "MACs: not counted" in res.output and "Reshape" in res.output and "parameters:" in res.output
