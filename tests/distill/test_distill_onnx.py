"""ONNX files as teacher and student: OnnxModule against onnxruntime (exports and single ops), its
gradients, and a pruned ONNX student healed by distillation against its unpruned ONNX teacher."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper
from torch import nn

from edgecomp.cli import cli
from edgecomp.distill import DistillConfig, distill, prepare, train
from edgecomp.distill.losses import soft_target_kl
from edgecomp.distill.onnx_module import OnnxModule
from edgecomp.errors import DistillError, OptionError
from edgecomp.export import export_model
from edgecomp.io import load_model, save_model
from tests.conftest import make_model, resume_after_kill, run_ort, save, vinfo

ATOL = 1e-5
INT64_MAX = np.iinfo(np.int64).max


class TinyCNN(nn.Module):
    """Conv + BN + ReLU, a strided depthwise conv + ReLU6, 1x1 conv + HardSwish, pools, a linear head."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, width, 3, stride=2, padding=1, groups=width)
        self.c3, self.fc = nn.Conv2d(width, width, 1), nn.Linear(width, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = nn.functional.hardswish(self.c3(nn.functional.relu6(self.c2(x))))
        x = nn.functional.max_pool2d(x, 2)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():  # BN statistics that are not the identity
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _export_cnn(path, exporter: str):
    export_model(_tiny_cnn(), {"x": torch.randn(2, 3, 12, 12)}, path, dynamic={"x": {0: "batch"}}, exporter=exporter)
    return path


@pytest.fixture(scope="module")
def cnn_teacher(tmp_path_factory):
    return _export_cnn(tmp_path_factory.mktemp("cnn") / "teacher.onnx", "torchscript")


@pytest.fixture(scope="module")
def cnn_pruned(cnn_teacher):
    from edgecomp.prune import prune_model
    from edgecomp.prune.options import PruneOptions

    result = prune_model(load_model(cnn_teacher), PruneOptions(sparsity=0.5, repair=False))
    return save_model(result.model, cnn_teacher.parent / "pruned.onnx")


@pytest.fixture(scope="module")
def cnn_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cnndata")
    np.savez(d / "x.npz", x=np.random.default_rng(0).standard_normal((80, 3, 12, 12)).astype(np.float32))
    return d / "x.npz"


def _module_outputs(module: OnnxModule, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(**{k: torch.from_numpy(v) for k, v in feed.items()})
    return [t.numpy() for t in ((out,) if isinstance(out, torch.Tensor) else out)]


def _assert_matches_ort(path_or_proto, feed, atol=ATOL):
    proto = path_or_proto if isinstance(path_or_proto, onnx.ModelProto) else onnx.load(str(path_or_proto))
    module = OnnxModule(ir.from_proto(proto))
    worst = 0.0
    for want, got in zip(run_ort(proto, feed), _module_outputs(module, feed), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, atol=atol, rtol=1e-5)
        worst = max(worst, float(np.abs(got.astype(np.float64) - want).max(initial=0.0)))
    return worst


def _token_feed(batch: int, seq: int, vocab: int = 1000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 100 + seq)
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq // 2:] = 0
    return {"input_ids": rng.integers(0, vocab, (batch, seq)), "attention_mask": mask}


# --- (a) parity with onnxruntime ----------------------------------------------------------------

@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_cnn_export_matches_onnxruntime_at_any_batch(tmp_path, exporter):
    path = _export_cnn(tmp_path / "cnn.onnx", exporter)
    for batch in (1, 5):
        _assert_matches_ort(path, {"x": _f(batch, 3, 12, 12, seed=batch)})


def test_encoder_export_matches_onnxruntime_at_any_batch_and_length(tiny_encoder_path):
    for batch, seq in ((1, 5), (3, 11)):  # the Shape → Gather → Concat → Reshape chains follow the input
        _assert_matches_ort(tiny_encoder_path, _token_feed(batch, seq))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_hf_bert_export_matches_onnxruntime(tmp_path, exporter):
    from transformers import BertConfig, BertModel

    class Hidden(nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32)).eval()
    example = {k: torch.from_numpy(v) for k, v in _token_feed(2, 8, 100).items()}
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    export_model(Hidden(bert), example, tmp_path / "bert.onnx", dynamic=axes, exporter=exporter)
    _assert_matches_ort(tmp_path / "bert.onnx", _token_feed(3, 11, 100))


def _single(op: str, inputs: dict[str, np.ndarray], consts: dict[str, np.ndarray] | None = None, n_out: int = 1,
            opset: int = 17, **attrs) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One node and its feed: ``inputs`` are fed, ``consts`` are initializers (``_none…`` skips an optional input)."""
    consts = consts or {}
    names = [*inputs, *consts]
    node = helper.make_node(op, [n if not n.startswith("_none") else "" for n in names],
                            [f"y{i}" for i in range(n_out)], name=f"the_{op}", **attrs)
    graph_inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                    for n, a in inputs.items()]
    proto = make_model([node], graph_inputs, [onnx.ValueInfoProto(name=f"y{i}") for i in range(n_out)],
                       {k: v for k, v in consts.items() if not k.startswith("_none")}, opset=opset)
    return proto, inputs


def _f(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _i(*values):
    return np.array(values, np.int64)


def _fa(*values):
    return np.array(values, np.float32)


NONE = np.zeros(0, np.float32)  # named "_none…": an omitted optional input


SINGLE_OPS = {
    "Slice negative steps": lambda: _single("Slice", {"x": _f(5, 6)}, {"s": _i(-1, 0), "e": _i(-INT64_MAX, 6),
                                                                        "a": _i(0, 1), "st": _i(-2, 2)}),
    "Slice opset 9 attributes": lambda: _single("Slice", {"x": _f(5, 6)}, opset=9, starts=[1], ends=[100], axes=[1]),
    "Split sizes input": lambda: _single("Split", {"x": _f(2, 6)}, {"s": _i(2, 4)}, n_out=2, axis=1),
    "Split num_outputs": lambda: _single("Split", {"x": _f(7, 2)}, n_out=3, opset=18, num_outputs=3),
    "Split opset 11 equal": lambda: _single("Split", {"x": _f(6, 2)}, n_out=3, opset=11),
    "Unsqueeze opset 11": lambda: _single("Unsqueeze", {"x": _f(3, 4)}, opset=11, axes=[0, -1]),
    "Squeeze opset 13": lambda: _single("Squeeze", {"x": _f(1, 3, 1)}, {"a": _i(-1)}),
    "Reshape 0 and -1": lambda: _single("Reshape", {"x": _f(2, 3, 4)}, {"s": _i(0, -1)}),
    "Flatten axis -1": lambda: _single("Flatten", {"x": _f(2, 3, 4)}, axis=-1),
    "Resize nearest half_pixel": lambda: _single("Resize", {"x": _f(1, 2, 3, 5)},
                                                 {"_none": NONE, "s": _fa(1, 1, 2, 1.5)}),
    "Resize nearest asymmetric sizes": lambda: _single(
        "Resize", {"x": _f(1, 2, 3, 4)}, {"_none1": NONE, "_none2": NONE,
                                          "z": _i(1, 2, 7, 9)}, coordinate_transformation_mode="asymmetric",
        nearest_mode="floor"),
    "Resize linear align_corners": lambda: _single("Resize", {"x": _f(1, 2, 3, 4)},
                                                   {"_none": NONE, "s": _fa(1, 1, 2, 2)},
                                                   mode="linear", coordinate_transformation_mode="align_corners"),
    "Resize linear half_pixel": lambda: _single("Resize", {"x": _f(1, 2, 3, 4)},
                                                {"_none": NONE, "s": _fa(1, 1, 2, 3)},
                                                mode="linear"),
    "Conv 1-D SAME_LOWER grouped": lambda: _single("Conv", {"x": _f(2, 4, 9)}, {"w": _f(6, 2, 4, seed=1)}, group=2,
                                                   auto_pad="SAME_LOWER", strides=[2]),
    "Conv 1-D dilated": lambda: _single("Conv", {"x": _f(2, 4, 9)}, {"w": _f(6, 4, 3, seed=1)}, dilations=[2],
                                        pads=[2, 1]),
    "Conv 2-D asymmetric pads": lambda: _single("Conv", {"x": _f(1, 3, 7, 6)}, {"w": _f(4, 3, 3, 2), "b": _f(4)},
                                                pads=[0, 1, 2, 0], strides=[2, 1]),
    "ConvTranspose pads output_padding": lambda: _single(
        "ConvTranspose", {"x": _f(1, 4, 5, 5)}, {"w": _f(4, 3, 3, 3), "b": _f(6)}, strides=[2, 2], group=2,
        pads=[1, 0, 0, 1], output_padding=[1, 1]),
    "ConvTranspose output_shape": lambda: _single("ConvTranspose", {"x": _f(1, 2, 4)}, {"w": _f(2, 3, 3)},
                                                  strides=[2], output_shape=[9]),
    "MaxPool SAME_UPPER": lambda: _single("MaxPool", {"x": _f(1, 2, 7, 6)}, kernel_shape=[3, 3], strides=[2, 2],
                                          auto_pad="SAME_UPPER"),
    "MaxPool ceil_mode": lambda: _single("MaxPool", {"x": _f(1, 2, 7, 7)}, kernel_shape=[2, 2], strides=[2, 2],
                                         ceil_mode=1),
    "AveragePool asymmetric excluding pads": lambda: _single("AveragePool", {"x": _f(1, 2, 5, 6)}, kernel_shape=[3, 3],
                                                             pads=[0, 1, 2, 0]),
    "AveragePool including pads": lambda: _single("AveragePool", {"x": _f(1, 2, 5, 6)}, kernel_shape=[3, 3],
                                                  pads=[1, 1, 1, 1], count_include_pad=1, strides=[2, 2]),
    "GlobalMaxPool": lambda: _single("GlobalMaxPool", {"x": _f(2, 3, 4, 5)}),
    "Gemm transA alpha beta": lambda: _single("Gemm", {"a": _f(4, 3)}, {"b": _f(4, 5), "c": _f(1, 5)}, transA=1,
                                              alpha=0.5, beta=2.0),
    "Softmax opset 11 coerces to 2-D": lambda: _single("Softmax", {"x": _f(2, 3, 4)}, opset=11, axis=1),
    "LogSoftmax": lambda: _single("LogSoftmax", {"x": _f(2, 3, 4)}, axis=1),
    "LayerNormalization axis -2": lambda: _single("LayerNormalization", {"x": _f(2, 3, 4)},
                                                  {"g": _f(3, 4), "b": _f(3, 4)}, axis=-2, epsilon=1e-3),
    "BatchNormalization": lambda: _single("BatchNormalization", {"x": _f(2, 3, 4)},
                                          {"g": _f(3), "b": _f(3), "m": _f(3), "v": np.abs(_f(3)) + 0.5}),
    "InstanceNormalization": lambda: _single("InstanceNormalization", {"x": _f(2, 3, 5)}, {"g": _f(3), "b": _f(3)}),
    "Pad reflect": lambda: _single("Pad", {"x": _f(1, 2, 4, 5)}, {"p": _i(0, 0, 1, 2, 0, 0, 2, 1)}, mode="reflect"),
    "Pad constant value": lambda: _single("Pad", {"x": _f(2, 3)}, {"p": _i(1, 0, 0, 2), "v": _fa(1.5)[0]}),
    "Einsum": lambda: _single("Einsum", {"a": _f(2, 3, 4), "b": _f(2, 4, 5)}, equation="bij,bjk->bik"),
    "ReduceMax opset 13 attribute": lambda: _single("ReduceMax", {"x": _f(2, 3, 4)}, opset=13, axes=[-1], keepdims=0),
    "ReduceSum input axes": lambda: _single("ReduceSum", {"x": _f(2, 3, 4)}, {"a": _i(0, 2)}, keepdims=0),
    "ReduceMean opset 18 no axes": lambda: _single("ReduceMean", {"x": _f(2, 3, 4)}, opset=18),
    "ReduceL2 and keepdims": lambda: _single("ReduceL2", {"x": _f(2, 3, 4)}, opset=13, axes=[1]),
    "ArgMax": lambda: _single("ArgMax", {"x": _f(3, 5)}, axis=1, keepdims=0),
    "Where Equal": lambda: _single("Where", {"c": np.array([[True, False, True]]), "x": _f(2, 3), "y": _f(1, 3)}),
    "ConstantOfShape": lambda: _single("ConstantOfShape", {"s": _i(2, 3)},
                                       value=helper.make_tensor("v", TensorProto.INT64, [1], [7])),
    "Range": lambda: _single("Range", {}, {"a": np.array(1, np.int64), "b": np.array(11, np.int64),
                                           "c": np.array(3, np.int64)}),
    "Expand bidirectional": lambda: _single("Expand", {"x": _f(3, 1)}, {"s": _i(2, 1, 4)}),
    "Tile": lambda: _single("Tile", {"x": _f(2, 3)}, {"r": _i(2, 1)}),
    "Cast to int truncates": lambda: _single("Cast", {"x": _f(3, 4) * 3}, to=TensorProto.INT64),
    "Div of integers truncates": lambda: _single("Div", {"a": _i(7, -7, 9)}, {"b": _i(2, 2, -4)}),
    "Mod fmod": lambda: _single("Mod", {"a": _f(5)}, {"b": np.full(5, 0.7, np.float32)}, fmod=1),
    "Mod integers": lambda: _single("Mod", {"a": _i(7, -7, 9)}, {"b": _i(3, 3, -4)}),
    "Gather negative indices": lambda: _single("Gather", {"x": _f(5, 3)}, {"i": np.array([[-1, 0], [2, -2]])}),
    "GatherElements": lambda: _single("GatherElements", {"x": _f(3, 4)}, {"i": np.array([[0, -1], [2, 1], [1, 0]])},
                                      axis=1),
    "GatherND batch_dims": lambda: _single("GatherND", {"x": _f(2, 3, 4)}, {"i": np.array([[[1], [2]], [[0], [-1]]])},
                                           batch_dims=1),
    "Trilu lower": lambda: _single("Trilu", {"x": _f(4, 4)}, {"k": np.array(1, np.int64)}, upper=0),
    "PRelu broadcast slope": lambda: _single("PRelu", {"x": _f(2, 3, 4)}, {"s": _f(3, 1)}),
    "Clip opset 6 attributes": lambda: _single("Clip", {"x": _f(3, 4)}, opset=6, min=-0.5, max=0.5),
    "HardSigmoid": lambda: _single("HardSigmoid", {"x": _f(3, 4)}, alpha=0.3, beta=0.4),
    "Gelu tanh": lambda: _single("Gelu", {"x": _f(3, 4)}, opset=20, approximate="tanh"),
    "Max variadic": lambda: _single("Max", {"a": _f(3, 4), "b": _f(1, 4), "c": _f(3, 1)}),
    "Shape start end": lambda: _single("Shape", {"x": _f(2, 3, 4, 5)}, opset=15, start=1, end=-1),
    "Transpose default": lambda: _single("Transpose", {"x": _f(2, 3, 4)}),
}


@pytest.mark.parametrize("case", sorted(SINGLE_OPS))
def test_single_op_matches_onnxruntime(case):
    _assert_matches_ort(*SINGLE_OPS[case]())


def test_nodes_out_of_file_order_run_after_their_producers():
    nodes = [helper.make_node("Mul", ["h", "w"], ["y"]), helper.make_node("Relu", ["x"], ["h"])]
    proto = make_model(nodes, [vinfo("x", ["N", 3])], [vinfo("y", ["N", 3])], {"w": _fa(1, 2, 3)})
    x = _f(4, 3)
    np.testing.assert_allclose(_module_outputs(OnnxModule(ir.from_proto(proto)), {"x": x})[0],
                               np.maximum(x, 0) * _fa(1, 2, 3), atol=ATOL)


# --- (b) gradients --------------------------------------------------------------------------------

def _float_weights(path) -> set[str]:
    """Names of the float initializers that are not scalars (OnnxModule trains exactly these)."""
    return {name for name, v in load_model(path).graph.initializers.items()
            if v.const_value.dtype == ir.DataType.FLOAT and np.prod(v.const_value.shape) > 1}


@pytest.mark.parametrize("which", ["cnn", "encoder"])
def test_gradients_reach_every_weight(which, cnn_teacher, tiny_encoder_path):
    path = cnn_teacher if which == "cnn" else tiny_encoder_path
    module = OnnxModule(load_model(path))
    assert set(module.trained.values()) == _float_weights(path)  # one parameter per initializer, shared ones too
    feed = {"x": _f(3, 3, 12, 12)} if which == "cnn" else _token_feed(3, 7)
    out = module(**{k: torch.from_numpy(v) for k, v in feed.items()})
    (out * torch.from_numpy(_f(*out.shape, seed=5))).sum().backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert not any(b.requires_grad for b in module.buffers())


# --- (c) a pruned CNN healed against its ONNX teacher ------------------------------------------------

def _cfg(teacher, student, data, **kw) -> DistillConfig:
    base = {"teacher": str(teacher), "student": str(student) if student else None, "data": str(data), "batch_size": 16,
            "lr": 3e-3, "epochs": 3, "held_out": 0.2, "temperature": 2.0, "threads": 1, "patience": None}
    base.update(kw)
    return DistillConfig(**base)


def _kd(setup) -> float:
    b = setup.train.batch(range(len(setup.train)))
    with torch.no_grad():
        return float(soft_target_kl(setup.student(b["x"]), setup.teacher(b["x"]), 2.0))


def test_pruned_cnn_student_learns_and_resume_is_bit_identical(cnn_teacher, cnn_pruned, cnn_data, tmp_path):
    cfg = _cfg(cnn_teacher, cnn_pruned, cnn_data, checkpoint=str(tmp_path / "a.ckpt"), checkpoint_every=3, eval_every=2)
    setup = prepare(cfg)
    assert isinstance(setup.student, OnnxModule) and setup.input_names == ["x"]
    before = _kd(setup)
    whole = train(cfg, setup=setup)
    after = _kd(setup)
    assert after < 0.7 * before, (before, after)

    resumed = resume_after_kill(train, cfg, tmp_path / "c.ckpt", 5)
    assert resumed.resumed_from == 3
    a, b = whole.student.state_dict(), resumed.student.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history == whole.history


@pytest.mark.slow  # gloo
def test_two_gloo_processes_match_one_with_onnx_models(cnn_teacher, cnn_pruned, cnn_data, tmp_path):
    from edgecomp.distill.launch import launch

    cfg = _cfg(cnn_teacher, cnn_pruned, cnn_data, epochs=2, checkpoint=str(tmp_path / "one.ckpt"))
    one = train(cfg).student.state_dict()
    two = launch(dataclasses.replace(cfg, checkpoint=str(tmp_path / "two.ckpt")), 2)  # each rebuilds from the files
    assert two["steps"] == 2 * (64 // 16)
    for k, v in one.items():
        torch.testing.assert_close(two["state"][k], v, atol=1e-5, rtol=1e-4)


def test_cli_heals_a_pruned_onnx_student(cnn_teacher, cnn_pruned, cnn_data, tmp_path):
    out = tmp_path / "healed.onnx"
    res = CliRunner().invoke(cli, ["distill", str(cnn_teacher), "--student", str(cnn_pruned), "--data", str(cnn_data),
                                   "-o", str(out), "--epochs", "3", "--batch-size", "16", "--lr", "3e-3",
                                   "--temperature", "2", "--bench-runs", "2", "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    teacher_row, student_row = report["rows"]
    assert student_row["parameters"] < teacher_row["parameters"]
    pruned, healed = onnx.load(str(cnn_pruned)), onnx.load(str(out))
    assert [n.op_type for n in healed.graph.node] == [n.op_type for n in pruned.graph.node]  # the same graph...
    assert [i.name for i in healed.graph.input] == ["x"]
    changed = [t.name for t, u in zip(healed.graph.initializer, pruned.graph.initializer)
               if not np.array_equal(onnx.numpy_helper.to_array(t), onnx.numpy_helper.to_array(u))]
    assert len(changed) >= 6  # ...with trained weights
    x = _f(80, 3, 12, 12)  # the training DATA
    for batch in (1, 7):  # the batch axis stays dynamic, and the file matches the module built from it
        assert _assert_matches_ort(out, {"x": x[:batch]}) < ATOL
    t = torch.from_numpy(run_ort(cnn_teacher, {"x": x})[0])
    kl = [float(soft_target_kl(torch.from_numpy(run_ort(p, {"x": x})[0]), t, 2.0)) for p in (cnn_pruned, out)]
    assert kl[1] < 0.1 * kl[0], kl  # 7.5e-4 → 9e-6


# --- (d) a pruned encoder healed on text ------------------------------------------------------------

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A WordPiece tokenizer of 1000 tokens (the tiny encoder's vocabulary)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(996)]
    tk = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    d = tmp_path_factory.mktemp("tok")
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"unk_token": "[UNK]", "cls_token": "[CLS]",
                                                         "sep_token": "[SEP]", "pad_token": "[PAD]"}))
    return d


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def test_pruned_encoder_student_heals_on_text(tiny_encoder_path, tok_dir, tmp_path):
    from edgecomp.prune import prune_model
    from edgecomp.prune.options import PruneOptions

    pruned = save_model(prune_model(load_model(tiny_encoder_path), PruneOptions(sparsity=0.5, repair=False)).model,
                        tmp_path / "pruned.onnx")
    rng = np.random.default_rng(0)
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(" ".join(f"w{i}" for i in rng.integers(0, 996, rng.integers(3, 12))) for _ in range(64)))
    cfg = DistillConfig(teacher=str(tiny_encoder_path), student=str(pruned), text=str(text), tokenizer=str(tok_dir),
                        max_len=16, batch_size=8, epochs=4, lr=3e-3, held_out=0.25, threads=1, patience=None)
    held = prepare(cfg).held
    before = np.mean([_cosine(run_ort(pruned, f)[0], run_ort(tiny_encoder_path, f)[0]) for f in held.feeds])
    res = distill(cfg, tmp_path / "healed.onnx", bench_runs=0)
    assert res.objective == "embeddings" and res.exporter == "student graph"
    teacher_row, student_row = res.rows
    assert student_row["parameters"] < teacher_row["parameters"]
    assert res.validation.samples == 16 and res.validation.outputs[0].cosine_mean > before + 0.02, before  # 0.93 → 0.98
    for batch, seq in ((1, 4), (3, 13)):
        _assert_matches_ort(tmp_path / "healed.onnx", _token_feed(batch, seq))


# --- (e) refusals -----------------------------------------------------------------------------------

def test_unsupported_ops_are_listed_in_one_line():
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="top"),
             helper.make_node("NonZero", ["v"], ["nz"], name="nz1"),
             helper.make_node("NonZero", ["v"], ["nz2"], name="nz2"),
             helper.make_node("FusedMatMul", ["x", "x"], ["fm"], name="fused", domain="com.microsoft"),
             helper.make_node("Resize", ["x", "", "s"], ["r"], name="cubic", mode="cubic"),
             helper.make_node("Relu", ["x"], ["ok"], name="fine")]
    proto = make_model(nodes, [vinfo("x", [2, 2])], [vinfo("ok", [2, 2])], {"k": _i(1), "s": _fa(1, 1)},
                       extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(DistillError) as e:
        OnnxModule(ir.from_proto(proto), source="m.onnx")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and msg.startswith("m.onnx uses ops OnnxModule cannot run:")
    for part in ("TopK (node 'top')", "NonZero (node 'nz1' and 1 more)", "com.microsoft.FusedMatMul (node 'fused')",
                 "Resize(cubic, half_pixel) (node 'cubic')"):
        assert part in msg
    assert "Relu" not in msg


def test_onnx_setups_refused_before_training(cnn_teacher, cnn_pruned, cnn_data, tmp_path):
    nodes = [helper.make_node("Flatten", ["image"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])]
    other = save(make_model(nodes, [vinfo("image", ["N", 3, 12, 12])], [vinfo("y", ["N", 4])],
                            {"w": _f(432, 4)}), tmp_path / "other.onnx")
    with pytest.raises(DistillError, match=r"other.onnx takes inputs \['image'\] but the teacher takes \['x'\]"):
        prepare(_cfg(cnn_teacher, other, cnn_data))
    with pytest.raises(OptionError, match="^shrink derives the student from a torch teacher"):
        prepare(_cfg(cnn_teacher, None, cnn_data, shrink="width=0.5"))
    with pytest.raises(OptionError, match="^project adds a layer"):
        prepare(_cfg(cnn_teacher, cnn_pruned, cnn_data, project=True))
    # a pruned ONNX student matches hidden states at its block boundaries (tests/distill/test_blockwise.py)
    assert prepare(_cfg(cnn_teacher, cnn_pruned, cnn_data, hidden_weight=1.0)).hidden_plan is not None
    student = tmp_path / "student.onnx"
    shutil.copy(cnn_pruned, student)
    cfg = _cfg(cnn_teacher, student, cnn_data, checkpoint=str(tmp_path / "a.ckpt"), max_steps=1)
    train(cfg)
    model = load_model(student)  # the same path, other weights: the checkpoint is not for this student
    value = next(v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.FLOAT)
    value.const_value = ir.Tensor(np.zeros(value.const_value.shape, np.float32), name=value.name)
    student.unlink()
    save_model(model, student)
    with pytest.raises(DistillError, match="the data differs or an ONNX model file changed"):
        train(cfg, resume=True)
