"""edgecomp finetune: a new head on a tiny classifier learns a separable task, the written ONNX is
checked in onnxruntime, freeze keeps weights, resume with new data is a batch update bit-identical
to one run over the data in order, and every refusal is one line."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from edgecomp.cli import cli
from edgecomp.data import StepData
from edgecomp.errors import DataError, FinetuneError, OptionError
from edgecomp.finetune import FinetuneOptions, run
from edgecomp.finetune.head import find_head, replace_head
from edgecomp.finetune.options import OPTIONS
from edgecomp.io import load_model, save_model
from tests.conftest import make_model, run_ort, save, vinfo


def _task(tmp_path, n=400, seed=0, name="a"):
    """x[n, 8]; label 1 when x0 + x1 > 0: separable, and not what the MLP was built for."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    np.savez(tmp_path / f"{name}.npz", x=x)
    np.save(tmp_path / f"{name}.npy", y)
    return tmp_path / f"{name}.npz", tmp_path / f"{name}.npy", x, y


def _run(*args, **kw):
    return run(*args, threads=1, **kw)  # one torch thread: the machine is shared


def _opts(**kw) -> FinetuneOptions:
    return FinetuneOptions(**{**dict(epochs=25, lr=3e-2, batch_size=32, held_out=0.25, patience=None), **kw})


def test_new_head_learns_a_separable_task_and_writes_a_verified_onnx(mlp_path, tmp_path):
    data, labels, x, y = _task(tmp_path)
    res = _run(load_model(mlp_path), _opts(new_head=2), StepData(calibration=str(data), train_labels=str(labels)))
    s = res.summary
    assert "MatMul + Add node" in res.evidence["head"] and "(16 -> 4)" in res.evidence["head"] and "16 -> 2 classes" in s["new head"]
    assert s["held-out accuracy before"] < 0.8 and s["held-out accuracy after"] > 0.95
    out = save_model(res.model, tmp_path / "ft.onnx")
    onnx.checker.check_model(str(out))
    m = onnx.load(str(out))
    assert [d.dim_param or d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim] == ["N", 2]
    got = run_ort(m, {"x": x})[0]
    assert got.shape == (400, 2) and np.mean(got.argmax(1) == y) > 0.95
    assert {i.name for i in m.graph.initializer} == {"w1", "b1", "new_head_weight", "new_head_bias"}


def test_freeze_keeps_matching_weights_and_the_head_trains(mlp_path, tmp_path):
    data, labels, *_ = _task(tmp_path)
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(mlp_path)).graph.initializer}
    res = _run(load_model(mlp_path), _opts(new_head=2, freeze=(".",), epochs=3),
              StepData(calibration=str(data), train_labels=str(labels)))
    after = {k: v.const_value.numpy() for k, v in res.model.graph.initializers.items()}
    assert np.array_equal(after["w1"], before["w1"]) and np.array_equal(after["b1"], before["b1"])
    assert np.abs(after["new_head_bias"]).max() > 0  # zero-initialized, then trained


def test_target_vectors_train_with_mse(mlp_path, tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 8)).astype(np.float32)
    t = (x[:, :4] * 0.5).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    np.save(tmp_path / "t.npy", t)
    res = _run(load_model(mlp_path), _opts(epochs=20), StepData(calibration=str(tmp_path / "x.npz"),
                                                             train_labels=str(tmp_path / "t.npy")))
    s = res.summary
    assert s["labels"] == "targets (MSE)" and s["held-out mse after"] < 0.5 * s["held-out mse before"]


def test_resume_with_new_data_continues_like_one_run_over_both(mlp_path, tmp_path):
    a, la, xa, ya = _task(tmp_path, n=96, seed=1, name="a")
    b, lb, xb, yb = _task(tmp_path, n=64, seed=2, name="b")
    np.savez(tmp_path / "ab.npz", x=np.concatenate([xa, xb]))
    np.save(tmp_path / "ab.npy", np.concatenate([ya, yb]))
    opts = _opts(new_head=2, held_out=0.0, shuffle=False, epochs=1, max_steps=10, batch_size=16, optimizer="adam")
    ckpt = tmp_path / "c.ckpt"
    first = _run(load_model(mlp_path), opts, StepData(calibration=str(a), train_labels=str(la)), checkpoint=ckpt)
    assert first.summary["steps"] == 6  # A is done (96 / 16) before max_steps
    second = _run(load_model(mlp_path), opts, StepData(calibration=str(b), train_labels=str(lb)), checkpoint=ckpt,
                 resume=True)
    assert second.summary["steps"] == 10 and second.summary["batch update"] is True
    whole = _run(load_model(mlp_path), opts, StepData(calibration=str(tmp_path / "ab.npz"),
                                                     train_labels=str(tmp_path / "ab.npy")))
    got = {k: v.const_value.numpy() for k, v in second.model.graph.initializers.items()}
    ref = {k: v.const_value.numpy() for k, v in whole.model.graph.initializers.items()}
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)
    first_w = first.model.graph.initializers["new_head_weight"].const_value.numpy()
    assert not np.array_equal(first_w, got["new_head_weight"])  # the update changed the model


