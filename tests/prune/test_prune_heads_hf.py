"""Head pruning on the attention forms of tiny random Hugging Face models (hidden 64, 4 heads of 16,
2 layers), exported with `edgecomp export --hf`: BERT, ALBERT (one layer called twice), MPNet
(relative position bias), T5 encoder (position bias, no scaling, no biases), Whisper encoder
(scaled q, k_proj without bias), DeBERTa-v2 without relative attention (heads folded into the batch
axis, a computed sqrt(d) scale), Llama with as many k/v heads as q heads (rotary embeddings), GPT-2
(fused QKV Gemm + Split, its sizes an input or, at opset 12, an attribute) and the reference encoder
after onnx.version_converter (Softmax wrapped in Flatten/Reshape); DeBERTa-v2 with relative
attention (c2p/p2c) and grouped-query Llama are kept whole with the reason.

The exact check: the heads the analysis would drop are zeroed first (their columns of W_q, W_k,
W_v and rows of W_o), so L2 importance picks them, and the pruned model must equal the zeroed
unpruned one within 1e-4 — every Reshape, Split and score-bias Gather rewritten consistently.
"""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from edgecomp.cli import cli
from edgecomp.graph import const_array, count_parameters
from edgecomp.prune import prune_model
from edgecomp.prune.groups import find_groups, lift_constants
from edgecomp.prune.options import PruneOptions
from tests.conftest import run_ort

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

ATOL = 1e-4  # pruned vs zeroed-unpruned, onnxruntime both, absolute
DROP = (1, 3)  # the heads zeroed (and so pruned) in every block
HEADS, D = 4, 16

_B = {"vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": HEADS,
      "intermediate_size": 128, "max_position_embeddings": 64, "initializer_range": 0.2}

_LLAMA = {"vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": HEADS,
          "intermediate_size": 128, "max_position_embeddings": 64}


def _models():
    t = transformers
    return {
        "bert": lambda: t.BertModel(t.BertConfig(**_B)),
        "albert": lambda: t.AlbertModel(t.AlbertConfig(**_B, embedding_size=16)),
        "mpnet": lambda: t.MPNetModel(t.MPNetConfig(**_B)),
        "t5": lambda: t.T5EncoderModel(t.T5Config(vocab_size=300, d_model=64, d_kv=D, d_ff=128, num_layers=2,
                                                  num_heads=HEADS, initializer_factor=2.0)),
        "whisper": lambda: t.WhisperForConditionalGeneration(t.WhisperConfig(
            vocab_size=100, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=HEADS,
            decoder_attention_heads=HEADS, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=8,
            max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[], init_std=0.2)),
        "gpt2": lambda: t.GPT2Model(t.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=HEADS, n_positions=64,
                                                 initializer_range=0.2, bos_token_id=1, eos_token_id=1)),
        "deberta": lambda: t.DebertaV2Model(t.DebertaV2Config(**_B)),
        "llama": lambda: t.LlamaModel(t.LlamaConfig(**_LLAMA, num_key_value_heads=HEADS)),
        "llama-gqa": lambda: t.LlamaModel(t.LlamaConfig(**_LLAMA, num_key_value_heads=2)),
        "deberta-rel": lambda: t.DebertaV2Model(t.DebertaV2Config(**_B, relative_attention=True,
                                                                  pos_att_type=["p2c", "c2p"], position_buckets=8)),
    }


