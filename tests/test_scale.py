"""Passes stay near-linear in graph size: work counted, not timed (the machine is shared).

Each test runs a pass on a chain of MatMul+Add+Relu blocks at two sizes, 4x apart, and counts
the nodes visited by graph iteration (``ir.Graph.__iter__``) and the onnxruntime sessions made.
A pass that scans the whole graph once per node visits 16x the nodes at 4x the size; a linear
one ~4x; the bound is 8x. Sessions must not grow with the number of layers (prune's repair:
but for one per fit it applies, see ``edgecomp.prune.repair``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecomp.data import Dataset
from edgecomp.passes.base import run_pass
from edgecomp.passes.optimize_graph import OptimizeGraphPass
from edgecomp.prune import prune_model
from edgecomp.prune.options import PruneOptions
from edgecomp.quantize import quantize_model
from edgecomp.quantize.options import QuantizeOptions

HIDDEN = 8


def _chain(blocks: int) -> ir.Model:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(blocks):
        inits += [numpy_helper.from_array((rng.standard_normal((HIDDEN, HIDDEN)) / 3).astype(np.float32), f"W{i}"),
                  numpy_helper.from_array((rng.standard_normal(HIDDEN) / 10).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, HIDDEN])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, HIDDEN])], inits)
    return ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


class _Counter:
    def __init__(self, monkeypatch):
        self.visits = self.sessions = 0
        self.result = None
        iterate, session = ir.Graph.__iter__, ort.InferenceSession
        counter = self

        def counting_iter(graph):
            for node in iterate(graph):
                counter.visits += 1
                yield node

        class CountingSession(session):
            def __init__(self, *args, **kwargs):
                counter.sessions += 1
                super().__init__(*args, **kwargs)

        monkeypatch.setattr(ir.Graph, "__iter__", counting_iter)
        monkeypatch.setattr(ort, "InferenceSession", CountingSession)


def _work(monkeypatch, fn, blocks: int) -> _Counter:
    with monkeypatch.context() as m:
        c = _Counter(m)
        c.result = fn(_chain(blocks))
    return c


def _calibration(tmp_path, n: int = 8) -> Dataset:
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.random.default_rng(1).standard_normal((n, HIDDEN)).astype(np.float32))
    return Dataset(path)


def test_optimize_visits_grow_linearly(monkeypatch):
    run = lambda model: run_pass(OptimizeGraphPass(), model)
    small, big = _work(monkeypatch, run, 60), _work(monkeypatch, run, 240)
    assert small.visits > 0
    assert big.visits / small.visits < 8, (small.visits, big.visits)


def test_quantize_sessions_constant_and_visits_linear(monkeypatch, tmp_path):
    data = _calibration(tmp_path)
    run = lambda model: quantize_model(model, data, QuantizeOptions(families="all"))
    small, big = _work(monkeypatch, run, 30), _work(monkeypatch, run, 120)
    assert big.sessions == small.sessions, (small.sessions, big.sessions)
    assert big.visits / small.visits < 8, (small.visits, big.visits)


@pytest.mark.parametrize("with_data", [False, True])
def test_prune_sessions_constant_and_visits_linear(monkeypatch, tmp_path, with_data):
    # repair remakes its session of the pruned model after each fit it applies, and only then
    data = _calibration(tmp_path) if with_data else None
    run = lambda model: prune_model(model, PruneOptions(sparsity=0.25), data)
    small, big = _work(monkeypatch, run, 30), _work(monkeypatch, run, 120)
    applied = [sum(r.get("repair") == "applied" for r in c.result.layers) for c in (small, big)]
    assert big.sessions - applied[1] == small.sessions - applied[0], (small.sessions, big.sessions, applied)
    assert big.visits / small.visits < 8, (small.visits, big.visits)


def test_session_of_a_model_past_the_protobuf_limit_gets_its_weights_as_arrays(monkeypatch):
    """Past ``EXTERNAL_DATA_THRESHOLD`` (lowered here to a few bytes), a session of an in-memory
    model takes its large weights as arrays beside the bytes, and computes the same outputs."""
    import edgecomp.io
    from edgecomp.runtime import make_session

    model = _chain(3)
    x = {"x": np.random.default_rng(2).standard_normal((1, HIDDEN)).astype(np.float32)}
    ref = make_session(model, extra_outputs=["a1"]).run(None, x)
    monkeypatch.setattr(edgecomp.io, "EXTERNAL_DATA_THRESHOLD", 64)
    monkeypatch.setattr(edgecomp.io, "SESSION_WEIGHT_BYTES", HIDDEN * HIDDEN * 4)
    data, arrays = edgecomp.io.session_bytes(model)
    assert sorted(arrays) == ["W0", "W1", "W2"]
    assert len(data) < len(edgecomp.io.model_bytes(model)) - 3 * (HIDDEN * HIDDEN * 4 - 100)  # ~60 B: where it is
    got = make_session(model, extra_outputs=["a1"]).run(None, x)
    assert len(got) == 2
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)
    assert model.graph.initializers["W0"].const_value.nbytes == HIDDEN * HIDDEN * 4  # the model is as it was
