"""bench --profile: the per-op-type aggregation of onnxruntime's trace (exact on a synthetic trace),
the op times adding up to the measured total, and the CLI side by side on two inline models."""

import json
import tempfile

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from click.testing import CliRunner

from edgecomp.cli import cli
from edgecomp.measure.profile import BETWEEN_KERNELS, aggregate, profile_models, side_by_side_rows


def _session(name, ts, dur):
    return {"cat": "Session", "name": name, "ts": ts, "dur": dur, "ph": "X", "args": {}}


def _node(name, op, ts, dur):
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "ph": "X", "args": {"op_name": op}}


def _trace():
    """One warmup run (ts 100) and two timed runs (ts 1000, 2000); times in microseconds."""
    return [
        _session("session_initialization", 0, 90),
        _node("mm0", "MatMul", 101, 500), _node("act", "Relu", 601, 50), _session("model_run", 100, 600),
        _node("mm0", "MatMul", 1001, 300), _node("mm1", "MatMul", 1301, 100), _node("act", "Relu", 1401, 40),
        {"cat": "Node", "name": "act_fence_before", "ts": 1400, "dur": 1, "args": {"op_name": "Relu"}},
        _session("model_run", 1000, 500),
        _node("mm0", "MatMul", 2001, 500), _node("mm1", "MatMul", 2501, 100), _node("act", "Relu", 2601, 60),
        _node("sm", "Softmax", 2661, 140),
        _session("model_run", 2000, 900),
    ]


def test_aggregation_of_a_synthetic_trace_is_exact():
    p = aggregate(_trace(), "m", skip_runs=1, top=2)
    assert p.runs == 2
    assert p.total_ms == pytest.approx((500 + 900) / 2 / 1e3)
    assert p.kernel_ms == pytest.approx((440 + 800) / 2 / 1e3)
    ops = {o.op_type: o for o in p.ops}
    assert [o.op_type for o in p.ops] == ["MatMul", "Softmax", "Relu"]  # slowest first
    assert ops["MatMul"].ms == pytest.approx(1.0 / 2) and ops["MatMul"].count == 2.0
    assert ops["Relu"].ms == pytest.approx(0.1 / 2) and ops["Relu"].count == 1.0
    assert ops["Softmax"].ms == pytest.approx(0.07) and ops["Softmax"].count == 0.5
    assert ops["MatMul"].share == pytest.approx(0.5 / 0.7)
    assert [(n.node, n.ms) for n in p.nodes] == [("mm0", pytest.approx(0.4)), ("mm1", pytest.approx(0.1))]
    assert p.between_ms == pytest.approx(0.7 - 0.62)
    assert p.run_ms == pytest.approx([0.5, 0.9]) and p.run_kernel_ms == pytest.approx([0.44, 0.8])
    # without skipping, the warmup run counts too
    assert aggregate(_trace(), skip_runs=0).total_ms == pytest.approx(2.0 / 3)


def test_control_flow_nodes_count_their_own_time_not_their_bodies():
    """An If's event spans its branch's nodes, which have events too: only its own 50 us count,
    and a Loop nested in the branch (its body: one Add) counts its own 20 us."""
    trace = [_node("if", "If", 100, 500), _node("b/mm", "MatMul", 110, 200), _node("b/loop", "Loop", 320, 250),
             _node("b/loop/add", "Add", 330, 230), _node("after", "Relu", 601, 100), _session("model_run", 99, 700)]
    p = aggregate(trace)
    ops = {o.op_type: o.ms * 1e3 for o in p.ops}
    assert ops == pytest.approx({"If": 50.0, "MatMul": 200.0, "Loop": 20.0, "Add": 230.0, "Relu": 100.0})
    assert p.kernel_ms == pytest.approx(0.6) and p.kernel_ms <= p.total_ms


