"""Hugging Face folders: the task a local folder is exported as (text, vision, audio), its module and
example inputs, and :func:`export_hf`.

The task comes from ``config.json``'s architectures (or ``model_type``), or from ``task``; each
of :data:`~edgecomp.export.options.HF_TASKS` has its module: feature-extraction writes pooled,
L2-normalized embeddings (text: mean pooling over the attention mask; ViT-style: [CLS]; Whisper
encoders: mean over frames) or the last hidden states; heads write ``logits`` ([batch, labels],
[batch, sequence, labels] for token classification, [batch, vocab] at the last attended position
for text generation). Example inputs need no tokenizer that can pad: ids come from the folder's
tokenizer when it has one, else from ``config.vocab_size``; images from ``image_size`` and
``num_channels``; audio from ``num_mel_bins`` and ``max_source_positions``.

Needs torch and transformers (``pip install 'edgecomp[torch,hf]'``), imported when called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from edgecomp.errors import ExportError, OptionError, SpecError
from edgecomp.export.exporters import ExportResult, export_model, plan_exporters
from edgecomp.export.options import DEFAULT_OPSET, HF_AUTO_ORDER, HF_OUTPUTS, HF_TASKS
from edgecomp.extras import require_torch
from edgecomp.io import check_output_path, first_line

__all__ = ["HFModel", "hf_model", "hf_encoder", "export_hf", "infer_hf_task"]


_HEAD_TASKS = (("ForSequenceClassification", "text-classification"), ("ForTokenClassification", "token-classification"),
               ("ForImageClassification", "image-classification"), ("ForCausalLM", "text-generation"),
               ("LMHeadModel", "text-generation"))

_SENTENCES = ["edgecomp exports this encoder", "a second, somewhat longer example sentence"]


def _supported_tasks() -> str:
    return "supported tasks: " + ", ".join(f"{t} ({what})" for t, what in HF_TASKS.items())


@dataclasses.dataclass
class HFModel:
    """A Hugging Face folder made ready for export: the module, its example inputs and what it is."""

    module: Any
    example: dict[str, Any]
    task: str
    task_source: str  # "architectures BertForSequenceClassification", "--task", ...
    modality: str  # text | vision | audio
    model_class: str  # the transformers class loaded
    output_names: list[str]
    dynamic: dict[str, dict[int, str]]
    metadata: dict[str, str]


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' loading chatter (unused pooler weights, unexpected decoder keys) off stderr."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _arch_task(arch: str) -> str | None:
    """The task an architecture class name implies, from its suffix (None: not one --hf exports)."""
    for part, task in _HEAD_TASKS:
        if part in arch:  # "in": DeiTForImageClassificationWithTeacher
            return task
    if arch.endswith("Model") and "For" not in arch:  # BertModel, T5EncoderModel, GPT2Model, ViTModel
        return "feature-extraction"
    return None


def _mapped_class(auto: Any, config: Any) -> Any | None:
    try:
        return auto._model_mapping[type(config)]
    except (KeyError, AttributeError):
        return None


def _decoder_only(config: Any) -> bool:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return (not getattr(config, "is_encoder_decoder", False) and _mapped_class(AutoModelForCausalLM, config) is not None
            and _mapped_class(AutoModelForMaskedLM, config) is None)


def infer_hf_task(config: Any) -> tuple[str, str]:
    """(task, where it came from) for a transformers config, like optimum's ``--task`` inference.

    From the first of ``architectures``: ``...ForSequenceClassification`` → text-classification,
    ``...ForTokenClassification`` → token-classification, ``...ForImageClassification`` →
    image-classification, ``...ForCausalLM`` / ``...LMHeadModel`` → text-generation,
    ``...ForConditionalGeneration`` of an encoder-decoder and base models (``...Model``) →
    feature-extraction; a decoder-only base model whose LM head is its tied embedding matrix
    (GPT2Model) → text-generation. Without ``architectures``: from ``model_type`` the same way.
    Any other head (masked LM, question answering, ...) is an :class:`ExportError`.
    """
    archs = list(getattr(config, "architectures", None) or [])
    if archs:
        arch = str(archs[0])
        task = _arch_task(arch)
        encoder_only = False
        if task is None and arch.endswith("ForConditionalGeneration") and getattr(config, "is_encoder_decoder", False):
            task, encoder_only = "feature-extraction", True
        if task is None:
            raise ExportError(f"{arch} is not an architecture edgecomp exports from Hugging Face folders; "
                              f"{_supported_tasks()}; task feature-extraction exports its base model without the head")
        source = f"architectures {arch}"
        if task == "feature-extraction" and getattr(config, "is_encoder_decoder", False):
            encoder_only = True
        if encoder_only:
            source += "; the encoder only"
    else:
        task, source = "feature-extraction", f"model_type {config.model_type}, no architectures in config.json"
    if task == "feature-extraction" and _decoder_only(config) and getattr(config, "tie_word_embeddings", False):
        task, source = "text-generation", source + "; decoder-only, its LM head is the tied embedding matrix"
    return task, source


def _read_config(p: Path) -> Any:
    import json

    import transformers
    from transformers import CONFIG_MAPPING, AutoConfig

    try:
        raw = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nested thousands deep
        raise SpecError(f"cannot read {p / 'config.json'}: {type(e).__name__}: {first_line(e, 300)}") from e
    if not isinstance(raw, dict):
        raise SpecError(f"{p / 'config.json'} is not a JSON object")
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        archs = raw.get("architectures") or []
        raise ExportError(f"{p}: model_type {model_type!r} (architectures {', '.join(map(str, archs)) or 'none'}) is not a "
                          f"transformers {transformers.__version__} model and edgecomp runs no remote code; {_supported_tasks()}")
    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise SpecError(f"cannot load the config in {p}: {type(e).__name__}: {first_line(e, 300)}") from e


def _model_class(config: Any, task: str, inferred: bool) -> tuple[Any, bool]:
    """(transformers class to load, whether to take its ``get_encoder()``) for ``task``."""
    import transformers
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    autos = {"feature-extraction": AutoModel, "text-classification": AutoModelForSequenceClassification,
             "token-classification": AutoModelForTokenClassification,
             "image-classification": AutoModelForImageClassification, "text-generation": AutoModelForCausalLM}
    archs = list(getattr(config, "architectures", None) or [])
    arch = str(archs[0]) if archs else None
    arch_cls = getattr(transformers, arch, None) if arch else None
    if arch and arch_cls is None and inferred:
        raise ExportError(f"architecture {arch} is not in transformers {transformers.__version__} and edgecomp runs "
                          f"no remote code; {_supported_tasks()}; naming a task exports the {config.model_type} model "
                          "with transformers' class for that task")
    encdec = bool(getattr(config, "is_encoder_decoder", False))
    if task == "text-generation" and encdec:
        raise ExportError(f"text-generation exports decoder-only models; {config.model_type} is an encoder-decoder model: "
                          "task feature-extraction exports its encoder")
    if task == "feature-extraction" and encdec:
        if arch and arch.endswith("EncoderModel") and arch_cls is not None:
            return arch_cls, False
        base = _mapped_class(AutoModel, config)
        if base is None:
            raise ExportError(f"transformers has no base model for {config.model_type}; {_supported_tasks()}")
        encoder_cls = getattr(transformers, base.__name__.removesuffix("Model") + "EncoderModel", None)
        return (encoder_cls, False) if encoder_cls is not None else (base, True)  # T5EncoderModel / WhisperModel
    if arch_cls is not None and arch and _arch_task(arch) == task:
        return arch_cls, False
    cls = _mapped_class(autos[task], config)
    if cls is None:
        raise OptionError("task", f"{task} does not apply to {config.model_type} models ({type(config).__name__}); "
                                  f"{_supported_tasks()}")
    return cls, False


def _modality(cls: Any, config: Any, task: str) -> str:
    name = getattr(cls, "main_input_name", "input_ids")
    modality = {"input_ids": "text", "pixel_values": "vision", "input_features": "audio"}.get(name)
    if modality == "audio" and not all(isinstance(getattr(config, k, None), int)
                                       for k in ("num_mel_bins", "max_source_positions")):
        modality = None  # Speech2Text-style features (frames x bins): not a layout --hf builds
    if modality is None:
        raise ExportError(f"{cls.__name__} reads {name}; edgecomp exports Hugging Face models that read input_ids "
                          f"(text), pixel_values (images) or Whisper-style input_features (audio); {_supported_tasks()}")
    needs = {"text-classification": "text", "token-classification": "text", "text-generation": "text",
             "image-classification": "vision"}.get(task)
    if needs and modality != needs:
        raise OptionError("task", f"{task} needs a {needs} model, {cls.__name__} is a {modality} model; "
                                  f"{_supported_tasks()}")
    return modality


def _load(cls: Any, p: Path) -> Any:
    kw = dict(local_files_only=True, trust_remote_code=False)
    # Eager attention exports as plain MatMul/Softmax, which onnxruntime runs faster at batch 1
    # than the SDPA export and which the quantizer and pruner can read.
    with _quiet_transformers():
        try:
            return cls.from_pretrained(str(p), attn_implementation="eager", **kw)
        except Exception as first:
            try:
                return cls.from_pretrained(str(p), **kw)  # a model without an eager implementation
            except Exception:
                raise SpecError(f"cannot load {cls.__name__} from {p}: {type(first).__name__}: "
                                f"{first_line(first, 300)}") from first


def _tokenized(p: Path, seq_len: int, vocab: int, pad: int | None):
    """(input_ids, attention_mask) from the folder's tokenizer, or None when it has none that
    loads or its ids do not fit ``vocab``."""
    import torch
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
        if tok.pad_token_id is not None:
            batch = tok(_SENTENCES, padding="max_length", max_length=seq_len, truncation=True, return_tensors="pt")
            ids, mask = batch["input_ids"].long(), batch["attention_mask"].long()
        else:  # GPT-2 style: no pad token, so pad by hand (the mask hides it)
            rows = tok(_SENTENCES, max_length=seq_len, truncation=True)["input_ids"]
            fill = pad if pad is not None else (tok.eos_token_id or 0)
            ids = torch.full((len(rows), seq_len), int(fill), dtype=torch.long)
            mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row, dtype=torch.long), 1
    except Exception:
        return None
    if ids.shape[1] != seq_len or (vocab and int(ids.max()) >= vocab) or int(ids.min()) < 0 or int(mask.sum(1).min()) < 1:
        return None
    return ids, mask


def _text_example(p: Path, config: Any, seq_len: int) -> dict[str, Any]:
    """Two rows of ids (the second padded): from the folder's tokenizer when it has one, else
    drawn from ``config.vocab_size`` (no tokenizer, or one that cannot pad, is needed)."""
    import torch

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        limit = getattr(text, key, None)
        if isinstance(limit, int) and limit > 2:
            seq_len = min(seq_len, limit - 2)  # RoBERTa-style position ids start after the padding index
    pad = getattr(text, "pad_token_id", None)
    pad = pad if isinstance(pad, int) and 0 <= pad < max(vocab, 1) else None
    got = _tokenized(p, seq_len, vocab, pad)
    if got is None:
        if vocab < 2:
            raise SpecError(f"{p / 'config.json'} gives no vocab_size to build example ids from, and the folder has no tokenizer")
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(min(4, vocab - 1), vocab, (2, seq_len), generator=g)
        mask = torch.ones_like(ids)
        keep = max(1, seq_len - seq_len // 3)
        ids[1, keep:], mask[1, keep:] = pad if pad is not None else 0, 0
        got = ids, mask
    return {"input_ids": got[0], "attention_mask": got[1]}


def _image_example(config: Any) -> dict[str, Any]:
    import torch

    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)) and len(size) == 2:
        h, w = int(size[0]), int(size[1])
    elif isinstance(size, int) and size > 0:
        h = w = size
    else:
        raise SpecError(f"config has no image_size (got {size!r}) to build example pixel_values from")
    channels = int(getattr(config, "num_channels", 3) or 3)
    return {"pixel_values": torch.randn(2, channels, h, w, generator=torch.Generator().manual_seed(0))}


def _audio_example(config: Any, encoder: Any) -> dict[str, Any]:
    import torch

    stride = 1
    for conv in ("conv1", "conv2"):
        layer = getattr(encoder, conv, None)
        stride *= int(layer.stride[0]) if layer is not None and hasattr(layer, "stride") else (2 if conv == "conv2" else 1)
    frames = stride * int(config.max_source_positions)  # Whisper: 2 x 1500 = 3000, fixed
    shape = (2, int(config.num_mel_bins), frames)
    return {"input_features": torch.randn(*shape, generator=torch.Generator().manual_seed(0))}


def _hf_modules():
    import torch

    normalize = torch.nn.functional.normalize

    class TextLogits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    class LastLogits(torch.nn.Module):
        """Logits of each row's last attended position (right or left padding), no KV cache."""

        def __init__(self, model, split: bool):
            super().__init__()
            self.model, self.split = model, split

        def forward(self, input_ids, attention_mask):
            positions = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)
            last = ((attention_mask.to(torch.long) * positions).amax(1) - 1).clamp(min=0).view(-1, 1, 1)
            if self.split:  # the LM head on the last position only, not on every position
                hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                               use_cache=False).last_hidden_state
                h = hidden.gather(1, last.expand(-1, 1, hidden.shape[-1])).squeeze(1)
                return self.model.get_output_embeddings()(h)
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return logits.gather(1, last.expand(-1, 1, logits.shape[-1])).squeeze(1)

    class Vision(torch.nn.Module):
        def __init__(self, model, output: str):
            super().__init__()
            self.model, self.output = model, output

        def forward(self, pixel_values):
            out = self.model(pixel_values=pixel_values)
            if self.output == "logits":
                return out.logits
            hidden = out.last_hidden_state
            if self.output == "hidden":
                return hidden
            if hidden.dim() == 3:  # ViT-style tokens: [CLS], the vector ...ForImageClassification classifies
                vec = hidden[:, 0]
            else:  # convnet feature maps: their pooler, else the spatial mean
                pooled = getattr(out, "pooler_output", None)
                vec = pooled.flatten(1) if pooled is not None else hidden.flatten(2).mean(-1)
            return normalize(vec, p=2, dim=1)

    class Audio(torch.nn.Module):
        def __init__(self, encoder, output: str):
            super().__init__()
            self.encoder, self.output = encoder, output

        def forward(self, input_features):
            hidden = self.encoder(input_features=input_features).last_hidden_state
            if self.output == "hidden":
                return hidden
            return normalize(hidden.mean(1), p=2, dim=1)  # the mean WhisperForAudioClassification pools

    return TextLogits, LastLogits, Vision, Audio


