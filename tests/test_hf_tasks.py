"""`export --hf` by task, inferred from config.json like optimum's --task: tiny random models
of each family, exported through the CLI and checked against torch in onnxruntime at other
batch/sequence sizes than the export example (the dynamic axes), heads kept."""

import re

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from edgecomp.cli import cli
from edgecomp.measure.validate import compare_outputs, output_kind
from tests.conftest import run_ort

transformers = pytest.importorskip("transformers")

ATOL = 1e-4  # onnxruntime vs torch, absolute


def _perturb(model):
    """Random biases and LayerNorm parameters (they start at 0 and 1), so nothing is degenerate."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _save(model, folder):
    _perturb(model).save_pretrained(folder)
    return folder


def _export(tmp_path, folder, *extra, name=None):
    out = tmp_path / f"{name or folder.name}.onnx"
    res = CliRunner().invoke(cli, ["export", "--hf", str(folder), "-o", str(out), *map(str, extra)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out, res.output


def _error_line(folder, tmp_path, *extra) -> str:
    res = CliRunner().invoke(cli, ["export", "--hf", str(folder), "-o", str(tmp_path / "x.onnx"), *extra])
    lines = [l for l in res.output.strip().splitlines() if l.strip()]
    assert res.exit_code != 0 and "Traceback" not in res.output and len(lines) == 1, res.output
    assert not (tmp_path / "x.onnx").exists()
    return lines[0]


def _meta(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _io(path):
    m = onnx.load(str(path))

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {i.name: dims(i) for i in m.graph.input}, {o.name: dims(o) for o in m.graph.output}


def _ids(vocab, batch, seq, pad_from=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad_from is not None:  # the last row padded from this position on
        ids[-1, pad_from:], mask[-1, pad_from:] = 0, 0
    return ids, mask


def _mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=1)


def _feed(ids, mask):
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


BERT = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, initializer_range=0.2)


@pytest.fixture(scope="module")
def bert_cls(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "bert-cls"
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**BERT, num_labels=3))
    return _save(model, folder)


# --- text --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "distilbert", "albert", "xlm-roberta", "electra", "mpnet", "deberta-v2"])
def test_text_encoders_export_sentence_embeddings(tmp_path, family):
    config, cls = {
        "bert": (transformers.BertConfig(**BERT), transformers.BertModel),
        "xlm-roberta": (transformers.XLMRobertaConfig(**BERT, pad_token_id=1), transformers.XLMRobertaModel),
        "electra": (transformers.ElectraConfig(**BERT, embedding_size=16), transformers.ElectraModel),
        "mpnet": (transformers.MPNetConfig(**BERT), transformers.MPNetModel),
        "deberta-v2": (transformers.DebertaV2Config(**BERT), transformers.DebertaV2Model),
        "distilbert": (transformers.DistilBertConfig(vocab_size=300, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                                     max_position_embeddings=64, initializer_range=0.2),
                       transformers.DistilBertModel),
        "albert": (transformers.AlbertConfig(vocab_size=300, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                             initializer_range=0.2), transformers.AlbertModel),
    }[family]
    folder = _save(cls(config), tmp_path / family)
    out, text = _export(tmp_path, folder)
    assert f"task feature-extraction (from architectures {cls.__name__})" in text
    ins, outs = _io(out)
    assert ins == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert list(outs) == ["output"] and len(outs["output"]) == 2
    assert _meta(out)["edgecomp.task"] == "feature-extraction"

    ids, mask = _ids(300, 3, 9, pad_from=5)
    got = run_ort(out, _feed(ids, mask))[0]
    ref_model = cls.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = _mean_pool(ref_model(input_ids=ids, attention_mask=mask).last_hidden_state, mask).numpy()
    assert got.shape == (3, 32)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert output_kind("output", [got]) == "embeddings"


def test_sequence_classification_keeps_its_head(tmp_path, bert_cls):
    out, text = _export(tmp_path, bert_cls)
    assert "task text-classification (from architectures BertForSequenceClassification)" in text
    assert "outputs ['logits']" in text
    ins, outs = _io(out)
    assert outs == {"logits": [outs["logits"][0], 3]} and isinstance(outs["logits"][0], str)
    meta = _meta(out)
    assert meta["edgecomp.task"] == "text-classification"
    assert meta["edgecomp.task_source"] == "architectures BertForSequenceClassification"

    ids, mask = _ids(300, 4, 11, pad_from=6)
    got = run_ort(out, _feed(ids, mask))[0]
    ref_model = transformers.BertForSequenceClassification.from_pretrained(bert_cls, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask).logits.numpy()
    assert got.shape == (4, 3)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)  # logits, not embeddings
    assert output_kind("logits", [got]) == "logits"


def test_task_override_exports_the_base_model(tmp_path, bert_cls):
    out, text = _export(tmp_path, bert_cls, "--task", "feature-extraction", "--hf-output", "hidden")
    assert "task feature-extraction (from --task)" in text
    assert _meta(out)["edgecomp.task_source"] == "--task" and _meta(out)["edgecomp.hf_output"] == "hidden"
    ids, mask = _ids(300, 2, 7)
    got = run_ort(out, _feed(ids, mask))[0]
    base = transformers.BertModel.from_pretrained(bert_cls, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    assert got.shape == (2, 7, 32)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_token_classification_logits_per_token(tmp_path):
    folder = _save(transformers.BertForTokenClassification(transformers.BertConfig(**BERT, num_labels=5)),
                   tmp_path / "bert-tok")
    out, text = _export(tmp_path, folder)
    assert "task token-classification (from architectures BertForTokenClassification)" in text
    ins, outs = _io(out)
    assert list(outs) == ["logits"] and outs["logits"][2] == 5
    ids, mask = _ids(300, 2, 13, pad_from=8)
    got = run_ort(out, _feed(ids, mask))[0]
    ref_model = transformers.BertForTokenClassification.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask).logits.numpy()
    assert got.shape == (2, 13, 5)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    assert output_kind("logits", [got]) == "logits"
    fid = compare_outputs("logits", [ref], [got])
    assert fid.top1_agreement == 1.0 and fid.knn_agreement is None


def _gpt2_tokenizer(folder):
    """A byte-level BPE tokenizer with no pad token, as GPT-2's (trained here, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["edgecomp exports this encoder", "a second, somewhat longer example sentence"] * 20,
                            trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>")
    assert fast.pad_token_id is None
    fast.save_pretrained(folder)


