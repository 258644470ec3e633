"""Structured and unstructured pruning on the forms third-party exporters write: TorchScript's
Identity-fed (de-duplicated) weights, Constant-node weights (PaddlePaddle), 1-D convolutions,
layers inside If subgraphs; a command that changes nothing is refused; parameters are counted
as `inspect` counts them; ridge repair with few samples; the held-out fidelity warning.

Every model is built inline (onnx.helper or a tiny torch module exported by TorchScript)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from edgecomp.cli import cli
from edgecomp.data import Dataset
from edgecomp.errors import NothingToPrune, PassFailed
from edgecomp.graph import const_array
from edgecomp.io import to_proto
from edgecomp.measure.inspect import count_parameters, summarize
from edgecomp.passes.base import run_pass
from edgecomp.prune import prune_model
from edgecomp.prune.groups import find_groups, lift_constants
from edgecomp.prune.importance import plan_pruning
from edgecomp.prune.options import PruneOptions
from edgecomp.prune.prune_magnitude import PruneMagnitudePass
from tests.conftest import make_model, run_ort, save, vinfo

RNG = np.random.default_rng(7)
ATOL = 1e-4  # float32 sums over at most a few hundred terms


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _params(summary) -> tuple[int, int]:
    a, b = summary["parameters"].split(" → ")
    return int(a.replace(",", "")), int(b.replace(",", ""))


def _checked(result) -> onnx.ModelProto:
    out = to_proto(result.model)
    onnx.checker.check_model(out)
    return out


def _zeroed_reference(proto: onnx.ModelProto, **opts) -> onnx.ModelProto:
    """The unpruned model with the channels the plan removes zeroed in every producer (weights,
    biases, BatchNorm and per-channel constants), each (node, input) on its own copy: it must
    compute what the pruned model computes."""
    model = ir.from_proto(proto)
    lift_constants(model)
    an = find_groups(model)
    plan = plan_pruning(an, PruneOptions(**opts))
    arrays: dict[tuple[int, int], tuple[ir.Node, np.ndarray]] = {}
    for e in an.edits:
        if e.kind != "param" or e.role == "in" or not any(a in plan.kept for a in e.layout.atoms()):
            continue
        node, arr = arrays.get((id(e.node), e.index), (e.node, const_array(e.node.inputs[e.index]).copy()))
        drop = np.setdiff1d(np.arange(e.layout.width(an.sizes)), e.layout.indices(plan.kept, an.sizes))
        idx = [slice(None)] * arr.ndim
        idx[e.axis] = drop
        arr[tuple(idx)] = 0
        arrays[(id(e.node), e.index)] = (node, arr)
    for i, ((_, index), (node, arr)) in enumerate(arrays.items()):
        v = ir.Value(name=f"zeroed_{i}", const_value=ir.tensor(arr, name=f"zeroed_{i}"))
        model.graph.register_initializer(v)
        node.replace_input_with(index, v)
    return to_proto(model)


# --- TorchScript MobileNetV2 style: weights fed through Identity ------------------------------

@pytest.fixture(scope="module")
def mnv2_ts(tmp_path_factory):
    """Two inverted residual blocks (expand → depthwise → project, residual add), GAP, Linear,
    exported by TorchScript at opset 17: BatchNorm folded into the convs, the identical folded
    biases de-duplicated into one initializer read through Identity nodes, Clip bounds in
    Constant nodes."""
    import torch
    from torch import nn

    from edgecomp.export import export_model
    from models.mobilenet_v2 import InvertedResidual

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
            self.blocks = nn.Sequential(InvertedResidual(16, 16, 1, 4), InvertedResidual(16, 24, 2, 4),
                                        InvertedResidual(24, 24, 1, 4))
            self.head = nn.Sequential(nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6())
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = self.head(self.blocks(self.stem(x)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    path = tmp_path_factory.mktemp("mnv2") / "mnv2.onnx"
    export_model(Net().eval(), torch.randn(1, 3, 16, 16), path, exporter="torchscript", opset=17)
    return path


def test_torchscript_mobilenet_v2_prunes_with_identity_fed_weights(mnv2_ts):
    proto = onnx.load(str(mnv2_ts))
    assert any(n.op_type == "Identity" and n.input[0] in {i.name for i in proto.graph.initializer}
               for n in proto.graph.node), "the export no longer shares weights through Identity"
    result = prune_model(ir.from_proto(proto), PruneOptions(sparsity=0.5, importance="l2"))
    pruned = _checked(result)
    p0, p1 = _params(result.summary)
    assert p0 == summarize(ir.from_proto(proto), probe=False).params and p1 < 0.6 * p0
    assert result.summary["groups pruned"] >= 4 and result.summary["channels removed"] > 0
    feed = {"x": _w(1, 3, 16, 16)}
    want = run_ort(_zeroed_reference(proto, sparsity=0.5, importance="l2"), feed)[0]
    got = run_ort(pruned, feed)[0]
    assert got.shape == (1, 10)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=ATOL)


def test_torchscript_mobilenet_v2_cli(mnv2_ts, tmp_path):
    out = tmp_path / "p.onnx"
    res = CliRunner().invoke(cli, ["prune", str(mnv2_ts), "-o", str(out), "--sparsity", "0.5"])
    assert res.exit_code == 0, res.output
    assert out.exists() and count_parameters(ir.from_proto(onnx.load(str(out)))) < \
        count_parameters(ir.from_proto(onnx.load(str(mnv2_ts))))


# --- Constant-node and Identity-fed weights (onnx.helper) -------------------------------------

def _const(name, arr):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name))


def _paddle_style(dead=(1, 6)):
    """Conv weights as Constant nodes (PaddlePaddle), the second conv's weight and the Gemm's
    weight through Identity of one initializer each; channels ``dead`` are zero everywhere."""
    w1, b1, w2, g = _w(8, 3, 3, 3), _w(8), _w(8, 8, 1, 1), _w(4, 8)
    w1[list(dead)], b1[list(dead)], w2[list(dead)], w2[:, list(dead)], g[:, list(dead)] = 0, 0, 0, 0, 0
    b2 = _w(8)
    b2[list(dead)] = 0
    nodes = [_const("w1", w1), _const("b1", b1), _const("b2", b2),
             helper.make_node("Identity", ["w2_init"], ["w2"]), helper.make_node("Identity", ["g_init"], ["g"]),
             helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="c2"),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "g"], ["y"], name="fc", transB=1)]
    return make_model(nodes, [vinfo("x", ["N", 3, 6, 6])], [vinfo("y", ["N", 4])], {"w2_init": w2, "g_init": g})


def test_constant_node_and_identity_fed_weights_prune():
    proto = _paddle_style()
    model = ir.from_proto(proto)
    result = prune_model(model, PruneOptions(sparsity=0.25, importance="l2"))
    pruned = _checked(result)
    w = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    shapes = {n.name: w[n.input[1]].shape for n in pruned.graph.node if n.op_type in ("Conv", "Gemm")}
    assert shapes == {"c1": (6, 3, 3, 3), "c2": (6, 6, 1, 1), "fc": (4, 6)}
    assert not [n for n in pruned.graph.node if n.op_type in ("Constant", "Identity")]
    feed = {"x": _w(3, 3, 6, 6)}
    np.testing.assert_allclose(run_ort(pruned, feed)[0], run_ort(proto, feed)[0], rtol=1e-5, atol=ATOL)


def test_parameter_count_equals_inspect():
    proto = _paddle_style()
    result = prune_model(ir.from_proto(proto), PruneOptions(sparsity=0.25, importance="l2"))
    before, after = _params(result.summary)
    assert before == summarize(ir.from_proto(proto), probe=False).params == count_parameters(ir.from_proto(proto))
    assert after == summarize(result.model, probe=False).params
    assert before == 8 * 27 + 8 + 8 + 64 + 32 and after == 6 * 27 + 6 + 6 + 36 + 24  # Constant nodes counted


def test_unstructured_sparsifies_constant_node_and_identity_fed_weights():
    result = run_pass(PruneMagnitudePass(sparsity=0.5, scope="per-layer"), ir.from_proto(_paddle_style(dead=())))
    assert sorted(r["layer"] for r in result.rows) == ["c1", "c2", "fc"]
    assert all(abs(r["sparsity"] - 0.5) < 0.05 for r in result.rows)
    _checked(result)


def test_pruning_that_adds_parameters_is_refused(monkeypatch):
    import edgecomp.measure.inspect

    counts = iter([100, 101])
    monkeypatch.setattr(edgecomp.measure.inspect, "count_parameters", lambda model: next(counts))
    with pytest.raises(PassFailed, match=r"raise the parameter count \(100 → 101\); nothing was written"):
        prune_model(ir.from_proto(_paddle_style()), PruneOptions(sparsity=0.25, importance="l2"))


@pytest.mark.parametrize("shape", [[-1, 96], [0, -1], [0, 96]])
def test_reshape_into_linear_without_value_info(shape):
    """x.view(-1, C·H·W) / reshape(N, -1) into a Linear, no intermediate shapes stored (as
    TorchScript writes it): the shapes come from inference, the -1 batch is accepted."""
    dead = [1, 4]
    w, g = _w(6, 3, 3, 3), _w(5, 96)
    w[dead] = 0
    for ch in dead:
        g[:, ch * 16:(ch + 1) * 16] = 0
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r"]), helper.make_node("Reshape", ["r", "shape"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "g"], ["y"], transB=1, name="fc")]
    proto = make_model(nodes, [vinfo("x", ["N", 3, 4, 4])], [vinfo("y", ["N", 5])],
                       {"w": w, "g": g, "shape": np.array(shape, np.int64)})
    assert not proto.graph.value_info
    result = prune_model(ir.from_proto(proto), PruneOptions(sparsity=0.34, importance="l2"))
    pruned = _checked(result)
    fc = next(n for n in pruned.graph.node if n.name == "fc")
    assert {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}[fc.input[1]].shape == (5, 64)
    feed = {"x": _w(2, 3, 4, 4)}
    np.testing.assert_allclose(run_ort(pruned, feed)[0], run_ort(proto, feed)[0], rtol=1e-5, atol=ATOL)


def test_reshape_that_regroups_the_batch_is_not_followed():
    """reshape(-1, 48) of [N, 6, 4, 4] mixes samples: the channels are kept whole."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c1", "shape"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "g"], ["y"], transB=1, name="fc")]
    proto = make_model(nodes, [vinfo("x", [2, 3, 4, 4])], [vinfo("y", [4, 5])],
                       {"w": _w(6, 3, 3, 3), "g": _w(5, 48), "shape": np.array([-1, 48], np.int64)})
    an = find_groups(ir.from_proto(proto))
    c1 = next(a for a, n in an.names.items() if n == "c1")
    assert "Reshape that moves the channels (flat)" in an.group_blocked(an.root(c1))


