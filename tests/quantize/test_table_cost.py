"""The int8 embedding table kept only where it pays (edgecomp.quantize.cost_aware): the table
decision follows the whole-model timing (stubbed here: what it returns is the measurement) both
ways, --embeddings keeps int8 without timing, the report says what was decided and why, and the
written model computes what onnxruntime and a numpy reference say it should.

Also the family timing's round size: it is sized from a warm run, not from the session's creation."""

import time

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgecomp.quantize.families as families
from edgecomp.data import Dataset
from edgecomp.embeddings.quantize_embeddings import dequantize_rows, quantize_rows
from edgecomp.measure.bench import RatioEstimate
from edgecomp.quantize import quantize_model, speed
from edgecomp.quantize.cost_aware import int8_tables_if_they_pay
from edgecomp.quantize.options import QuantizeOptions
from edgecomp.quantize.quantize_static import QUANTIZED_OPS
from edgecomp.targets import host_isa

VOCAB, DIM, OUT, SEQ = 1200, 32, 16, 8
SLOWER = RatioEstimate("written int8", 1.05, 1.03, 1.07, 6)  # int8 table slower beyond noise
WITHIN_NOISE = RatioEstimate("written int8", 1.01, 0.99, 1.03, 12)  # interval on 1.0
FASTER = RatioEstimate("written int8", 0.9, 0.85, 0.95, 4)
MARGINAL = RatioEstimate("written int8", 1.003, 1.001, 1.005, 12)  # beyond noise, under the 0.5% margin


def _weights():
    rng = np.random.default_rng(0)
    return rng.normal(0, 1, (VOCAB, DIM)).astype(np.float32), rng.normal(0, 0.2, (DIM, OUT)).astype(np.float32)


def _proto() -> onnx.ModelProto:
    table, w = _weights()
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="gather"),
         helper.make_node("MatMul", ["emb", "w"], ["y"], name="proj")],
        "embed", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, SEQ])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, OUT])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _model() -> ir.Model:
    return ir.from_proto(_proto())


def _feed(seed: int = 1) -> dict[str, np.ndarray]:
    return {"ids": np.random.default_rng(seed).integers(0, VOCAB, (1, SEQ)).astype(np.int64)}


def _run(model: ir.Model, feed) -> np.ndarray:
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _int8_tables(model: ir.Model) -> list[str]:
    return [v.name for v in model.graph.initializers.values()
            if v.const_value is not None and v.const_value.dtype == ir.DataType.INT8 and v.const_value.shape[0] == VOCAB]


class _Timing:
    """Stands in for speed.time_against_input: ``table`` when the two models differ by an int8
    table only (the table decision), ``whole`` when the reference has no int8 layer (the whole-model
    check against the input); records which was asked."""

    def __init__(self, table: RatioEstimate, whole: RatioEstimate = FASTER):
        self.table, self.whole, self.calls = table, whole, []

    def __call__(self, given, written, feed, threads, device=None):
        quantized_given = any(n.op_type in QUANTIZED_OPS for n in given.graph)
        kind = "table" if (quantized_given or not any(n.op_type in QUANTIZED_OPS for n in written.graph)) \
            and _int8_tables(written) and not _int8_tables(given) else "whole"
        self.calls.append(kind)
        return self.table if kind == "table" else self.whole


@pytest.fixture
def calibration(tmp_path):
    for i in range(8):
        np.savez(tmp_path / f"{i:02d}.npz", **_feed(10 + i))
    return Dataset(tmp_path)