def _last_logits(model: Any, example: Mapping[str, Any]):
    """The last-position wrapper, with the LM head applied to the last position only when that
    gives the model's own logits on the example (no final scaling or soft-capping after it)."""
    import torch

    _, LastLogits, _, _ = _hf_modules()
    full = LastLogits(model, split=False).eval()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or getattr(model, "base_model", model) is model:
        return full
    split = LastLogits(model, split=True).eval()
    try:
        with torch.no_grad():
            a, b = full(**example), split(**example)
    except Exception:
        return full
    return split if a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-4) else full


def hf_model(path: str | os.PathLike, output: str = "embeddings", task: str | None = None,
             seq_len: int = 16) -> HFModel:
    """Build the module to export from a local Hugging Face folder, by its config.

    The task comes from ``config.json`` (:func:`infer_hf_task`) unless ``task`` names one of
    :data:`HF_TASKS`. feature-extraction writes one output named ``output``: with
    ``output="embeddings"`` text models give mean pooling over the attention mask + L2 norm (as
    sentence-transformers does), ViT-style image models the L2-normalized [CLS] token of the last
    hidden state, Whisper encoders the L2-normalized mean over frames; ``"hidden"`` gives the last
    hidden states. Heads write ``logits``: [batch, labels], [batch, sequence, labels] for
    token-classification, [batch, vocab] at the last attended position for text-generation.
    Example inputs need no tokenizer that can pad: ids come from the folder's tokenizer when it
    has one, else from ``config.vocab_size``; images from ``image_size``/``num_channels``; audio
    from ``num_mel_bins``/``max_source_positions``.
    """
    p = Path(path)
    if not (p / "config.json").is_file():
        raise SpecError(f"{p} is not a Hugging Face model folder (no config.json)")
    try:
        import transformers
    except ImportError as e:
        raise SpecError("exporting a Hugging Face folder needs transformers: pip install 'edgecomp[hf]'") from e
    if output not in HF_OUTPUTS:
        raise SpecError(f"unknown HF output {output!r}; use {' or '.join(HF_OUTPUTS)}")
    if task not in (None, "auto") and task not in HF_TASKS:
        raise ExportError(f"unknown task {task!r}; {_supported_tasks()}")
    transformers.utils.logging.disable_progress_bar()
    config = _read_config(p)
    inferred = task in (None, "auto")
    task, source = infer_hf_task(config) if inferred else (task, "--task")
    if output != "embeddings" and task != "feature-extraction":
        raise OptionError("hf_output", f"{output} applies to feature-extraction; {task} writes logits "
                                       "(task feature-extraction exports the base model's outputs)")
    cls, take_encoder = _model_class(config, task, inferred)
    modality = _modality(cls, config, task)
    model = _load(cls, p).eval()
    if take_encoder:
        model = model.get_encoder().eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # no KV cache in the graph
    TextLogits, _, Vision, Audio = _hf_modules()
    if modality == "text":
        example = _text_example(p, config, seq_len)
        dynamic = {name: {0: "batch", 1: "sequence"} for name in example}
    elif modality == "vision":
        example, dynamic = _image_example(config), {"pixel_values": {0: "batch"}}
    else:  # the frame axis is fixed (Whisper checks it), so only the batch is dynamic
        example, dynamic = _audio_example(config, model), {"input_features": {0: "batch"}}
    if task == "feature-extraction":
        module = {"text": lambda: _SentenceEncoder(model, output), "vision": lambda: Vision(model, output),
                  "audio": lambda: Audio(model, output)}[modality]()
        names = ["output"]
    elif task == "text-generation":
        module, names = _last_logits(model, example), ["logits"]
    elif modality == "vision":
        module, names = Vision(model, "logits"), ["logits"]
    else:
        module, names = TextLogits(model), ["logits"]
    metadata = {"edgecomp.task": task, "edgecomp.task_source": source, "edgecomp.hf_class": type(model).__name__,
                "edgecomp.modality": modality}
    if task == "feature-extraction":
        metadata["edgecomp.hf_output"] = output
    return HFModel(module.eval(), example, task, source, modality, type(model).__name__, names, dynamic, metadata)