def _export(builder, folder, out, *extra):
    torch.manual_seed(0)
    model = builder()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(folder)
    res = CliRunner().invoke(cli, ["export", "--hf", str(folder), "-o", str(out), *extra], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads_hf")
    cache = {}

    def get(arch):
        if arch not in cache:
            if arch == "encoder-vc17":
                from tests.zoo import _build_reference

                cache[arch] = _build_reference("encoder", "vc17", root)
            else:
                extra = {"whisper": ("--hf-output", "hidden"), "gpt2-opset12": ("--opset", "12")}.get(arch, ())
                builder = _models()[arch.removesuffix("-opset12")]
                cache[arch] = _export(builder, root / arch, root / f"{arch}.onnx", *extra)
        return cache[arch]

    return get


def _feed(proto):
    rng = np.random.default_rng(0)
    feed = {}
    for i in proto.graph.input:
        dims = [d.dim_value or (2 if j == 0 else 7) for j, d in enumerate(i.type.tensor_type.shape.dim)]
        if i.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            feed[i.name] = np.ones(dims, np.int64) if "mask" in i.name else rng.integers(4, 100, dims)
        else:
            feed[i.name] = rng.standard_normal(dims).astype(np.float32)
    if "attention_mask" in feed:
        feed["attention_mask"][-1, 5:] = 0  # a padded row
    return feed


def _zero_heads(proto, drop=DROP, kind="heads"):
    """Zero the slices of every prunable group's weights that belong to its units ``drop`` (heads,
    or channels: then every other one)."""
    model = ir.from_proto(proto)
    lift_constants(model)
    an = find_groups(model)
    heads = {a for a, k in an.kinds.items() if k == kind and not an.group_blocked(an.root(a))}
    if kind == "channels":
        drop = range(0, max(an.sizes[a] for a in heads), 2)
    done = set()
    for e in an.edits:
        if e.kind != "param" or e.role not in ("in", "out") or not set(e.layout.atoms()) & heads:
            continue
        value = e.node.inputs[e.index]
        if id(value) in done:
            continue
        done.add(id(value))
        arr = const_array(value).copy()
        keep = {a: np.array([h for h in range(an.sizes[a]) if h not in drop]) for a in e.layout.atoms()}
        gone = np.setdiff1d(np.arange(arr.shape[e.axis]), e.layout.indices(keep, an.sizes))
        idx = [slice(None)] * arr.ndim
        idx[e.axis] = gone
        arr[tuple(idx)] = 0
        value.const_value = ir.tensor(arr, name=value.name)
    return ir.to_proto(model), len(heads)


def _prune_heads(proto, **opts):
    return prune_model(ir.from_proto(proto), PruneOptions(kinds=("heads",), sparsity=0.5, importance="l2", **opts))


@pytest.mark.parametrize("arch", ["bert", "albert", "mpnet", "t5", "whisper", "gpt2", "gpt2-opset12", "deberta",
                                  "llama", "encoder-vc17"])
def test_pruned_heads_match_the_zeroed_model(exported, arch):
    proto = onnx.load(str(exported(arch)))
    zeroed, blocks = _zero_heads(proto)
    assert blocks >= 1
    result = _prune_heads(zeroed)
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out)
    feed = _feed(proto)
    ref, got = run_ort(zeroed, feed), run_ort(out, feed)
    for r, g in zip(ref, got):
        assert r.shape == g.shape
        np.testing.assert_allclose(g, r, atol=ATOL, rtol=0)
    # the report: every matched block lost the two zeroed heads
    rows = [r for r in result.groups if r["kind"] == "heads" and r["status"] == "pruned"]
    removed = sum(r["before"] - r["after"] for r in rows)
    sites = 2 if arch != "albert" else 1  # ALBERT's two call sites share one layer: one group
    assert len(rows) == sites and removed == len(DROP) * sites == result.summary["heads removed"]
    # the weights: q/k/v lose len(DROP)·d columns, the output projection as many rows
    cut = {r["layer"]: r for r in result.layers}
    assert cut and all(r["in"] == "64→32" or r["out"] in ("64→32", "192→96") for r in cut.values()), cut
    assert sum(r["out"] == "192→96" for r in cut.values()) == (2 if arch.startswith("gpt2") else 0)
    assert count_parameters(result.model) < count_parameters(ir.from_proto(proto))


def test_score_bias_is_gathered_per_head(exported):
    """T5 adds one position bias [1, h, s, s] to every block (computed once, shared): each block
    reads the heads it keeps through its own Gather, and the shared bias stays whole."""
    result = _prune_heads(onnx.load(str(exported("t5"))))
    gathers = [n for n in result.model.graph if n.op_type == "Gather" and "heads_gather" in n.name]
    assert len(gathers) == 2
    assert all(int(n.attributes["axis"].value) == 1 for n in gathers)
    assert {tuple(const_array(n.inputs[1]).tolist()) for n in gathers} <= {(0, 1), (0, 2), (0, 3), (1, 2), (1, 3),
                                                                            (2, 3)}
    # BERT's mask broadcasts over heads: nothing inserted there
    bert = _prune_heads(onnx.load(str(exported("bert"))))
    assert not [n for n in bert.model.graph if "heads_gather" in (n.name or "")]


def test_gpt2_fused_split_sizes_follow(exported):
    result = _prune_heads(onnx.load(str(exported("gpt2"))))
    splits = [n for n in result.model.graph if n.op_type == "Split"]
    assert splits and all(const_array(n.inputs[1]).tolist() == [32, 32, 32] for n in splits)
    # the head Reshapes keep d = 16 and infer the head count (-1): only the 3-D Reshape to 3·h·d changes
    widths = [const_array(c).tolist() for n in result.model.graph if n.op_type == "Concat"
              for c in n.inputs if const_array(c) is not None and const_array(c).tolist() in ([192], [96])]
    assert widths and all(w == [96] for w in widths)