# --- 1-D convolutions -------------------------------------------------------------------------

def test_conv1d_net_prunes_like_2d():
    """Conv1d → BN → Relu → depthwise Conv1d → Conv1d + residual Add → Flatten → Gemm, channels
    2 and 5 dead: they go, every weight shrinks along its channel axis, outputs unchanged."""
    dead = [2, 5]
    w1, w_dw, b_dw, w3, g = _w(8, 4, 3), _w(8, 1, 3), _w(8), _w(8, 8, 1), _w(5, 8 * 6)
    w1[dead], w_dw[dead], b_dw[dead], w3[dead], w3[:, dead] = 0, 0, 0, 0, 0
    for c in dead:
        g[:, c * 6:(c + 1) * 6] = 0
    bn = {"s": _w(8), "bb": _w(8), "m": _w(8), "v": np.abs(_w(8)) + 0.5}
    bn["bb"][dead] = 0
    bn["s"][dead] = 0
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="c1", pads=[1, 1]),
             helper.make_node("BatchNormalization", ["c1", "s", "bb", "m", "v"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r1"]),
             helper.make_node("Conv", ["r1", "w_dw", "b_dw"], ["dw"], name="dw", group=8, pads=[1, 1]),
             helper.make_node("Relu", ["dw"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["c3"], name="c3"),
             helper.make_node("Add", ["c3", "r1"], ["s1"], name="res"),
             helper.make_node("Flatten", ["s1"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "g"], ["y"], name="fc", transB=1)]
    proto = make_model(nodes, [vinfo("x", ["N", 4, 6])], [vinfo("y", ["N", 5])],
                       {"w1": w1, "w_dw": w_dw, "b_dw": b_dw, "w3": w3, "g": g, **bn})
    result = prune_model(ir.from_proto(proto), PruneOptions(sparsity=0.25, importance="l2"))
    pruned = _checked(result)
    w = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    shapes = {n.name: w[n.input[1]].shape for n in pruned.graph.node if n.op_type in ("Conv", "Gemm")}
    assert shapes == {"c1": (6, 4, 3), "dw": (6, 1, 3), "c3": (6, 6, 1), "fc": (5, 36)}
    bn_node = next(n for n in pruned.graph.node if n.op_type == "BatchNormalization")
    assert w[bn_node.input[1]].shape == (6,)
    feed = {"x": _w(3, 4, 6)}
    np.testing.assert_allclose(run_ort(pruned, feed)[0], run_ort(proto, feed)[0], rtol=1e-5, atol=ATOL)


def test_torchscript_conv1d_with_squeeze_and_pad_prunes(tmp_path):
    """A TorchScript Conv1d audio-style net: F.pad on time, mean over time via AdaptiveAvgPool1d
    and squeeze, then a Linear."""
    import torch
    from torch import nn

    from edgecomp.export import export_model

    torch.manual_seed(1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn = nn.Conv1d(2, 16, 5), nn.BatchNorm1d(16)
            self.b = nn.Conv1d(16, 16, 3, padding=1)
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            h = torch.relu(self.bn(self.a(nn.functional.pad(x, (2, 2)))))
            h = torch.relu(self.b(h))
            return self.fc(nn.functional.adaptive_avg_pool1d(h, 1).squeeze(-1))

    path = tmp_path / "c1d.onnx"
    export_model(Net().eval(), torch.randn(1, 2, 20), path, exporter="torchscript", opset=17)
    proto = onnx.load(str(path))
    result = prune_model(ir.from_proto(proto), PruneOptions(sparsity=0.5, importance="l2"))
    pruned = _checked(result)
    w = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    convs = [w[n.input[1]].shape for n in pruned.graph.node if n.op_type == "Conv"]
    assert convs == [(8, 2, 5), (8, 8, 3)], convs
    feed = {"x": _w(1, 2, 20)}
    np.testing.assert_allclose(run_ort(pruned, feed)[0], run_ort(_zeroed_reference(proto, sparsity=0.5, importance="l2"),
                                                                 feed)[0], rtol=1e-4, atol=ATOL)


# --- subgraphs and the nothing-to-prune refusal -----------------------------------------------

def _with_if(read_inside: bool):
    """c1 → Relu → r; an If whose branches hold a Conv (weight from the outer graph) and, with
    ``read_inside``, read r directly; otherwise r → c2 → output next to the If."""
    then_conv = helper.make_node("Conv", ["r" if read_inside else "x", "wt"], ["t_out"], name="then_conv")
    then_g = helper.make_graph([then_conv], "then", [], [vinfo("t_out", [1, 4, 4, 4])])
    else_g = helper.make_graph([helper.make_node("Conv", ["r" if read_inside else "x", "we"], ["e_out"],
                                                 name="else_conv")], "else", [], [vinfo("e_out", [1, 4, 4, 4])])
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="c1"), helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("If", ["cond"], ["branch"], name="if0", then_branch=then_g, else_branch=else_g)]
    outputs = [vinfo("branch", [1, 4, 4, 4])]
    inits = {"w1": _w(8, 3, 1, 1), "cond": np.array(True)}
    if read_inside:
        inits.update({"wt": _w(4, 8, 1, 1), "we": _w(4, 8, 1, 1)})
    else:
        inits.update({"wt": _w(4, 3, 1, 1), "we": _w(4, 3, 1, 1), "w2": _w(5, 8, 1, 1)})
        nodes.append(helper.make_node("Conv", ["r", "w2"], ["c2"], name="c2"))
        outputs.append(vinfo("c2", [1, 5, 4, 4]))
    proto = make_model(nodes, [vinfo("x", [1, 3, 4, 4])], outputs, inits)
    onnx.checker.check_model(proto)
    return proto


def test_if_subgraph_layers_and_captured_channels_are_kept_whole_with_the_reason():
    proto = _with_if(read_inside=False)
    result = prune_model(ir.from_proto(proto), PruneOptions(sparsity=0.5, importance="l2"))
    rows = {r["group"]: r for r in result.groups}
    assert rows["c1"]["status"] == "pruned" and rows["c1"]["after"] == 4
    for name in ("then_conv", "else_conv"):
        assert rows[name]["status"] == "kept whole: inside If subgraph (if0): layers in subgraphs are not pruned"
    pruned = _checked(result)
    feed = {"x": _w(1, 3, 4, 4)}
    np.testing.assert_allclose(run_ort(pruned, feed)[0], run_ort(proto, feed)[0], rtol=1e-6, atol=1e-6)

    an = find_groups(ir.from_proto(_with_if(read_inside=True)))
    c1 = next(a for a, n in an.names.items() if n == "c1")
    assert "read inside If subgraph (if0)" in an.group_blocked(an.root(c1))


def test_unstructured_reaches_weights_inside_if_subgraphs():
    """silero-vad style: the then-branch weight is a Constant node inside the subgraph, the
    else-branch reads an outer initializer; both are sparsified in place."""
    proto = _with_if(read_inside=False)
    then_g = next(a for a in proto.graph.node[2].attribute if a.name == "then_branch").g
    wt = next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == "wt")
    then_g.node.insert(0, _const("wt_inner", wt))
    then_g.node[1].input[1] = "wt_inner"
    onnx.checker.check_model(proto)
    result = run_pass(PruneMagnitudePass(sparsity=0.5, scope="per-layer"), ir.from_proto(proto))
    assert sorted(r["layer"] for r in result.rows) == ["c1", "c2", "else_conv", "then_conv"]
    out = _checked(result)
    g = next(a for a in out.graph.node if a.op_type == "If").attribute
    inner = next(n for n in next(a for a in g if a.name == "then_branch").g.node if n.op_type == "Constant")
    arr = numpy_helper.to_array(inner.attribute[0].t)
    assert (arr == 0).mean() == 0.5 and np.array_equal(arr != 0, np.abs(wt) >= np.median(np.abs(wt)))
    x = _w(1, 3, 4, 4)  # cond is True: the branch output is the 1x1 conv with the sparsified weight
    want = np.einsum("oi,nihw->nohw", arr[:, :, 0, 0], x)
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], want, rtol=1e-5, atol=1e-5)