GPT2 = dict(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=64, initializer_range=0.2)


def test_gpt2_last_position_logits(tmp_path):
    folder = _save(transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)), tmp_path / "gpt2")
    _gpt2_tokenizer(folder)
    out, text = _export(tmp_path, folder)
    assert "task text-generation (from architectures GPT2LMHeadModel)" in text
    ins, outs = _io(out)
    assert set(ins) == {"input_ids", "attention_mask"} and list(outs) == ["logits"] and outs["logits"][1] == 300
    ref_model = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()

    ids, mask = _ids(300, 1, 6)
    got = run_ort(out, _feed(ids, mask))[0]
    with torch.no_grad():
        full = ref_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert got.shape == (1, 300)
    np.testing.assert_allclose(got, full[:, -1].numpy(), atol=ATOL, rtol=0)

    # a right-padded row: the logits of its last real token, as when run unpadded
    ids2, mask2 = _ids(300, 2, 9, pad_from=4)
    got2 = run_ort(out, _feed(ids2, mask2))[0]
    with torch.no_grad():
        alone = ref_model(input_ids=ids2[1:, :4], use_cache=False).logits[:, -1].numpy()
        first = ref_model(input_ids=ids2[:1], use_cache=False).logits[:, -1].numpy()
    np.testing.assert_allclose(got2[1:], alone, atol=ATOL, rtol=0)
    np.testing.assert_allclose(got2[:1], first, atol=ATOL, rtol=0)


def test_gpt2_base_model_with_tied_embeddings_is_text_generation(tmp_path):
    folder = _save(transformers.GPT2Model(transformers.GPT2Config(**GPT2)), tmp_path / "gpt2-base")
    out, text = _export(tmp_path, folder)
    assert "task text-generation (from architectures GPT2Model; decoder-only" in text
    ids, mask = _ids(300, 1, 5)
    base = transformers.GPT2Model.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        hidden = base(input_ids=ids, use_cache=False).last_hidden_state[:, -1]
        ref = (hidden @ base.wte.weight.T).numpy()  # the tied LM head
    np.testing.assert_allclose(run_ort(out, _feed(ids, mask))[0], ref, atol=ATOL, rtol=0)