def test_table_kept_float_when_its_gather_is_slower(monkeypatch):
    timing = _Timing(SLOWER)
    monkeypatch.setattr(speed, "time_against_input", timing)
    model, feed = _model(), _feed()
    choice = int8_tables_if_they_pay(model, feed, QuantizeOptions(isa=host_isa()), None)
    assert timing.calls == ["table"]
    assert not _int8_tables(choice.model) and choice.estimate is SLOWER
    row = next(r for r in choice.rows if r["table"] == "table")
    assert row["decision"] == "float" and "1.050 [1.030, 1.070]" in row["reason"] and "bytes after" not in row
    assert choice.line.startswith("float") and "slower beyond noise" in choice.line and "--embeddings" in choice.line
    table, w = _weights()
    np.testing.assert_allclose(_run(choice.model, feed), table[feed["ids"]] @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("estimate", [WITHIN_NOISE, FASTER, MARGINAL], ids=["within-noise", "faster", "marginal"])
def test_table_kept_int8_when_not_slower_beyond_noise(monkeypatch, estimate):
    monkeypatch.setattr(speed, "time_against_input", _Timing(estimate))
    model, feed = _model(), _feed()
    choice = int8_tables_if_they_pay(model, feed, QuantizeOptions(isa=host_isa()), None)
    assert _int8_tables(choice.model)
    assert ("under 0.5% slower" if estimate is MARGINAL else "not slower beyond noise") in choice.line
    assert f"{estimate.ratio:.3f}" in choice.line and "1 table(s) int8, 110 KB smaller" in choice.line
    table, w = _weights()
    deq = dequantize_rows(quantize_rows(table, 8, None), 8, None, DIM)  # what the int8 table computes
    np.testing.assert_allclose(_run(choice.model, feed), deq[feed["ids"]] @ w, rtol=1e-5, atol=1e-5)
    assert not np.allclose(deq, table, atol=1e-4)  # the reference above is not the float one
    assert model.graph.initializers["table"].const_value.dtype == ir.DataType.FLOAT  # input untouched


def test_asked_for_size_keeps_int8_untimed(monkeypatch):
    timing = _Timing(SLOWER)
    monkeypatch.setattr(speed, "time_against_input", timing)
    choice = int8_tables_if_they_pay(_model(), _feed(), QuantizeOptions(isa=host_isa()), True)
    assert timing.calls == [] and _int8_tables(choice.model)
    assert "--embeddings asked" in choice.line


@pytest.mark.parametrize("table_timing", [SLOWER, FASTER], ids=["gather-slower", "gather-pays"])
def test_quantize_reports_the_table_decision(monkeypatch, calibration, table_timing):
    timing = _Timing(table_timing)
    monkeypatch.setattr(speed, "time_against_input", timing)
    res = quantize_model(_model(), calibration, QuantizeOptions(isa=host_isa(), families="all"))
    assert timing.calls == ["table", "whole"] and res.plan  # the table decided first, then the whole model
    line = res.summary["embedding tables"]
    row = next(r for r in res.embeddings if r["table"] == "table")
    if table_timing is SLOWER:
        assert not _int8_tables(res.model) and row["decision"] == "float" and line.startswith("float")
    else:
        assert _int8_tables(res.model) and row["decision"] == "int8" and line.startswith("1 table(s) int8")
    feed = _feed(10)  # a calibration sample: its rows are inside the calibrated range (no clipping)
    table, w = _weights()
    ref = table[feed["ids"]] @ w
    got = _run(res.model, feed)  # int8 MatMul (and table): close to float, not equal
    cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cos > 0.999 and np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_no_embeddings_is_never_timed(monkeypatch, calibration):
    timing = _Timing(FASTER)
    monkeypatch.setattr(speed, "time_against_input", timing)
    res = quantize_model(_model(), calibration, QuantizeOptions(isa=host_isa(), families="all", embeddings=False))
    assert timing.calls == ["whole"] and not _int8_tables(res.model) and "embedding tables" not in res.summary


def test_family_rounds_sized_from_a_warm_run_not_the_session(monkeypatch):
    """A session that takes 0.3 s to create must not make a sub-millisecond model look slow: its
    rounds would get the minimum of runs, too few for a median to settle."""
    real = families.make_session

    def slow_session(*a, **k):
        time.sleep(0.3)
        return real(*a, **k)

    monkeypatch.setattr(families, "make_session", slow_session)
    one = families._one_run(_model(), _feed(), 1)
    assert 0 < one < 0.05


def _outlier_proto() -> onnx.ModelProto:
    """A table whose column 0 holds 200 in every row, masked out before the projection: int8 rows
    (scale 200/127) flatten the other values, the float model never sees the column."""
    table, w = _weights()
    table[:, 0] = 200.0
    mask = np.ones(DIM, np.float32)
    mask[0] = 0.0
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="gather"),
         helper.make_node("Mul", ["emb", "mask"], ["masked"], name="mask"),
         helper.make_node("MatMul", ["masked", "w"], ["y"], name="proj")],
        "outliers", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, SEQ])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, OUT])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(mask, "mask"),
         numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize("tables", [None, True], ids=["auto", "asked"])
def test_table_kept_float_where_int8_rows_cost_fidelity(monkeypatch, calibration, tables):
    timing = _Timing(FASTER)
    monkeypatch.setattr(speed, "time_against_input", timing)
    res = quantize_model(ir.from_proto(_outlier_proto()), calibration,
                         QuantizeOptions(isa=host_isa(), families="all", embeddings=tables))
    if tables:  # the user's choice stands; the floor is reported missed
        assert _int8_tables(res.model) and "not met" in res.summary["fidelity"]
        return
    assert timing.calls == ["whole"] and "proj" in res.plan  # the layer stays int8, the table float
    assert not _int8_tables(res.model) and "not met" not in res.summary["fidelity"]
    line = res.summary["embedding tables"]
    assert line.startswith("float") and "fidelity search kept 1 layer(s) float" in line and "missed" in line
    feed = _feed(10)
    table, w = _weights()
    table[:, 0] = 0.0  # what the mask leaves
    ref = table[feed["ids"]] @ w
    got = _run(res.model, feed)
    cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cos > 0.999 and np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