def test_nothing_to_prune_is_refused_with_one_line_and_writes_nothing(tmp_path):
    src = save(_with_if(read_inside=True), tmp_path / "if.onnx")
    out = tmp_path / "p.onnx"
    res = CliRunner().invoke(cli, ["prune", str(src), "-o", str(out), "--sparsity", "0.5"])
    assert res.exit_code != 0 and not out.exists()
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    assert lines[0] == ("Error: nothing to prune: every channel group is kept whole (inside If subgraph: layers in "
                        "subgraphs are not pruned: 2 groups, read inside If subgraph: 1 group); nothing was written")


def test_unstructured_with_no_weight_to_sparsify_is_refused(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "z"], ["y"], name="mm")]  # weight is a graph input
    proto = make_model(nodes, [vinfo("x", [2, 3]), vinfo("z", [3, 2])], [vinfo("y", [2, 2])])
    src, out = save(proto, tmp_path / "m.onnx"), tmp_path / "u.onnx"
    res = CliRunner().invoke(cli, ["prune", str(src), "-o", str(out), "--sparsity", "0.5", "--unstructured"])
    assert res.exit_code != 0 and not out.exists()
    assert res.output.strip() == ("Error: nothing to prune: no Conv, MatMul or Gemm has a constant float weight to "
                                  "sparsify (computed weights: 1 layer); nothing was written")