def test_llama_last_position_logits(tmp_path):
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                      initializer_range=0.2)
    folder = _save(transformers.LlamaForCausalLM(config), tmp_path / "llama")
    out, text = _export(tmp_path, folder)
    assert "task text-generation (from architectures LlamaForCausalLM)" in text
    ref_model = transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ids, mask = _ids(300, 2, 12, pad_from=7)
    got = run_ort(out, _feed(ids, mask))[0]
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert got.shape == (2, 300)
    np.testing.assert_allclose(got, torch.stack([ref[0, -1], ref[1, 6]]).numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["T5ForConditionalGeneration", "T5EncoderModel"])
def test_t5_exports_the_encoder_only(tmp_path, arch):
    config = transformers.T5Config(vocab_size=300, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                   initializer_factor=2.0)
    folder = _save(getattr(transformers, arch)(config), tmp_path / arch)
    out, text = _export(tmp_path, folder)
    encoder_only = "; the encoder only" if arch == "T5ForConditionalGeneration" else ""
    assert f"task feature-extraction (from architectures {arch}{encoder_only})" in text
    encoder = transformers.T5EncoderModel.from_pretrained(folder, attn_implementation="eager").eval()
    ids, mask = _ids(300, 3, 10, pad_from=6)
    with torch.no_grad():
        hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    got = run_ort(out, _feed(ids, mask))[0]
    np.testing.assert_allclose(got, _mean_pool(hidden, mask).numpy(), atol=ATOL, rtol=0)
    if arch == "T5ForConditionalGeneration":
        out, _ = _export(tmp_path, folder, "--hf-output", "hidden", name="t5-hidden")
        got = run_ort(out, _feed(ids, mask))[0]
        assert got.shape == (3, 10, 32)
        np.testing.assert_allclose(got, hidden.numpy(), atol=ATOL, rtol=0)


# --- images and audio --------------------------------------------------------------------------

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
           patch_size=8, num_channels=3, initializer_range=0.2)


def test_vit_image_classification(tmp_path):
    folder = _save(transformers.ViTForImageClassification(transformers.ViTConfig(**VIT, num_labels=7)),
                   tmp_path / "vit-cls")
    out, text = _export(tmp_path, folder)
    assert "task image-classification (from architectures ViTForImageClassification)" in text
    ins, outs = _io(out)
    assert ins == {"pixel_values": ["batch", 3, 32, 32]} and list(outs) == ["logits"] and outs["logits"][1] == 7
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ref_model = transformers.ViTForImageClassification.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model(pixel_values=x).logits.numpy()
    got = run_ort(out, {"pixel_values": x.numpy()})[0]
    assert got.shape == (3, 7)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_vit_feature_extraction_is_the_normalized_cls_token(tmp_path):
    folder = _save(transformers.ViTModel(transformers.ViTConfig(**VIT)), tmp_path / "vit")
    out, text = _export(tmp_path, folder)
    assert "task feature-extraction (from architectures ViTModel)" in text
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ref_model = transformers.ViTModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        out_t = ref_model(pixel_values=x)
    cls = torch.nn.functional.normalize(out_t.last_hidden_state[:, 0], dim=1).numpy()
    got = run_ort(out, {"pixel_values": x.numpy()})[0]
    np.testing.assert_allclose(got, cls, atol=ATOL, rtol=0)
    # ViT's pooler output (dense + tanh of [CLS]) is not logits: no top-1 agreement for it
    pooler = out_t.pooler_output.numpy()
    assert output_kind("pooler_output", [pooler]) is None
    assert compare_outputs("pooler_output", [pooler], [pooler]).top1_agreement is None


