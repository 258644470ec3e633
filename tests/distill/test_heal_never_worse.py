"""A heal never writes a student worse than the one it was given, the checkpoint is removed after
success, and the optimizers (adamw, adam, sgd, full-batch gd) against a convex toy problem and a
numpy gradient-descent reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from edgecomp.cli import cli
from edgecomp.distill import DistillConfig, distill, prepare, train
from edgecomp.distill.optim import schedule
from edgecomp.errors import OptionError
from tests.conftest import make_model, save, vinfo


def _mlp(path, seed: int, noise: float = 0.0, base_seed: int = 0):
    """x[N,6] -> Gemm(6x12) -> Relu -> Gemm(12x5) -> logits; ``noise`` perturbs the weights of ``base_seed``'s."""
    rng = np.random.default_rng(base_seed)
    inits = {"w1": rng.standard_normal((12, 6)), "b1": rng.standard_normal(12) * 0.1,
             "w2": rng.standard_normal((5, 12)), "b2": rng.standard_normal(5) * 0.1}
    jitter = np.random.default_rng(seed)
    inits = {k: (v + noise * jitter.standard_normal(v.shape)).astype(np.float32) for k, v in inits.items()}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h0"], transB=1), helper.make_node("Relu", ["h0"], ["h"]),
             helper.make_node("Gemm", ["h", "w2", "b2"], ["logits"], transB=1)]
    return save(make_model(nodes, [vinfo("x", ["N", 6])], [vinfo("logits", ["N", 5])], inits), path)


@pytest.fixture
def pair(tmp_path):
    """(teacher, a student close to it, a tiny DATA): a student training can only make worse."""
    teacher = _mlp(tmp_path / "teacher.onnx", 0)
    student = _mlp(tmp_path / "student.onnx", 1, noise=0.01)
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(2).standard_normal((24, 6)).astype(np.float32))
    return teacher, student, tmp_path / "x.npz"


def _cfg(teacher, student, data, **kw) -> DistillConfig:
    base = dict(teacher=str(teacher), student=str(student), data=str(data), batch_size=8, epochs=6, held_out=0.25,
                threads=1, patience=None)
    return DistillConfig(**{**base, **kw})


def _weights(path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_training_that_only_hurts_writes_the_student_unchanged(pair, tmp_path):
    teacher, student, data = pair
    out = tmp_path / "healed.onnx"
    res = distill(_cfg(teacher, student, data, lr=1.0, warmup=0.0), out, bench_runs=0)
    t = res.training
    assert t["kept_input"] and t["best_step"] == 0 and t["history"][0]["step"] == 0
    assert max(h["held-out loss"] for h in t["history"][1:]) > t["history"][0]["held-out loss"]  # training hurt
    got, given = _weights(out), _weights(student)
    assert got.keys() == given.keys() and all(np.array_equal(got[k], given[k]) for k in given)
    assert len(res.warnings) == 1 and "never beat the student as given" in res.warnings[0]
    assert not (tmp_path / "healed.onnx.ckpt").exists()  # removed after success


def test_training_that_helps_is_kept_and_the_checkpoint_too_when_asked(tmp_path):
    teacher = _mlp(tmp_path / "teacher.onnx", 0)
    student = _mlp(tmp_path / "student.onnx", 1, noise=0.3)
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(2).standard_normal((96, 6)).astype(np.float32))
    out = tmp_path / "healed.onnx"
    res = distill(_cfg(teacher, student, tmp_path / "x.npz", lr=3e-3, epochs=8, batch_size=16), out, bench_runs=0,
                  keep_checkpoint=True)
    t = res.training
    assert not t["kept_input"] and t["best_step"] > 0 and not res.warnings
    best = next(h for h in t["history"] if h["step"] == t["best_step"])
    assert best["held-out loss"] < t["history"][0]["held-out loss"]
    assert (tmp_path / "healed.onnx.ckpt").is_file()


def test_cli_warns_in_one_line_and_keeps_the_checkpoint_on_request(pair, tmp_path):
    teacher, student, data = pair
    args = ["distill", str(teacher), "--student", str(student), "--data", str(data), "--lr", "1", "--warmup", "0",
            "--batch-size", "8", "--epochs", "4", "--held-out", "0.25", "--bench-runs", "0"]
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "a.onnx")])
    assert r.exit_code == 0, r.output
    assert r.stderr.count("warning: training never beat the student as given") == 1
    assert "checkpoint removed" in r.stdout and not (tmp_path / "a.onnx.ckpt").exists()
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "b.onnx"), "--keep-checkpoint"])
    assert r.exit_code == 0 and (tmp_path / "b.onnx.ckpt").is_file()


# --- optimizers --------------------------------------------------------------------------------

def _linear(path, w: np.ndarray):
    """y = x @ W: a least-squares problem in W when trained with MSE against another linear map."""
    return save(make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vinfo("x", ["N", w.shape[0]])],
                           [vinfo("y", ["N", w.shape[1]])], {"w": w.astype(np.float32)}), path)


@pytest.fixture
def least_squares(tmp_path):
    rng = np.random.default_rng(0)
    w_t, w_s = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    x = rng.standard_normal((40, 4)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    return (_linear(tmp_path / "t.onnx", w_t), _linear(tmp_path / "s.onnx", w_s), tmp_path / "x.npz",
            x.astype(np.float64), w_t, w_s.astype(np.float32).astype(np.float64))


def _ls_cfg(problem, **kw) -> DistillConfig:
    t, s, data, *_ = problem
    return DistillConfig(**{**dict(teacher=str(t), student=str(s), data=str(data), objective="embeddings",
                                   match="mse", held_out=0.0, batch_size=8, threads=1, grad_clip=None,
                                   weight_decay=0.0, max_steps=30, lr=0.05, device="cpu"), **kw})


def _ls_loss(x, w, w_t) -> float:
    return float(np.mean((x @ w - x @ w_t) ** 2))


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd", "gd"])
def test_each_optimizer_reduces_a_least_squares_loss(least_squares, optimizer):
    x, w_t, w_s = least_squares[3:]
    res = train(_ls_cfg(least_squares, optimizer=optimizer))
    w = res.student.weights.w.detach().double().numpy()
    assert _ls_loss(x, w, w_t) < 0.5 * _ls_loss(x, w_s, w_t)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_gd_matches_numpy_gradient_descent(least_squares, momentum):
    x, w_t, w = least_squares[3:]
    steps, lr, warmup = 12, 0.05, 0.25
    res = train(_ls_cfg(least_squares, optimizer="gd", momentum=momentum, max_steps=steps, warmup=warmup))
    target, factor, v = x @ w_t, schedule(steps, warmup), np.zeros_like(w)
    for k in range(steps):  # L = mean over samples and outputs of (xW - t)^2; torch's heavy ball
        grad = 2.0 / (x.shape[0] * w.shape[1]) * x.T @ (x @ w - target)
        v = momentum * v + grad if k else grad
        w = w - lr * factor(k) * v
    np.testing.assert_allclose(res.student.weights.w.detach().double().numpy(), w, atol=1e-5, rtol=0)
    assert res.steps == steps


def test_optimizer_choices_are_checked(least_squares):
    with pytest.raises(OptionError, match="^optimizer must be one of adamw, adam, sgd, gd"):
        prepare(_ls_cfg(least_squares, optimizer="lbfgs"))
    r = CliRunner().invoke(cli, ["distill", str(least_squares[0]), "--student", str(least_squares[1]), "--data",
                                 str(least_squares[2]), "--optimizer", "lbfgs", "-o", "x.onnx"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