def test_albert_shared_layer_is_cut_once_with_data(exported, tmp_path):
    """With activation importance the two call sites see different inputs; they still keep the same
    heads (one group), so the shared weights are sliced once and the model shrinks."""
    from edgecomp.data import Dataset

    proto = onnx.load(str(exported("albert")))
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(4, 300, (10, 12)),
             attention_mask=np.ones((10, 12), np.int64))
    result = prune_model(ir.from_proto(proto), PruneOptions(sparsity=0.5), Dataset(tmp_path / "calib.npz"))
    before, after = count_parameters(ir.from_proto(proto)), count_parameters(result.model)
    assert after < before
    heads = [r for r in result.groups if r["kind"] == "heads"]
    assert len(heads) == 1 and heads[0]["layers"] == 2
    for layer in ("query", "key", "value", "dense"):  # both call sites read one sliced weight
        sites = [n for n in result.model.graph if n.op_type == "MatMul" and f"attention/{layer}" in n.name]
        assert len(sites) == 2 and sites[0].inputs[1] is sites[1].inputs[1], layer


@pytest.mark.parametrize("arch, reason", [("deberta-rel", "disentangled relative attention"),
                                          ("llama-gqa", "grouped-query attention")])
def test_unfollowed_attention_says_why(exported, arch, reason, tmp_path):
    path = exported(arch)
    res = CliRunner().invoke(cli, ["prune", str(path), "--kinds", "heads", "-o", str(tmp_path / "p.onnx")])
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert res.exit_code != 0 and len(lines) == 1 and "Traceback" not in res.output, res.output
    assert "nothing to prune" in lines[0] and reason in lines[0], lines[0]
    assert not (tmp_path / "p.onnx").exists()
    # with channels too, the report names every block kept whole and why
    result = prune_model(ir.from_proto(onnx.load(str(path))), PruneOptions(sparsity=0.5))
    heads = [r for r in result.groups if r["kind"] == "heads"]
    assert len(heads) == 2 and all(reason in r["status"] and "Softmax" in r["group"] for r in heads), heads
    assert count_parameters(result.model) <= count_parameters(ir.from_proto(onnx.load(str(path))))


@pytest.mark.parametrize("arch", ["bert", "albert", "mpnet", "t5", "whisper", "gpt2", "deberta"])
def test_channels_and_heads_never_grow(exported, arch):
    proto = onnx.load(str(exported(arch)))
    result = prune_model(ir.from_proto(proto), PruneOptions(sparsity=0.5))
    onnx.checker.check_model(ir.to_proto(result.model))
    run_ort(ir.to_proto(result.model), _feed(proto))
    assert count_parameters(result.model) < count_parameters(ir.from_proto(proto))


def test_unknown_score_term_is_expanded_then_gathered(exported, monkeypatch):
    """Where a score term's heads axis is unknown (no probe: a model synthesized inputs cannot run),
    it is expanded to [1, h, 1, 1] and gathered: still exact, whether it broadcast (BERT's mask) or not."""
    from edgecomp.prune import attention

    monkeypatch.setattr(attention, "_probe_terms", lambda *a: {})
    for arch in ("bert", "mpnet"):
        proto = onnx.load(str(exported(arch)))
        zeroed, _ = _zero_heads(proto)
        result = _prune_heads(zeroed)
        assert any(n.op_type == "Expand" and "heads_expand" in (n.name or "") for n in result.model.graph)
        feed = _feed(proto)
        for r, g in zip(run_ort(zeroed, feed), run_ort(ir.to_proto(result.model), feed)):
            np.testing.assert_allclose(g, r, atol=ATOL, rtol=0)


def test_gpt2_ffn_neurons_follow_its_2d_reshapes(exported):
    """GPT-2 runs its Conv1D as Gemm on [-1, C] with Reshapes around it (and a Shape read of the
    width, which follows by itself): the FFN neurons are a group, and cutting the zeroed half is exact."""
    proto = onnx.load(str(exported("gpt2")))
    zeroed, groups = _zero_heads(proto, kind="channels")
    assert groups == 2  # c_fc of each block
    result = prune_model(ir.from_proto(zeroed), PruneOptions(kinds=("channels",), sparsity=0.5, importance="l2"))
    assert result.summary["channels removed"] == 256
    feed = _feed(proto)
    for r, g in zip(run_ort(zeroed, feed), run_ort(ir.to_proto(result.model), feed)):
        np.testing.assert_allclose(g, r, atol=ATOL, rtol=0)


def test_attention_probabilities_read_outside_keep_the_block_whole(exported):
    """A model that also outputs a block's attention probabilities (output_attentions): cutting its
    heads would change that output, so the block is kept whole and says why; the other is cut."""
    proto = onnx.load(str(exported("bert")))
    softmax = next(n for n in proto.graph.node if n.op_type == "Softmax")
    proto.graph.output.append(onnx.helper.make_tensor_value_info(softmax.output[0], onnx.TensorProto.FLOAT,
                                                                        ["batch", HEADS, "seq", "seq"]))
    result = _prune_heads(proto)
    heads = sorted((r["status"] for r in result.groups if r["kind"] == "heads"), key=len)
    assert heads[0] == "pruned" and "inside the block is a graph output" in heads[1], heads