def test_whisper_exports_the_encoder(tmp_path):
    config = transformers.WhisperConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                        decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
                                        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[],
                                        init_std=0.2)
    folder = _save(transformers.WhisperForConditionalGeneration(config), tmp_path / "whisper")
    out, text = _export(tmp_path, folder, "--hf-output", "hidden")
    assert "task feature-extraction (from architectures WhisperForConditionalGeneration; the encoder only)" in text
    ins, outs = _io(out)
    assert ins == {"input_features": ["batch", 8, 32]}  # the frame axis stays fixed: 2 x max_source_positions
    assert list(outs) == ["output"]
    x = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(5))
    encoder = transformers.WhisperModel.from_pretrained(folder, attn_implementation="eager").get_encoder().eval()
    with torch.no_grad():
        ref = encoder(input_features=x).last_hidden_state
    got = run_ort(out, {"input_features": x.numpy()})[0]
    assert got.shape == (3, 16, 32)
    np.testing.assert_allclose(got, ref.numpy(), atol=ATOL, rtol=0)

    emb, _ = _export(tmp_path, folder, name="whisper-emb")
    got = run_ort(emb, {"input_features": x.numpy()})[0]
    np.testing.assert_allclose(got, torch.nn.functional.normalize(ref.mean(1), dim=1).numpy(), atol=ATOL, rtol=0)


# --- what is refused, in one line --------------------------------------------------------------

def _config_only(folder, **config):
    import json

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_unsupported_architectures_and_tasks_are_one_line(tmp_path, bert_cls):
    supported = r"supported tasks: feature-extraction .*text-classification .*token-classification .*" \
                r"image-classification .*text-generation"
    foo = _config_only(tmp_path / "foo", architectures=["FooBarModel"], model_type="foobar")
    line = _error_line(foo, tmp_path)
    assert line.startswith("Error: ") and "foobar" in line and re.search(supported, line), line

    foo_bert = _config_only(tmp_path / "foo-bert", architectures=["FooBarModel"], model_type="bert", **BERT)
    line = _error_line(foo_bert, tmp_path)
    assert "FooBarModel is not in transformers" in line and re.search(supported, line), line

    mlm = _save(transformers.BertForMaskedLM(transformers.BertConfig(**BERT)), tmp_path / "mlm")
    line = _error_line(mlm, tmp_path)
    assert "BertForMaskedLM is not an architecture edgecomp exports from Hugging Face folders" in line, line
    assert re.search(supported, line) and "task feature-extraction exports its base model" in line, line

    line = _error_line(bert_cls, tmp_path, "--task", "summarization")
    assert "'summarization' is not one of 'auto', 'feature-extraction'" in line, line
    line = _error_line(bert_cls, tmp_path, "--task", "image-classification")
    assert "--task image-classification does not apply to bert" in line, line
    line = _error_line(bert_cls, tmp_path, "--hf-output", "hidden")
    assert "--hf-output hidden applies to feature-extraction" in line, line
    res = CliRunner().invoke(cli, ["export", "models.resnet:small_resnet", "-o", str(tmp_path / "r.onnx"),
                                   "--task", "text-classification"])
    assert res.exit_code != 0 and "--task applies to Hugging Face folders" in res.output


def test_recipe_export_task_option():
    from edgecomp.errors import ConfigError
    from edgecomp.pipeline.recipe import STEP_OPTIONS, parse_recipe

    opt = STEP_OPTIONS["export"]["task"]
    assert opt.default == "auto" and "text-generation" in opt.choices
    rec = parse_recipe({"steps": [{"step": "export", "task": "text-classification"}]})
    assert rec.steps[0]["task"] == "text-classification"
    with pytest.raises(ConfigError, match="task must be one of auto, feature-extraction"):
        parse_recipe({"steps": [{"step": "export", "task": "summarization"}]})


# --- which outputs validate scores by top-1 ----------------------------------------------------

def test_output_kind_rule():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 4)).astype(np.float32) * 3
    unit = logits / np.linalg.norm(logits, axis=1, keepdims=True)
    assert output_kind("logits", [logits]) == "logits"
    assert output_kind("output", [logits]) == "logits"  # a classifier's plain output
    assert output_kind("start_logits", [unit]) == "logits"  # the name decides
    assert output_kind("output", [unit]) == "embeddings"
    for name in ("pooler_output", "sentence_embedding", "last_hidden_state", "image_features"):
        assert output_kind(name, [logits]) is None, name
    assert output_kind("logits", [rng.standard_normal((2, 5, 4)).astype(np.float32)]) == "logits"
    assert output_kind("output", [rng.standard_normal((2, 5, 4)).astype(np.float32)]) is None
    assert output_kind("output", [logits.astype(np.int64)]) is None
    assert output_kind("output", [logits[:, :1]]) is None
    fid = compare_outputs("pooler_output", [logits], [logits])
    assert fid.top1_agreement is None and fid.knn_agreement is None