def test_side_by_side_rows_give_ratios_to_the_first_model():
    a = aggregate(_trace(), "a.onnx", skip_runs=1)
    b = aggregate([e for e in _trace() if "mm1" not in e["name"]], "b.onnx", skip_runs=1)
    rows = {r["op type"]: r for r in side_by_side_rows([a, b])}
    assert list(rows)[-2:] == [BETWEEN_KERNELS, "total"]
    assert rows["MatMul"]["1:a.onnx ms"] == pytest.approx(0.5)
    assert rows["MatMul"]["2:b.onnx ms"] == pytest.approx(0.4)
    assert rows["MatMul"]["ratio 2/1"] == pytest.approx(0.8)
    assert rows["MatMul"]["nodes/run"] == "2 / 1"
    assert rows["total"]["ratio 2/1"] == pytest.approx(1.0)
    # each model's rows add up to its measured total
    for label, p in (("1:a.onnx ms", a), ("2:b.onnx ms", b)):
        assert sum(r[label] for k, r in rows.items() if k != "total") == pytest.approx(p.total_ms)


def _mlp(path, act="Relu", width=512, batch=128):
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), f"w{i}")
             for i in range(2)]
    nodes = [oh.make_node("MatMul", ["x", "w0"], ["y"], name="mm0"), oh.make_node(act, ["y"], ["r"], name="act"),
             oh.make_node("MatMul", ["r", "w1"], ["z"], name="mm1")]
    g = oh.make_graph(nodes, "mlp", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, width])],
                      [oh.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)], inits)
    onnx.save(oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)]), str(path))
    return path


def test_op_times_add_up_to_the_measured_total(tmp_path, monkeypatch):
    """The op types of a compute-bound model add up to its measured run time within 10%. The total
    is the profiler's own model_run duration of the same runs (the honest one: bench's latency
    comes from other, unprofiled runs, and Python's wall time adds the binding's overhead). Per
    run, and the median over runs: a run preempted by another process on this shared machine
    (a ~5 ms stall) lands between kernels as often as inside one."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    (p,) = profile_models([_mlp(tmp_path / "a.onnx")], warmup=2, runs=15)
    assert list(scratch.iterdir()) == []  # the trace's temporary folder is gone
    assert p.runs == len(p.run_ms) == 15
    assert sum(o.ms for o in p.ops) == pytest.approx(p.kernel_ms)
    assert sum(p.run_kernel_ms) / p.runs == pytest.approx(p.kernel_ms)
    assert {o.op_type for o in p.ops} == {"MatMul", "Relu"}
    coverage = np.array(p.run_kernel_ms) / np.array(p.run_ms)
    assert np.all(coverage <= 1.0)
    assert np.median(coverage) >= 0.9, coverage
    assert p.total_ms <= p.wall_ms


def test_cli_bench_profile_two_models_side_by_side(tmp_path):
    a, b = _mlp(tmp_path / "a.onnx", width=64, batch=4), _mlp(tmp_path / "b.onnx", "Sigmoid", width=64, batch=4)
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(cli, ["bench", str(a), str(b), "--profile", "--runs", "5", "--warmup", "1",
                                   "--json", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    text = res.output
    assert "where the time goes" in text and "ratio 2/1" in text and "slowest nodes of 2:" in text
    rows = {line.split()[0] for line in text.splitlines() if line.strip()}
    assert {"MatMul", "Relu", "Sigmoid", BETWEEN_KERNELS.split()[0], "total"} <= rows
    assert "latency above is from unprofiled runs" in text
    data = json.loads(out.read_text())
    assert [p["runs"] for p in data["profile"]] == [5, 5]
    assert [m["runs"] for m in data["models"]] == [5, 5]  # the timed runs are unchanged
    bad = CliRunner().invoke(cli, ["bench", str(a), "--profile", "--runs", "2", "--shape", "x=3x7"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1
    plain = CliRunner().invoke(cli, ["bench", str(a), "--runs", "2", "--warmup", "0"], catch_exceptions=False)
    assert "where the time goes" not in plain.output
