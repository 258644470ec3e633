"""Pruning on small graphs built inline: one per dependency kind, with "dead" channels (zero
weights in every producer and consumer) so removing them must leave the outputs unchanged;
repair against a numpy least-squares reference; unstructured sparsity; bad inputs."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import helper

from edgecomp.cli import cli
from edgecomp.data import Dataset
from edgecomp.errors import ConfigError, NothingToPrune, OptionError
from edgecomp.io import to_proto
from edgecomp.passes.base import run_pass
from edgecomp.prune import prune_model
from edgecomp.prune.groups import find_groups
from edgecomp.prune.options import PruneOptions
from edgecomp.prune.prune_magnitude import PruneMagnitudePass
from tests.conftest import make_model, run_ort, save, vinfo

RNG = np.random.default_rng(0)


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _prune(proto, feed, **opts):
    """Prune a copy; return (pruned proto, result) after checking the I/O and onnx.checker."""
    result = prune_model(ir.from_proto(proto), PruneOptions(**opts))
    out = to_proto(result.model)
    onnx.checker.check_model(out)
    assert [(i.name, i.type) for i in out.graph.input] == [(i.name, i.type) for i in proto.graph.input]
    assert [(o.name, o.type) for o in out.graph.output] == [(o.name, o.type) for o in proto.graph.output]
    return out, result


def _assert_same_outputs(proto, pruned, feed, atol=1e-5):
    for want, got in zip(run_ort(proto, feed), run_ort(pruned, feed)):
        assert want.shape == got.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)
    for want, got in zip(run_ort(proto, feed), run_ort(pruned, feed, disable_opt=False)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)


def _conv(name, x, w, b=None, **attrs):
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [name], name=name, **attrs)


def _weights(model_proto):
    return {t.name: onnx.numpy_helper.to_array(t) for t in model_proto.graph.initializer}


def test_residual_add_ties_producers():
    dead = [1, 5]
    w1, b1, w2, w3 = _w(8, 4, 1, 1), _w(8), _w(8, 8, 3, 3), _w(6, 8, 1, 1)
    w1[dead], b1[dead], w2[dead], w3[:, dead] = 0, 0, 0, 0
    nodes = [_conv("c1", "x", "w1", "b1"), helper.make_node("Relu", ["c1"], ["r1"]),
             _conv("c2", "r1", "w2", pads=[1, 1, 1, 1]), helper.make_node("Add", ["c2", "r1"], ["s"], name="res"),
             _conv("c3", "s", "w3")]
    proto = make_model(nodes, [vinfo("x", ["N", 4, 5, 5])], [vinfo("c3", ["N", 6, 5, 5])],
                       {"w1": w1, "b1": b1, "w2": w2, "w3": w3})
    feed = {"x": _w(2, 4, 5, 5)}
    pruned, result = _prune(proto, feed, sparsity=0.25)
    _assert_same_outputs(proto, pruned, feed)
    group = next(r for r in result.groups if r["status"] == "pruned")
    assert group["layers"] == 2 and (group["before"], group["after"]) == (8, 6)
    w = _weights(pruned)
    sizes = {n.name: w[n.input[1]].shape for n in pruned.graph.node if n.op_type == "Conv"}
    assert list(sizes["c1"]) == [6, 4, 1, 1] and list(sizes["c2"]) == [6, 6, 3, 3] and list(sizes["c3"]) == [6, 6, 1, 1]


def test_depthwise_and_batchnorm_follow_their_input():
    dead = [2, 3]
    w1, w_dw, b_dw, w3 = _w(8, 4, 1, 1), _w(8, 1, 3, 3), _w(8), _w(6, 8, 1, 1)
    w1[dead], w_dw[dead], w3[:, dead] = 0, 0, 0
    bn = {"scale": _w(8), "bias": _w(8), "mean": _w(8), "var": np.abs(_w(8)) + 0.5}
    nodes = [_conv("c1", "x", "w1"),
             helper.make_node("BatchNormalization", ["c1", "scale", "bias", "mean", "var"], ["bn"], name="bn"),
             helper.make_node("Clip", ["bn", "lo", "hi"], ["r1"]),
             _conv("dw", "r1", "w_dw", "b_dw", group=8, pads=[1, 1, 1, 1]), helper.make_node("Relu", ["dw"], ["r2"]),
             _conv("c3", "r2", "w3")]
    proto = make_model(nodes, [vinfo("x", [1, 4, 6, 6])], [vinfo("c3", [1, 6, 6, 6])],
                       {"w1": w1, "w_dw": w_dw, "b_dw": b_dw, "w3": w3, "lo": np.float32(0), "hi": np.float32(6), **bn})
    feed = {"x": _w(1, 4, 6, 6)}
    pruned, result = _prune(proto, feed, sparsity=0.25)
    _assert_same_outputs(proto, pruned, feed)
    dw = next(n for n in pruned.graph.node if n.name == "dw")
    assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 6
    assert _weights(pruned)[next(n for n in pruned.graph.node if n.op_type == "BatchNormalization").input[1]].shape == (6,)


def test_concat_lays_groups_side_by_side():
    wa, wb, wc = _w(4, 3, 1, 1), _w(6, 3, 1, 1), _w(5, 10, 1, 1)
    wa[0], wb[[2, 3]], wc[:, [0, 6, 7]] = 0, 0, 0
    nodes = [_conv("a", "x", "wa"), _conv("b", "x", "wb"),
             helper.make_node("Concat", ["a", "b"], ["cat"], axis=1, name="cat"), _conv("c", "cat", "wc")]
    proto = make_model(nodes, [vinfo("x", [1, 3, 4, 4])], [vinfo("c", [1, 5, 4, 4])], {"wa": wa, "wb": wb, "wc": wc})
    feed = {"x": _w(1, 3, 4, 4)}
    pruned, result = _prune(proto, feed, sparsity=0.34)
    _assert_same_outputs(proto, pruned, feed)
    assert sorted((r["before"], r["after"]) for r in result.groups if r["status"] == "pruned") == [(4, 3), (6, 4)]
    assert _weights(pruned)[[n for n in pruned.graph.node if n.name == "c"][0].input[1]].shape == (5, 7, 1, 1)


@pytest.mark.parametrize("op", ["Flatten", "Reshape"])
def test_flatten_into_linear_cuts_spatial_blocks(op):
    dead = [1, 4]
    w, g, c = _w(6, 3, 3, 3), _w(5, 96), _w(5)
    w[dead] = 0
    for ch in dead:
        g[:, ch * 16:(ch + 1) * 16] = 0
    flat = (helper.make_node("Flatten", ["r"], ["f"], axis=1, name="flat") if op == "Flatten"
            else helper.make_node("Reshape", ["r", "shape"], ["f"], name="flat"))
    nodes = [_conv("c1", "x", "w", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r"]), flat,
             helper.make_node("Gemm", ["f", "g", "gc"], ["y"], transB=1, name="fc")]
    inits = {"w": w, "g": g, "gc": c, "shape": np.array([1, 96], np.int64)}
    proto = make_model(nodes, [vinfo("x", [1, 3, 4, 4])], [vinfo("y", [1, 5])], inits)
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(proto))
    proto = onnx.shape_inference.infer_shapes(proto)  # Flatten/Reshape need the static input shape
    feed = {"x": _w(1, 3, 4, 4)}
    pruned, _ = _prune(proto, feed, sparsity=0.34)
    _assert_same_outputs(proto, pruned, feed)
    fc = next(n for n in pruned.graph.node if n.name == "fc")
    assert _weights(pruned)[fc.input[1]].shape == (5, 64)


def _ffn(dead=(0, 3, 9, 12)):
    w1, b1, w2, b2 = _w(8, 16), _w(16), _w(16, 8), _w(8)
    w1[:, list(dead)], w2[list(dead)] = 0, 0
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="up"), helper.make_node("Add", ["b1", "h0"], ["h1"]),
             helper.make_node("Div", ["h1", "sqrt2"], ["g0"]), helper.make_node("Erf", ["g0"], ["g1"]),
             helper.make_node("Add", ["g1", "one"], ["g2"]), helper.make_node("Mul", ["h1", "g2"], ["g3"]),
             helper.make_node("Mul", ["g3", "half"], ["g"]),
             helper.make_node("MatMul", ["g", "w2"], ["y0"], name="down"), helper.make_node("Add", ["y0", "b2"], ["y"])]
    inits = {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "sqrt2": np.float32(np.sqrt(2)), "one": np.float32(1),
             "half": np.float32(0.5)}
    return make_model(nodes, [vinfo("x", ["B", "S", 8])], [vinfo("y", ["B", "S", 8])], inits)


def test_ffn_neurons():
    proto = _ffn()
    feed = {"x": _w(2, 5, 8)}
    pruned, result = _prune(proto, feed, sparsity=0.25)
    _assert_same_outputs(proto, pruned, feed)
    w = _weights(pruned)
    assert w[next(n for n in pruned.graph.node if n.name == "down").input[1]].shape == (12, 8)


def _attention(heads=4, d=2, dead_head=1, shape_from_concat=False):
    dim = heads * d
    wq, wk, wv, wo, bq = _w(dim, dim), _w(dim, dim), _w(dim, dim), _w(dim, dim), _w(dim)
    cols = slice(dead_head * d, (dead_head + 1) * d)
    wq[:, cols], wk[:, cols], wv[:, cols], wo[cols] = 0, 0, 0, 0
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q0"], name="q"), helper.make_node("Add", ["q0", "bq"], ["q1"]),
             helper.make_node("MatMul", ["x", "wk"], ["k0"], name="k"),
             helper.make_node("MatMul", ["x", "wv"], ["v0"], name="v")]
    inits = {"wq": wq, "wk": wk, "wv": wv, "wo": wo, "bq": bq, "scale": np.float32(1 / np.sqrt(d)),
             "split": np.array([0, 0, heads, d], np.int64), "merge": np.array([0, 0, dim], np.int64)}
    split = "split"
    if shape_from_concat:  # the TorchScript form: B and S read from shapes (also of the projection itself)
        nodes += [helper.make_node("Shape", ["q1"], ["qs"]), helper.make_node("Shape", ["x"], ["xs"]),
                  helper.make_node("Gather", ["qs", "zero"], ["b"]), helper.make_node("Gather", ["xs", "one"], ["s"]),
                  helper.make_node("Concat", ["b", "s", "h", "d"], ["split_shape"], axis=0)]
        inits.update({"zero": np.array([0], np.int64), "one": np.array([1], np.int64),
                      "h": np.array([heads], np.int64), "d": np.array([d], np.int64)})
        split = "split_shape"
    for name, src, perm in (("q", "q1", [0, 2, 1, 3]), ("k", "k0", [0, 2, 3, 1]), ("v", "v0", [0, 2, 1, 3])):
        nodes += [helper.make_node("Reshape", [src, split], [f"{name}r"]),
                  helper.make_node("Transpose", [f"{name}r"], [f"{name}t"], perm=perm)]
    nodes += [helper.make_node("MatMul", ["qt", "kt"], ["s0"]), helper.make_node("Mul", ["s0", "scale"], ["s1"]),
              helper.make_node("Softmax", ["s1"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "vt"], ["c0"]),
              helper.make_node("Transpose", ["c0"], ["c1"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["c1", "merge"], ["c2"]),
              helper.make_node("MatMul", ["c2", "wo"], ["y"], name="o")]
    return make_model(nodes, [vinfo("x", ["B", "S", dim])], [vinfo("y", ["B", "S", dim])], inits)


@pytest.mark.parametrize("shape_from_concat", [False, True])
def test_attention_heads(shape_from_concat):
    proto = _attention(shape_from_concat=shape_from_concat)
    feed = {"x": _w(2, 3, 8)}
    pruned, result = _prune(proto, feed, sparsity=0.25, kinds=("heads",))
    _assert_same_outputs(proto, pruned, feed)
    row = next(r for r in result.groups if r["kind"] == "heads")
    assert (row["before"], row["after"], row["status"]) == (4, 3, "pruned")
    w = _weights(pruned)
    assert w[next(n for n in pruned.graph.node if n.name == "o").input[1]].shape == (6, 8)


def test_bert_style_export_is_handled(tiny_encoder_path):
    proto = onnx.load(str(tiny_encoder_path))
    feed = {"input_ids": np.array([[1, 5, 9, 2, 0]], np.int64), "attention_mask": np.array([[1, 1, 1, 1, 0]], np.int64)}
    pruned, result = _prune(proto, feed, sparsity=0.5)
    assert result.summary["heads removed"] > 0 and result.summary["channels removed"] > 0
    out = run_ort(pruned, feed)[0]
    assert out.shape == run_ort(proto, feed)[0].shape and np.isfinite(out).all()
    assert any("LayerNormalization" in r["status"] or "Add" in r["status"] for r in result.groups)


def test_repair_matches_numpy_least_squares(tmp_path):
    rng = np.random.default_rng(3)
    w1, b1, w2, b2 = _w(8, 16), _w(16), _w(16, 4), _w(4)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y0"], name="fc2"),
             helper.make_node("Add", ["y0", "b2"], ["y"])]
    proto = make_model(nodes, [vinfo("x", ["N", 8])], [vinfo("y", ["N", 4])], {"w1": w1, "b1": b1, "w2": w2, "b2": b2})
    mix = rng.standard_normal((8, 8)).astype(np.float32)
    x = (rng.standard_normal((400, 8)) @ mix).astype(np.float32)  # correlated features: repair has work to do
    np.savez(tmp_path / "calib.npz", x=x)
    result = prune_model(ir.from_proto(proto), PruneOptions(sparsity=0.5, importance="l2", ridge=1e-9, max_samples=len(x)),
                         Dataset(tmp_path / "calib.npz"))
    pruned = to_proto(result.model)
    w = _weights(pruned)
    fc1 = next(n for n in pruned.graph.node if n.name == "fc1")
    kept = [int(np.argmin(np.abs(w1 - col[:, None]).sum(0))) for col in w[fc1.input[1]].T]
    x = x[np.arange(len(x)) % 5 != 4]  # every 5th sample is held out: the fit uses the rest
    h = np.maximum(x @ w1 + b1, 0)
    target = h @ w2 + b2
    hk = np.hstack([h[:, kept], np.ones((len(x), 1), np.float32)])
    sol = np.linalg.lstsq(hk.astype(np.float64), target.astype(np.float64), rcond=None)[0]
    want = hk @ sol
    got = run_ort(pruned, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    row = next(r for r in result.layers if r["layer"] == "fc2")
    assert row["repair"] == "applied" and row["held-out err after"] < row["held-out err before"]
    assert row["rel err after"] < row["rel err before"]
    cut_err = ((h[:, kept] @ w2[kept] + b2 - target) ** 2).sum() / (target ** 2).sum()
    np.testing.assert_allclose(row["rel err before"], cut_err, rtol=1e-3)
    np.testing.assert_allclose(row["rel err after"], ((got - target) ** 2).sum() / (target ** 2).sum(), rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_unstructured_sparsity_reached(scope):
    proto = _ffn(dead=())
    result = run_pass(PruneMagnitudePass(sparsity=0.6, scope=scope), ir.from_proto(proto))
    out = to_proto(result.model)
    onnx.checker.check_model(out)
    w = _weights(out)
    total = w["w1"].size + w["w2"].size
    zeros = (w["w1"] == 0).sum() + (w["w2"] == 0).sum()
    assert abs(zeros / total - 0.6) < 0.01 and abs(result.summary["sparsity reached"] - 0.6) < 0.01
    assert result.summary["zipped weights after"] < result.summary["zipped weights before"]
    x = _w(3, 2, 8)
    ref = run_ort(make_model(list(proto.graph.node), list(proto.graph.input), list(proto.graph.output),
                             {**_weights(proto), "w1": w["w1"], "w2": w["w2"]}), {"x": x})[0]
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], ref, rtol=1e-6, atol=1e-6)
    assert "no speed-up" in result.summary["note"]


def test_graph_without_prunable_groups_is_refused():
    nodes = [_conv("c1", "x", "w")]
    proto = make_model(nodes, [vinfo("x", [1, 3, 4, 4])], [vinfo("c1", [1, 4, 4, 4])], {"w": _w(4, 3, 1, 1)})
    with pytest.raises(NothingToPrune, match=r"nothing to prune: every channel group is kept whole \(graph output c1"):
        _prune(proto, None, sparsity=0.5)


def test_unknown_op_keeps_the_group_whole_and_is_named():
    nodes = [_conv("c1", "x", "w1"), helper.make_node("LpNormalization", ["c1"], ["n"], axis=1, name="norm"),
             _conv("c2", "n", "w2")]
    proto = make_model(nodes, [vinfo("x", [1, 3, 4, 4])], [vinfo("c2", [1, 4, 4, 4])],
                       {"w1": _w(8, 3, 1, 1), "w2": _w(4, 8, 1, 1)})
    with pytest.raises(NothingToPrune, match=r"\(LpNormalization: 1 group, graph output c2: 1 group\)"):
        _prune(proto, None, sparsity=0.5)  # neither group can be cut: refused, with both reasons
    an = find_groups(ir.from_proto(proto))
    c1 = next(a for a, n in an.names.items() if n == "c1")
    assert "LpNormalization (norm)" in an.group_blocked(an.root(c1))


def test_protect_keeps_layer_whole():
    proto = _ffn()
    with pytest.raises(NothingToPrune, match=r"\(protected: 2 groups\)"):
        _prune(proto, None, sparsity=0.25, protect=("^down$",))
    an = find_groups(ir.from_proto(proto), protect=("^down$",))
    assert any("protected (down)" in r for r in an.group_blocked(next(iter(an.groups()))))


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.1, 1.5])
def test_sparsity_outside_open_interval(sparsity):
    with pytest.raises(ConfigError, match=r"^sparsity must be in \(0, 1\), got "):
        prune_model(ir.from_proto(_ffn()), PruneOptions(sparsity=sparsity))
    with pytest.raises(OptionError, match="^sparsity must be strictly between 0 and 1"):
        PruneMagnitudePass(sparsity=sparsity)


def test_protect_pattern_that_protects_nothing(tmp_path):
    with pytest.raises(OptionError, match="^protect 'no_such_layer' matches no prunable layer"):
        find_groups(ir.from_proto(_ffn()), protect=("no_such_layer",))
    with pytest.raises(OptionError, match="^protect 'no_such_layer' matches no layer with weights"):
        run_pass(PruneMagnitudePass(sparsity=0.5, protect=("no_such_layer",)), ir.from_proto(_ffn()))
    with pytest.raises(OptionError, match="^scope must be global or per-layer, got 'x'"):
        PruneMagnitudePass(sparsity=0.5, scope="x")
    src = save(_ffn(), tmp_path / "ffn.onnx")
    for extra, what in (([], "prunable layer"), (["--unstructured"], "layer with weights")):
        res = CliRunner().invoke(cli, ["prune", str(src), "-o", str(tmp_path / "p.onnx"), "--sparsity", "0.5",
                                       "--protect", "no_such_layer", *extra])
        assert res.exit_code == 1 and res.stderr.startswith(f"Error: --protect 'no_such_layer' matches no {what}"), \
            res.output
        assert not (tmp_path / "p.onnx").exists()


def test_cli_prune_structured_and_unstructured(tmp_path):
    src = save(_ffn(), tmp_path / "ffn.onnx")
    runner = CliRunner()
    res = runner.invoke(cli, ["prune", str(src), "-o", str(tmp_path / "p.onnx"), "--sparsity", "0.25",
                              "--json", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    assert "groups pruned: 1" in res.output and (tmp_path / "p.onnx").exists()
    assert json.loads((tmp_path / "p.json").read_text())["tables"]["groups"][0]["after"] == 12
    res = runner.invoke(cli, ["prune", str(src), "-o", str(tmp_path / "u.onnx"), "--sparsity", "0.5", "--unstructured"])
    assert res.exit_code == 0, res.output
    assert "no speed-up" in res.output and "sparsity reached: 0.5000" in res.output


def test_cli_invalid_output_is_not_written(tmp_path, monkeypatch):
    import edgecomp.io

    def fail(model):
        raise onnx.checker.ValidationError("broken on purpose")

    monkeypatch.setattr(edgecomp.io, "check_model", fail)
    src = save(_ffn(), tmp_path / "ffn.onnx")
    res = CliRunner().invoke(cli, ["prune", str(src), "-o", str(tmp_path / "p.onnx"), "--sparsity", "0.25"])
    assert res.exit_code != 0 and "onnx.checker" in res.output and "nothing was written" in res.output
    assert not (tmp_path / "p.onnx").exists()


def test_obs_order_matches_exhaustive_search_and_beats_magnitude(tmp_path):
    """OBS removal order on a down-projection: its first pick is the input whose removal, with the
    rest re-fitted by least squares, costs least (checked exhaustively), and after repair it leaves
    less reconstruction error than activation importance."""
    from edgecomp.prune.importance import _obs_order

    rng = np.random.default_rng(5)
    h = rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12))  # correlated inputs
    w = rng.standard_normal((12, 3))
    y = h @ w
    gram = h.T @ h / len(h)

    def refit_cost(drop):
        keep = [i for i in range(12) if i not in drop]
        sol = np.linalg.lstsq(h[:, keep], y, rcond=None)[0]
        return ((h[:, keep] @ sol - y) ** 2).sum()

    order = _obs_order(gram, w, 12)
    assert int(np.argmin(order)) == min(range(12), key=lambda j: refit_cost({j}))
    keep_obs = np.argsort(-order)[:6]
    keep_act = np.argsort(-np.sqrt((h ** 2).mean(0)) * np.linalg.norm(w, axis=1))[:6]
    cost = {name: refit_cost(set(range(12)) - set(k.tolist())) for name, k in (("obs", keep_obs), ("act", keep_act))}
    assert cost["obs"] <= cost["act"]


def test_obs_importance_end_to_end_removes_dead_neurons(tmp_path):
    proto = _ffn()
    np.savez(tmp_path / "calib.npz", x=_w(40, 5, 8))
    result = prune_model(ir.from_proto(proto), PruneOptions(sparsity=0.25, importance="obs", repair=False),
                         Dataset(tmp_path / "calib.npz"))
    assert result.summary["importance"] == "obs"
    pruned = to_proto(result.model)
    feed = {"x": _w(2, 5, 8)}
    _assert_same_outputs(proto, pruned, feed)  # the 4 dead neurons cost nothing: OBS removes exactly them


def _ffn_plan(model: ir.Model):
    from edgecomp.prune.importance import plan_pruning

    ir.passes.common.NameFixPass()(model)
    return plan_pruning(find_groups(model), PruneOptions(sparsity=0.25), None)


def test_a_plan_cuts_a_copy_of_the_analysed_model_by_node_name():
    """The tolerance search analyses one model and cuts clones of it: the pass finds the planned
    nodes by name in the model it is given, and leaves the analysed model as it was."""
    from edgecomp.prune.prune_channels import PruneChannelsPass

    proto = _ffn()
    analysed = ir.from_proto(proto)
    plan = _ffn_plan(analysed)
    copy = analysed.clone()
    report = run_pass(PruneChannelsPass(plan=plan), copy)
    assert report.modified and report.summary["channels removed"] == 4
    feed = {"x": _w(2, 5, 8)}
    pruned = to_proto(copy)
    _assert_same_outputs(proto, pruned, feed)
    assert _weights(to_proto(analysed))["w1"].shape == (8, 16)  # the analysed model is not cut


@pytest.mark.parametrize("change, message", [
    ("rename", "which this model does not have"),
    ("retype", "but this model's node of that name is a"),
    ("duplicate", "cannot tell which one it edits"),
])
def test_a_plan_for_another_model_is_refused(change, message):
    from edgecomp.errors import PassFailed
    from edgecomp.prune.prune_channels import PruneChannelsPass

    analysed = ir.from_proto(_ffn())
    plan = _ffn_plan(analysed)
    other = analysed.clone()
    down = next(n for n in other.graph if n.name == "down")
    if change == "rename":
        down.name = "elsewhere"
    elif change == "retype":
        down.op_type = "Gemm"
    else:
        next(n for n in other.graph if n.op_type == "Erf").name = "down"
    with pytest.raises(PassFailed, match=message):
        run_pass(PruneChannelsPass(plan=plan), other)
