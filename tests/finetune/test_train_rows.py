"""train_rows new: only the vocabulary rows reduce-embeddings --add-tokens appended train (finetune
and distill); every other weight, and every old row, stays bit-identical."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from edgecomp.data import StepData
from edgecomp.distill import DistillConfig, distill
from edgecomp.embeddings.add_tokens import AddTokensPass
from edgecomp.embeddings.tables import ADDED_ROWS_KEY
from edgecomp.errors import OptionError
from edgecomp.finetune import FinetuneOptions, run
from edgecomp.io import load_model, save_model
from edgecomp.passes.base import run_pass
from tests.conftest import make_model, save, vinfo

V, D, C = 20, 8, 2


def _bag_of_words(path):
    """ids [N, S] -> Gather(E[V, D]) -> ReduceMean over S -> MatMul(W) + b -> logits [N, 2]."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"]),
             helper.make_node("ReduceMean", ["e"], ["m"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["m", "W"], ["z"]), helper.make_node("Add", ["z", "b"], ["logits"])]
    m = make_model(nodes, [vinfo("ids", ["N", 4], TensorProto.INT64)], [vinfo("logits", ["N", C])],
                   {"E": rng.standard_normal((V, D)).astype(np.float32),
                    "W": rng.standard_normal((D, C)).astype(np.float32), "b": np.zeros(C, np.float32)}, opset=13)
    return save(m, path)


@pytest.fixture
def grown(tmp_path):
    """The model with 2 added token rows (ids 20, 21), saved and read back; samples that use them."""
    model = load_model(_bag_of_words(tmp_path / "bow.onnx"))
    run_pass(AddTokensPass(rows=np.zeros((2, D), np.float32), vocab_size=V), model)
    path = save_model(model, tmp_path / "grown.onnx")
    rng = np.random.default_rng(1)
    ids = rng.integers(0, V, (200, 4))
    y = rng.integers(0, 2, 200)
    ids[:, 0] = V + y  # the new token 20 or 21 tells the class
    np.savez(tmp_path / "ids.npz", ids=ids)
    np.save(tmp_path / "y.npy", y)
    return path, tmp_path


def _inits(model) -> dict[str, np.ndarray]:
    return {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items()}


def test_finetune_trains_only_the_added_rows(grown):
    path, d = grown
    model = load_model(path)
    assert model.graph.initializers["E"].const_value.metadata_props[ADDED_ROWS_KEY] == "2"
    before = _inits(model)
    res = run(model, FinetuneOptions(train_rows="new", epochs=15, lr=0.05, batch_size=20, patience=None),
              StepData(calibration=str(d / "ids.npz"), train_labels=str(d / "y.npy")), threads=1)
    after = _inits(res.model)
    assert np.array_equal(after["E"][:V], before["E"][:V]) and not np.array_equal(after["E"][V:], before["E"][V:])
    assert np.array_equal(after["W"], before["W"]) and np.array_equal(after["b"], before["b"])
    assert res.summary["held-out accuracy after"] > res.summary["held-out accuracy before"]
    assert res.model.graph.initializers["E"].const_value.metadata_props[ADDED_ROWS_KEY] == "2"  # kept for later


def test_distill_trains_only_the_added_rows(grown):
    path, d = grown
    teacher = load_model(path)
    e = teacher.graph.initializers["E"].const_value.numpy().copy()
    e[V:] = np.random.default_rng(5).standard_normal((2, D))  # the rows the student should learn
    teacher.graph.initializers["E"].const_value = ir.Tensor(e, name="E")
    save_model(teacher, d / "teacher.onnx")
    before = _inits(load_model(path))
    res = distill(DistillConfig(teacher=str(d / "teacher.onnx"), student=str(path), data=str(d / "ids.npz"),
                                train_rows="new", epochs=10, lr=0.05, batch_size=20, threads=1, patience=None),
                  d / "healed.onnx", bench_runs=0)
    after = _inits(load_model(d / "healed.onnx"))
    assert not res.training["kept_input"]
    assert np.array_equal(after["E"][:V], before["E"][:V]) and np.array_equal(after["W"], before["W"])
    assert np.abs(after["E"][V:] - e[V:]).mean() < np.abs(before["E"][V:] - e[V:]).mean()


def test_train_rows_new_without_added_rows_is_one_line(tmp_path):
    path = _bag_of_words(tmp_path / "bow.onnx")
    np.savez(tmp_path / "ids.npz", ids=np.zeros((40, 4), np.int64))
    np.save(tmp_path / "y.npy", np.zeros(40, np.int64))
    with pytest.raises(OptionError, match="^train_rows new trains the vocabulary rows .* this model records none"):
        run(load_model(path), FinetuneOptions(train_rows="new", batch_size=8),
            StepData(calibration=str(tmp_path / "ids.npz"), train_labels=str(tmp_path / "y.npy")), threads=1)