def hf_encoder(path: str | os.PathLike, output: str = "embeddings", seq_len: int = 16, task: str | None = None):
    """(module, example_inputs) for a local Hugging Face folder (see :func:`hf_model`)."""
    m = hf_model(path, output, task, seq_len)
    return m.module, m.example


def export_hf(path: str | os.PathLike, out: str | os.PathLike | None, *, output: str = "embeddings", task: str | None = None,
              dynamic: Mapping[str, Mapping[int, str]] | None = None, protect: Sequence[str | os.PathLike] = (),
              **kwargs: Any) -> ExportResult:
    """Export a local Hugging Face folder by its task (:func:`hf_model`), checked in onnxruntime.

    Inputs get dynamic batch (and sequence, for text) axes unless ``dynamic`` names them; the
    task goes into the result and the file's metadata (``edgecomp.task``, ``edgecomp.task_source``).
    """
    require_torch("export")
    exporter = kwargs.get("exporter", "auto")
    if exporter in ("auto", "dynamo", "torchscript"):  # refuse the opset before loading anything
        plan_exporters(kwargs.get("opset", DEFAULT_OPSET), exporter, HF_AUTO_ORDER)
    protect = [path, *protect]
    if out is not None:
        check_output_path(out, protect)
    hf = hf_model(path, output, task)
    axes = {k: dict(v) for k, v in (dynamic or {}).items()}
    for name, ax in hf.dynamic.items():
        axes.setdefault(name, ax)
    kwargs.setdefault("source", f"the {hf.model_class} in {path}")
    kwargs.setdefault("auto_order", HF_AUTO_ORDER)
    res = export_model(hf.module, hf.example, out, dynamic=axes, protect=protect, output_names=hf.output_names,
                       metadata=hf.metadata, **kwargs)
    res.task, res.task_source = hf.task, hf.task_source
    return res


def _sentence_encoder_class():
    import torch

    class SentenceEncoder(torch.nn.Module):
        def __init__(self, encoder, output: str):
            super().__init__()
            self.encoder, self.output = encoder, output

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if self.output == "hidden":
                return hidden
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return SentenceEncoder


def _SentenceEncoder(encoder, output: str):
    if output not in ("embeddings", "hidden"):
        raise SpecError(f"unknown HF output {output!r}; use embeddings or hidden")
    return _sentence_encoder_class()(encoder, output)