def test_sparsity_too_low_for_the_rounding_names_the_fix():
    w1, w2 = _w(8, 32), _w(32, 4)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="down")]
    proto = make_model(nodes, [vinfo("x", ["N", 8])], [vinfo("y", ["N", 4])], {"w1": w1, "w2": w2})
    with pytest.raises(NothingToPrune, match=r"at sparsity 0.1 the rounded channel counts keep every channel"):
        prune_model(ir.from_proto(proto), PruneOptions(sparsity=0.1))


# --- repair with few samples, and the fidelity warning ----------------------------------------

def _mlp(k=64, hidden=48, n_out=10, seed=3, dead=()):
    rng = np.random.default_rng(seed)
    w1, b1 = rng.standard_normal((k, hidden)).astype(np.float32), rng.standard_normal(hidden).astype(np.float32)
    w2, b2 = rng.standard_normal((hidden, n_out)).astype(np.float32), rng.standard_normal(n_out).astype(np.float32)
    w1[:, list(dead)], b1[list(dead)], w2[list(dead)] = 0, 0, 0
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y0"], name="fc2"),
             helper.make_node("Add", ["y0", "b2"], ["logits"])]
    return make_model(nodes, [vinfo("x", ["N", k])], [vinfo("logits", ["N", n_out])],
                      {"w1": w1, "b1": b1, "w2": w2, "b2": b2})