def test_interrupted_run_resumes_bit_identically(mlp_path, tmp_path):
    data, labels, *_ = _task(tmp_path, n=160)
    opts = _opts(new_head=2, epochs=3, checkpoint_every=4, eval_every=3)
    sd = StepData(calibration=str(data), train_labels=str(labels))
    whole = _run(load_model(mlp_path), opts, sd)

    class Killed(Exception):
        pass

    def kill(step, _rec):
        if step == 6:
            raise Killed

    with pytest.raises(Killed):
        _run(load_model(mlp_path), opts, sd, checkpoint=tmp_path / "k.ckpt", callback=kill)
    resumed = _run(load_model(mlp_path), opts, sd, checkpoint=tmp_path / "k.ckpt", resume=True)
    assert resumed.summary["resumed from step"] == 4 and resumed.summary["batch update"] is False
    assert resumed.tables["held-out evaluations"] == whole.tables["held-out evaluations"]
    for k, v in whole.model.graph.initializers.items():
        assert np.array_equal(v.const_value.numpy(), resumed.model.graph.initializers[k].const_value.numpy())


def _gemm_model(path, softmax: bool = False, conv: bool = False):
    rng = np.random.default_rng(0)
    if conv:
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"])]
        return save(make_model(nodes, [vinfo("x", ["N", 3, 4, 4])], [vinfo("y", ["N", 2, 4, 4])],
                               {"w": rng.standard_normal((2, 3, 1, 1)).astype(np.float32)}), path)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["logits"], transB=1)]
    out = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
        out = "probs"
    return save(make_model(nodes, [vinfo("x", ["N", 6])], [vinfo(out, ["N", 3])],
                           {"w": rng.standard_normal((3, 6)).astype(np.float32),
                            "b": np.zeros(3, np.float32)}), path)


