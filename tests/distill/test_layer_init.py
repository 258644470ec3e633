"""Block-wise initialization of a ``--shrink layers=N`` student (edgecomp.distill.layer_init)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from edgecomp.distill import DistillConfig, distill, prepare
from edgecomp.distill.layer_init import group_errors, init_layers, layer_groups
from edgecomp.errors import OptionError
from tests.conftest import write_token_files


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    """Token DATA of variable lengths (batches pad; the mask marks real tokens)."""
    rng = np.random.default_rng(0)
    return write_token_files(tmp_path_factory.mktemp("tokens"), 64, rng, (5, 16))


@pytest.fixture(scope="module")
def teacher4(tmp_path_factory) -> str:
    """A SPEC for a 4-layer tiny encoder (models.text_encoder), the teacher of a 2-layer student."""
    d = tmp_path_factory.mktemp("spec")
    (d / "enc4.py").write_text(textwrap.dedent("""
        from models.text_encoder import tiny_encoder

        def teacher():
            return tiny_encoder(layers=4)
    """))
    return f"{d / 'enc4.py'}:teacher"


def _cfg(teacher4: str, tokens: Path, **kw) -> DistillConfig:
    base = dict(teacher=teacher4, shrink="layers=2", data=str(tokens), batch_size=8, lr=3e-3, held_out=0.25,
                seed=0, threads=1)
    return DistillConfig(**{**base, **kw})


def test_groups_follow_the_hidden_state_map():
    assert layer_groups(6, 3) == [(0, 1), (2, 3), (4, 5)]
    assert layer_groups(6, 4) == [(0, 0), (1, 2), (3, 3), (4, 5)]
    assert layer_groups(12, 1) == [(0, 11)]


def test_each_layer_matches_its_teacher_group_better_than_the_copy(teacher4, tokens):
    setup = prepare(_cfg(teacher4, tokens))
    student, teacher, names = setup.student, setup.teacher, setup.input_names
    # a copied layer alone does not do its group's work (relative squared error of the whole hidden state)
    before = group_errors(student, teacher, setup.held, names)
    assert all(e > 0.03 for e in before), before  # measured 0.058, 0.061
    res = init_layers(student, teacher, setup.train, setup.held, names, 60, lr=3e-3, batch_size=8, eval_every=20,
                      copied=[0, 3])
    after = group_errors(student, teacher, setup.held, names)
    assert res.errors_before == pytest.approx(before, rel=1e-5) and res.errors_after == pytest.approx(after, rel=1e-5)
    for b, a in zip(before, after):  # each block problem learned, held out
        assert a < 0.5 * b, (before, after)  # measured 0.0136, 0.0138
    # the whole student is closer to the teacher too (held-out mean cosine, step 0 = the copy)
    assert res.history[0]["step"] == 0 and res.best_step > 0
    assert max(h["held-out cos"] for h in res.history) > res.history[0]["held-out cos"] + 0.01
    # only the layer stack trained: the embeddings are still the teacher's
    assert torch.equal(student.word.weight, teacher.word.weight)


def test_student_side_inputs_train_the_chain(teacher4, tokens):
    setup = prepare(_cfg(teacher4, tokens))
    s, t, names = setup.student, setup.teacher, setup.input_names
    before = group_errors(s, t, setup.held, names, inputs="student")
    init_layers(s, t, setup.train, setup.held, names, 60, lr=3e-3, batch_size=8, inputs="student")
    after = group_errors(s, t, setup.held, names, inputs="student")
    assert after[-1] < 0.5 * before[-1], (before, after)


@pytest.mark.parametrize("kw, message", [
    (dict(layer_init="fast"), r"^layer_init must be copy or blockwise, got 'fast'$"),
    (dict(layer_init_fraction=1.0), r"^layer_init_fraction must be a fraction in \(0, 1\), got 1.0$"),
    (dict(layer_init_inputs="both"), r"^layer_init_inputs must be teacher or student, got 'both'$"),
    (dict(layer_init="blockwise", shrink="width=0.5"), r"^layer_init blockwise initializes a student derived with"),
])
def test_bad_values_are_one_line(teacher4, tokens, kw, message):
    with pytest.raises(OptionError, match=message):
        _cfg(teacher4, tokens, **kw).check()


def test_option_declared_once_refuses_bad_values():
    from edgecomp.distill.options import OPTIONS, check_config

    names = [o.name for o in OPTIONS]
    assert names.count("layer_init") == 1 and names.count("layer_init_fraction") == 1
    for values in ({"layer_init": "fast"}, {"layer_init_fraction": 0.0}, {"layer_init_inputs": "x"}):
        with pytest.raises(Exception) as e:
            check_config(values)
        assert "\n" not in str(e.value) and next(iter(values)) in str(e.value)


def test_shrink_distill_with_blockwise_init_writes_a_verified_model(teacher4, tokens, tmp_path):
    import onnxruntime as ort

    cfg = _cfg(teacher4, tokens, max_steps=30, eval_every=10, layer_init_fraction=0.5)
    res = distill(cfg, tmp_path / "s.onnx", exporter="torchscript", bench_runs=0)
    init = res.training["layer_init"]
    assert isinstance(init, dict) and init["steps"] == 15 and res.training["steps"] == 15
    assert [r["teacher layers"] for r in init["groups"]] == ["0..1", "2..3"]
    assert [r["copied from"] for r in init["groups"]] == [0, 3]
    # the end-to-end pass starts from the initialized student: its step 0 is the phase's best
    best_init = max(h["held-out cos"] for h in init["history"])
    assert res.training["history"][0]["held-out cos"] == pytest.approx(best_init, abs=1e-5)
    # the written student runs in onnxruntime and computes what the validation measured
    sess = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.array([[5, 6, 7, 8]], np.int64), "attention_mask": np.ones((1, 4), np.int64)}
    out = sess.run(None, feed)[0]
    assert out.shape == (1, 64) and np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)
    assert res.validation.outputs[0].cosine_mean >= res.training["history"][0]["held-out cos"] - 0.05
    assert not Path(str(tmp_path / "s.onnx") + ".ckpt").exists()
    # copy: no initialization, every step end to end
    res_copy = distill(_cfg(teacher4, tokens, max_steps=30, eval_every=10, layer_init="copy"), tmp_path / "c.onnx",
                       exporter="torchscript", bench_runs=0)
    assert res_copy.training["layer_init"].startswith("off (layer_init copy") and res_copy.training["steps"] == 30