def _data(tmp_path, n, k=64, seed=4):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, k)) @ rng.standard_normal((k, k)) / 8).astype(np.float32)
    np.savez(tmp_path / f"d{n}.npz", x=x)
    return Dataset(tmp_path / f"d{n}.npz")


@pytest.mark.parametrize("n", [20, 40, 200])
def test_ridge_repair_is_never_worse_than_no_repair_on_held_out_data(tmp_path, n):
    """fc2 keeps 24 of 48 inputs: 25 unknowns per output. 20 samples (16 fitted rows) are refused;
    40 (32 rows) and 200 are fitted with ridge and kept only if the held-out error drops."""
    data = _data(tmp_path, n)
    opts = dict(sparsity=0.5, importance="l2")
    with_repair = prune_model(ir.from_proto(_mlp()), PruneOptions(**opts), data)
    without = prune_model(ir.from_proto(_mlp()), PruneOptions(**opts, repair=False), data)
    row = next(r for r in with_repair.layers if r["layer"] == "fc2")
    if n == 20:
        assert row["repair"].startswith("skipped: 16 calibration rows < 25 unknowns per output")
    else:
        assert row["repair"] == "applied" or row["repair"].startswith("skipped: the fit raised the held-out error")
    assert row["held-out err after"] <= row["held-out err before"]
    assert with_repair.fidelity["samples"] == n // 5 and with_repair.fidelity["held out"]
    assert with_repair.fidelity["cosine"] >= without.fidelity["cosine"] - 1e-3
    if n == 200:
        assert row["repair"] == "applied" and with_repair.fidelity["cosine"] > without.fidelity["cosine"]