def test_gemm_head_with_transposed_weight_is_replaced(tmp_path):
    model = load_model(_gemm_model(tmp_path / "g.onnx"))
    head = replace_head(model, 5, seed=1)
    assert head.describe() == "Gemm node '' (6 -> 3)".replace("''", "'(unnamed)'")
    w = model.graph.initializers["new_head_weight"].const_value.numpy()
    assert w.shape == (5, 6) and np.abs(w).max() <= 1 / np.sqrt(6) and "w" not in model.graph.initializers
    got = run_ort(onnx.load(str(save_model(model, tmp_path / "g5.onnx"))), {"x": np.ones((2, 6), np.float32)})[0]
    np.testing.assert_allclose(got, np.ones((2, 6)) @ w.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind, why", [("softmax", "comes from Softmax node"), ("conv", "comes from Conv node")])
def test_no_recognizable_head_is_one_line(tmp_path, kind, why):
    path = _gemm_model(tmp_path / "m.onnx", softmax=kind == "softmax", conv=kind == "conv")
    with pytest.raises(FinetuneError, match=f"^no classifier to replace: the output .* {why}"):
        find_head(load_model(path))
    x = np.zeros((20, 3, 4, 4) if kind == "conv" else (20, 6), np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    np.save(tmp_path / "y.npy", np.zeros(20, np.int64))
    r = CliRunner().invoke(cli, ["finetune", "--threads", "1", str(path), "--data", str(tmp_path / "x.npz"), "--labels",
                                 str(tmp_path / "y.npy"), "--new-head", "2", "-o", str(tmp_path / "o.onnx")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "no classifier" in r.output
    assert not (tmp_path / "o.onnx").exists()


def test_wrong_labels_are_one_line(mlp_path, tmp_path):
    data, *_ = _task(tmp_path, n=40)
    sd = lambda y: (np.save(tmp_path / "y.npy", y), StepData(calibration=str(data), train_labels=str(tmp_path / "y.npy")))[1]
    with pytest.raises(DataError, match="hold 39 entries but DATA has 40 samples"):
        _run(load_model(mlp_path), _opts(), sd(np.zeros(39, np.int64)))
    with pytest.raises(DataError, match="hold class id 7 but the model predicts 4 classes"):
        _run(load_model(mlp_path), _opts(), sd(np.full(40, 7, np.int64)))
    with pytest.raises(DataError, match=r"targets of shape \[3\] but the model's output per sample has shape \[4\]"):
        _run(load_model(mlp_path), _opts(), sd(np.zeros((40, 3), np.float32)))
    r = CliRunner().invoke(cli, ["finetune", "--threads", "1", str(mlp_path), "--data", str(data), "--labels", str(tmp_path / "y.npy"),
                                 "-o", str(tmp_path / "o.onnx")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "targets of shape" in r.output


def test_diverging_loss_writes_nothing(mlp_path, tmp_path):
    data, labels, *_ = _task(tmp_path, n=64)
    r = CliRunner().invoke(cli, ["finetune", "--threads", "1", str(mlp_path), "--data", str(data), "--labels", str(labels),
                                 "--lr", "1e30", "--optimizer", "sgd", "--warmup", "0", "--batch-size", "16",
                                 "-o", str(tmp_path / "o.onnx")])
    assert r.exit_code == 1, r.output
    assert len(r.output.strip().splitlines()) == 1 and "training diverged at step" in r.output
    assert "nothing was written" in r.output and not (tmp_path / "o.onnx").exists()


def test_cli_writes_reports_and_removes_the_checkpoint(mlp_path, tmp_path):
    data, labels, *_ = _task(tmp_path, n=200)
    args = ["finetune", "--threads", "1", str(mlp_path), "--data", str(data), "--labels", str(labels), "--new-head", "2",
            "--epochs", "10", "--lr", "0.01"]
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "o.onnx")])
    assert r.exit_code == 0, r.output
    assert "replaced by 16 -> 2 classes" in r.output and "held-out accuracy:" in r.output
    assert (tmp_path / "o.onnx").is_file() and not (tmp_path / "o.onnx.ckpt").exists()
    r = CliRunner().invoke(cli, [*args, "--freeze", "(", "-o", str(tmp_path / "p.onnx")])
    assert r.exit_code != 0 and "'--freeze'" in r.output and len(r.output.strip().splitlines()) == 1


def test_options_are_the_declared_fields():
    import dataclasses

    names = {f.name for f in dataclasses.fields(FinetuneOptions)} - {"grad_clip"}
    assert names == {o.name for o in OPTIONS}
    with pytest.raises(OptionError, match="^new_head must be >= 2"):
        FinetuneOptions(new_head=1)


def test_cli_batch_update_resumes_the_kept_checkpoint_on_the_written_model(mlp_path, tmp_path):
    a, la, *_ = _task(tmp_path, n=96, seed=1, name="a")
    b, lb, *_ = _task(tmp_path, n=64, seed=2, name="b")
    common = ["--threads", "1", "--new-head", "2", "--freeze", "w1", "--epochs", "2", "--batch-size", "16"]
    r = CliRunner().invoke(cli, ["finetune", str(mlp_path), "--data", str(a), "--labels", str(la), *common,
                                 "--keep-checkpoint", "-o", str(tmp_path / "v1.onnx")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "v1.onnx.ckpt").is_file()
    r = CliRunner().invoke(cli, ["finetune", str(tmp_path / "v1.onnx"), "--data", str(b), "--labels", str(lb),
                                 "--threads", "1", "--freeze", "w1", "--epochs", "2", "--batch-size", "16", "--resume",
                                 "--checkpoint", str(tmp_path / "v1.onnx.ckpt"), "-o", str(tmp_path / "v2.onnx")])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "v1.onnx.ckpt").exists()  # used and removed after success
    r = CliRunner().invoke(cli, ["finetune", str(tmp_path / "v2.onnx"), "--data", str(b), "--labels", str(lb),
                                 "--threads", "1", "--resume", "-o", str(tmp_path / "v3.onnx")])
    assert r.exit_code == 1 and "no checkpoint at" in r.output and len(r.output.strip().splitlines()) == 1