def test_fewer_than_five_samples_hold_none_out_and_skip_repair(tmp_path):
    result = prune_model(ir.from_proto(_mlp(hidden=4)), PruneOptions(sparsity=0.5, importance="l2"), _data(tmp_path, 4))
    row = next(r for r in result.layers if r["layer"] == "fc2")
    assert row["repair"] == "skipped: no held-out samples to check the fit (--data has fewer than 5)"
    assert result.fidelity["samples"] == 4 and not result.fidelity["held out"]
    assert result.summary["fidelity"].endswith("on all 4 samples (fewer than 5: none held out)")


def test_fidelity_is_reported_and_a_bad_prune_is_refused_or_flagged(tmp_path):
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((40, 64)).astype(np.float32))
    src = save(_mlp(hidden=64), tmp_path / "mlp.onnx")
    runner = CliRunner()
    args = ["prune", str(src), "-o", str(tmp_path / "bad.onnx"), "--sparsity", "0.9", "--importance", "l2",
            "--no-repair", "--data", str(tmp_path / "d.npz"), "--json", str(tmp_path / "bad.json")]
    refused = runner.invoke(cli, args)
    assert refused.exit_code == 1 and not (tmp_path / "bad.onnx").exists(), refused.output
    assert len(refused.stderr.splitlines()) == 1 and "on 8 held-out samples" in refused.stderr
    assert "--allow-degraded" in refused.stderr and "--data" not in refused.stderr.split("written:")[1]
    bad = runner.invoke(cli, [*args, "--allow-degraded"])
    assert bad.exit_code == 3, bad.output
    warn = [line for line in bad.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warn) == 1 and "8 held-out samples" in warn[0] and "< 0.95" in warn[0], bad.stderr
    assert json.loads((tmp_path / "bad.json").read_text())["status"] == "degraded"
    fid = json.loads((tmp_path / "bad.json").read_text())["evidence"]["fidelity"]
    assert fid["samples"] == 8 and fid["cosine"] < 0.95
    assert "fidelity: mean cosine" in bad.stdout and "on 8 held-out samples" in bad.stdout

    src = save(_mlp(hidden=64, dead=range(0, 64, 8)), tmp_path / "dead.onnx")  # 8 neurons that do nothing
    good = runner.invoke(cli, ["prune", str(src), "-o", str(tmp_path / "good.onnx"), "--sparsity", "0.125",
                               "--round-to", "1", "--importance", "l2", "--data", str(tmp_path / "d.npz")])
    assert good.exit_code == 0, good.output
    assert "warning" not in good.stderr and "mean cosine 1.0000, top-1 agreement 100.0%" in good.stdout
