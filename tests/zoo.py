"""A zoo of small ONNX files of the kinds users bring, with DATA to feed them.

Every builder writes one model into a folder and returns ``(model path, DATA path)``; DATA is a
``.npz`` with a sample axis, or a folder of ``.npz`` feeds where inputs have no sample axis
(silero-vad's scalar ``sr``) or sizes vary (MTCNN P-Net's image pyramid).

What is in it:

- third-party files as published: silero-vad's ONNX files from the installed wheel (``If``
  subgraphs holding the weights as ``Constant`` nodes, an LSTM, 1-D convs, a scalar int64
  ``sr`` input, a recurrent ``state``), fed with a synthetic speech-like signal run chunk by chunk
  so each sample carries the state the model itself produced;
- MTCNN P-Net / R-Net / O-Net (facenet-pytorch's architecture and its released weights, loaded
  with ``torch.load(weights_only=True)``; the classes are rebuilt here because facenet_pytorch
  imports torchvision), exported with ``edgecomp.export.export_model`` and fed crops of
  sklearn's two sample photos scaled as MTCNN does, ``(x - 127.5) / 128``;
- the project's reference models (``models/``) at small widths, in every form a user's file
  arrives in: TorchScript at opsets 11, 13 and 17, dynamo at 18, ``onnx.version_converter``
  from 17 down to 11, weights as ``Constant`` nodes, a ``dim_value: -1`` batch dim, BatchNorm
  left unfolded, weights reached through ``Identity`` nodes, exported in float16
  (``module.half()``);
- float16 models: silero-vad converted with onnxruntime's float16 converter (If subgraphs), the
  reference models exported in half precision; their DATA stays float32 where it is shared (the
  commands cast DATA to a float input's precision, and so does :func:`outputs`).
- generated with onnx.helper, as converters write them: a paddle-style CRNN text recognizer
  (opset 11) whose graph output is *declared* ``[1, seqlen]`` while it returns ``[T, 1, C]``
  through a final Reshape whose shape is computed at run time (``Concat(Unsqueeze(Gather(Shape)))``),
  and a CNN whose weights are partly *overridable initializers* (graph inputs with a default,
  IR >= 4), both fed crops of sklearn's photos.

``ZOO`` maps a model name to its builder; :class:`Zoo` builds each model once into a folder.
Run ``python tests/zoo.py OUTDIR`` to write them all.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `models` is a top-level folder of the repo

__all__ = ["ZOO", "LARGE", "Zoo", "feeds", "outputs", "pooled_cosine", "sample_cosine", "fidelity", "float_outputs", "ZooEntry", "silero_dir", "facenet_dir", "image_crops", "weights_as_constants",
           "minus_one_batch", "identity_shared", "convert_opset", "param_count", "default_opset",
           "paddle_crnn_proto", "overridable_cnn_proto", "OVERRIDABLE_WEIGHTS", "export_digits"]

SEED = 0


# --- data ------------------------------------------------------------------------------------

def image_crops(n: int, size: int | tuple[int, int], seed: int = SEED) -> np.ndarray:
    """``n`` crops of sklearn's sample photos (china, flower), resized to ``size`` by area
    averaging (numpy only), as float32 RGB NCHW in 0..255."""
    from sklearn.datasets import load_sample_images

    h, w = (size, size) if isinstance(size, int) else size
    photos = load_sample_images().images  # two 427x640x3 uint8
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, h, w), np.float32)
    for i in range(n):
        img = photos[i % len(photos)].astype(np.float32)
        side = int(rng.integers(min(96, *img.shape[:2]), min(img.shape[:2]) + 1))
        ch, cw = side, max(8, int(round(side * w / h)))
        cw = min(cw, img.shape[1])
        y0 = int(rng.integers(0, img.shape[0] - ch + 1))
        x0 = int(rng.integers(0, img.shape[1] - cw + 1))
        out[i] = _resize(img[y0:y0 + ch, x0:x0 + cw], h, w).transpose(2, 0, 1)
    return out


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Area-average resize of an HxWxC image (bins of the source rows/columns)."""
    ys = np.linspace(0, img.shape[0], h + 1).astype(int)
    xs = np.linspace(0, img.shape[1], w + 1).astype(int)
    rows = np.stack([img[ys[i]:max(ys[i + 1], ys[i] + 1)].mean(0) for i in range(h)])
    return np.stack([rows[:, xs[j]:max(xs[j + 1], xs[j] + 1)].mean(1) for j in range(w)], axis=1)


def mtcnn_scale(x: np.ndarray) -> np.ndarray:
    return ((x - 127.5) / 128.0).astype(np.float32)


def imagenet_scale(x: np.ndarray) -> np.ndarray:
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None] * 255
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None] * 255
    return ((x - mean) / std).astype(np.float32)


def speech_like(seconds: float, sr: int = 16000, seed: int = SEED) -> np.ndarray:
    """A deterministic speech-like signal: voiced syllables (harmonics of a gliding pitch under
    a syllable envelope), unvoiced noise bursts, and pauses, plus background noise."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    x = 0.003 * rng.standard_normal(n)
    pos = int(0.15 * sr)
    while pos < n:
        dur = int(rng.uniform(0.12, 0.3) * sr)
        seg = slice(pos, min(n, pos + dur))
        tt = t[seg] - t[pos]
        f0 = rng.uniform(90, 220) * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(1, 4) * tt))
        phase = 2 * np.pi * np.cumsum(f0) / sr
        voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
        env = np.sin(np.pi * np.linspace(0, 1, tt.size)) ** 2
        x[seg] += rng.uniform(0.1, 0.4) * env * voiced
        if rng.random() < 0.4:  # a fricative after the vowel
            m = min(n, seg.stop + int(0.05 * sr))
            x[seg.stop:m] += 0.05 * rng.standard_normal(m - seg.stop)
        pos = seg.stop + int(rng.uniform(0.02, 0.4) * sr)
    return np.clip(x, -1, 1).astype(np.float32)


def _silero_feeds(model_path: Path, chunks: int, seed: int = SEED) -> list[dict[str, np.ndarray]]:
    """Feeds as silero-vad's own OnnxWrapper makes them at 16 kHz: 64 samples of context + a
    512-sample chunk, the state the model returned for the previous chunk, sr=16000."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    audio = speech_like((chunks + 1) * 512 / 16000, seed=seed)
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros((1, 64), np.float32)
    feeds = []
    for i in range(chunks):
        x = np.concatenate([context, audio[None, i * 512:(i + 1) * 512]], axis=1)
        feed = {"input": x, "state": state}
        if "sr" in names:
            feed["sr"] = np.array(16000, np.int64)
        feeds.append(feed)
        out = sess.run(None, feed)
        state = out[1].astype(np.float32)
        context = x[:, -64:]
    return feeds


def _write_folder(feeds: list[dict[str, np.ndarray]], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(feeds):
        np.savez(folder / f"{i:04d}.npz", **f)
    return folder


# --- proto rewrites (what other exporters and tools leave in a file) --------------------------

def _graphs(g: onnx.GraphProto):
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sg in a.graphs:
                    yield from _graphs(sg)


def weights_as_constants(m: onnx.ModelProto) -> onnx.ModelProto:
    """Every initializer becomes a ``Constant`` node (as spox, tf2onnx and older exporters write)."""
    m = onnx.ModelProto.FromString(m.SerializeToString())
    g = m.graph
    consts = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in g.initializer]
    names = {t.name for t in g.initializer}
    keep_inputs = [i for i in g.input if i.name not in names]
    del g.input[:]
    g.input.extend(keep_inputs)
    del g.initializer[:]
    nodes = consts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return m


def minus_one_batch(m: onnx.ModelProto) -> onnx.ModelProto:
    """``dim_value: -1`` for the first input's batch dim (as some converters write "unknown")."""
    m = onnx.ModelProto.FromString(m.SerializeToString())
    d = m.graph.input[0].type.tensor_type.shape.dim[0]
    d.ClearField("dim_param")
    d.dim_value = -1
    return m


def identity_shared(m: onnx.ModelProto) -> onnx.ModelProto:
    """Every weight initializer (rank >= 2) reaches its consumers through an ``Identity`` node,
    as exporters write shared or tied parameters."""
    m = onnx.ModelProto.FromString(m.SerializeToString())
    g = m.graph
    weights = {t.name for t in g.initializer if len(t.dims) >= 2}
    ids = []
    for w in sorted(weights):
        ids.append(helper.make_node("Identity", [w], [w + "__shared"], name=f"share_{w}"))
    for n in g.node:
        for i, x in enumerate(n.input):
            if x in weights:
                n.input[i] = x + "__shared"
    nodes = ids + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return m


def convert_opset(m: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    from onnx import version_converter

    return version_converter.convert_version(m, opset)


def default_opset(m: onnx.ModelProto) -> int:
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


def param_count(m: onnx.ModelProto) -> int:
    """Elements in initializers and Constant node tensors, subgraphs included."""
    total = 0
    for g in _graphs(m.graph):
        total += sum(int(np.prod(t.dims)) for t in g.initializer)
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        total += int(np.prod(a.t.dims))
                    elif a.name in ("value_floats", "value_ints"):
                        total += len(a.floats) + len(a.ints)
    return total


# --- torch → ONNX ----------------------------------------------------------------------------

def _randomize_bn(module, seed: int = SEED):
    """Non-trivial BatchNorm statistics and affine terms, so folding them is a real change."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for mod in module.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            c = mod.num_features
            with torch.no_grad():
                mod.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(c, generator=g))
                mod.weight.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
                mod.bias.copy_(0.1 * torch.randn(c, generator=g))
    return module


def _torchscript_proto(module, args, names, opset: int, dynamic: dict, fold: bool = True,
                       preserve: bool = False) -> onnx.ModelProto:
    """A TorchScript export as a user would run it (torch.onnx.export, dynamo=False)."""
    import torch

    buf = io.BytesIO()
    kw = {"training": torch.onnx.TrainingMode.PRESERVE} if preserve else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, buf, dynamo=False, input_names=list(names),
                          output_names=None, dynamic_axes=dynamic or None, opset_version=opset,
                          do_constant_folding=fold, **kw)
    return onnx.load_from_string(buf.getvalue())


def _export(module, args, names, out: Path, exporter: str, opset: int, dynamic: dict) -> Path:
    from edgecomp.export import export_model

    export_model(module, tuple(args), out, exporter=exporter, opset=opset,
                 dynamic={n: dynamic[n] for n in names if n in dynamic}, input_shapes=None)
    return out


@dataclasses.dataclass
class _Base:
    """A reference model: how to make the module, its example inputs, its DATA."""

    make: Callable[[], tuple]          # () -> (module, example args tuple)
    names: tuple[str, ...]
    dynamic: dict
    data: Callable[[Path], Path]       # folder -> DATA path
    has_bn: bool = True


def _resnet():
    from models.resnet import small_resnet

    m, _ = small_resnet(width=0.5, num_classes=10, in_channels=3)
    return _randomize_bn(m), (_torch(imagenet_scale(image_crops(1, 32, seed=99))),)


def _mnv2(width: float = 0.35, size: int = 32, classes: int = 100):
    import torch

    from models.mobilenet_v2 import mobilenet_v2

    torch.manual_seed(0)
    m = _randomize_bn(mobilenet_v2(width, num_classes=classes, in_channels=3, input_size=size))
    return m, (_torch(imagenet_scale(image_crops(1, size, seed=99))),)


def _encoder():
    from models.text_encoder import tiny_encoder

    return tiny_encoder(layers=2, hidden=64, heads=4, ffn=128, vocab=1000, seq=16)


def _torch(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x))


def _image_data(size: int, n: int = 16):
    def write(folder: Path) -> Path:
        p = folder / f"images{size}_{n}.npz"
        if not p.exists():
            np.savez(p, x=imagenet_scale(image_crops(n, size)))
        return p
    return write


def text_feeds(n: int, seq: int = 16, vocab: int = 1000, seed: int = SEED) -> dict[str, np.ndarray]:
    """Token ids from real words (stdlib docstring sentences, hashed into the vocabulary), padded
    to ``seq`` with an attention mask; [CLS]=1 ... [SEP]=2, pad 0."""
    import zlib

    from edgecomp.text import docstring_sentences

    sents = docstring_sentences()[:n]
    ids = np.zeros((n, seq), np.int64)
    mask = np.zeros((n, seq), np.int64)
    for i, s in enumerate(sents):
        toks = [1] + [3 + zlib.crc32(w.lower().encode()) % (vocab - 3) for w in s.split()][:seq - 2] + [2]
        ids[i, :len(toks)] = toks
        mask[i, :len(toks)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _text_data(n: int = 16, seq: int = 16):
    def write(folder: Path) -> Path:
        p = folder / f"text{seq}_{n}.npz"
        if not p.exists():
            np.savez(p, **text_feeds(n, seq))
        return p
    return write


BASES: dict[str, _Base] = {
    "resnet": _Base(_resnet, ("x",), {"x": {0: "batch"}}, _image_data(32)),
    "mnv2": _Base(_mnv2, ("x",), {"x": {0: "batch"}}, _image_data(32)),
    "encoder": _Base(_encoder, ("input_ids", "attention_mask"),
                     {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
                     _text_data(), has_bn=False),
}

#: How a reference model's file was written: exporter and opset, then a rewrite of the proto.
VARIANTS = {
    "ts17": "TorchScript exporter, opset 17, constant folding on",
    "ts13": "TorchScript exporter, opset 13",
    "ts11": "TorchScript exporter, opset 11",
    "dynamo18": "dynamo exporter, opset 18",
    "vc17": "TorchScript opset 11 converted up to 17 by onnx.version_converter (its adapters cannot go down "
            "from 17: 'No Adapter From Version $14 for Relu')",
    "const": "TorchScript opset 17, every initializer moved into a Constant node",
    "neg1": "TorchScript opset 17, batch dim written as dim_value -1",
    "bn": "TorchScript opset 17, BatchNormalization kept (TrainingMode.PRESERVE, no constant folding)",
    "nofold": "TorchScript opset 17, do_constant_folding=False (weights reach MatMul through Transpose)",
    "ident": "TorchScript opset 17, every weight reaches its consumer through an Identity node",
    "half": "TorchScript opset 17 of the module in float16 (module.half(), as GPU exports are made): float16 "
            "inputs, outputs and weights",
}


def _build_reference(base: str, variant: str, folder: Path) -> Path:
    b = BASES[base]
    module, args = b.make()
    out = folder / f"{base}-{variant}.onnx"
    if variant == "dynamo18":
        return _export(module, args, b.names, out, "dynamo", 18, b.dynamic)
    opset = {"ts13": 13, "ts11": 11, "vc17": 11}.get(variant, 17)
    if variant in ("ts17", "ts13", "ts11"):
        return _export(module, args, b.names, out, "torchscript", opset, b.dynamic)
    if variant == "half":
        module = module.half()
        args = tuple(a.half() if a.is_floating_point() else a for a in args)
        proto = _torchscript_proto(module, args, b.names, opset, b.dynamic)
        onnx.checker.check_model(proto)
        _check_against_torch(proto, module, args, b.names, atol=2e-2, rtol=2e-2)  # float16 on both sides
        onnx.save(proto, str(out))
        return out
    proto = _torchscript_proto(module, args, b.names, opset, b.dynamic, fold=variant not in ("bn", "nofold"),
                               preserve=variant == "bn")
    if variant == "bn" and not any(n.op_type == "BatchNormalization" for n in proto.graph.node):
        raise RuntimeError(f"{base}-bn: the export folded every BatchNorm")
    rewrite = {"vc17": lambda m: convert_opset(m, 17), "const": weights_as_constants, "neg1": minus_one_batch,
               "ident": identity_shared, "bn": lambda m: m, "nofold": lambda m: m}[variant]
    proto = rewrite(proto)
    onnx.checker.check_model(proto)
    _check_against_torch(proto, module, args, b.names)
    onnx.save(proto, str(out))
    return out


def _check_against_torch(proto: onnx.ModelProto, module, args, names, atol: float = 1e-4, rtol: float = 1e-3) -> None:
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = module(*args)
    ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    got = sess.run(None, {n: a.numpy() for n, a in zip(names, args)})
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g.astype(np.float32), r.float().numpy(), atol=atol, rtol=rtol)


# --- third-party models ---------------------------------------------------------------------

def silero_dir() -> Path:
    return Path(importlib.util.find_spec("silero_vad").submodule_search_locations[0]) / "data"


def facenet_dir() -> Path:
    # the wheel's data folder, found without importing facenet_pytorch (it imports torchvision)
    spec = importlib.util.find_spec("facenet_pytorch")
    return Path(spec.submodule_search_locations[0]) / "data"


def _silero(file: str, chunks: int):
    def build(folder: Path) -> tuple[Path, Path]:
        src = silero_dir() / file
        stem = Path(file).stem
        data = folder / f"{stem}_data{chunks}"
        if not data.exists():
            _write_folder(_silero_feeds(src, chunks), data)
        return src, data
    return build


def _silero_fp16(file: str, chunks: int):
    """silero-vad converted to float16 as a user would (onnxruntime.transformers.float16,
    keep_io_types=False: float16 input, state and outputs; its If subgraphs' Constants too),
    fed the float32 model's chunks and states in float16."""
    def build(folder: Path) -> tuple[Path, Path]:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        src = silero_dir() / file
        out = folder / f"{Path(file).stem}_fp16.onnx"
        data = folder / f"{Path(file).stem}_fp16_data{chunks}"
        if not out.exists():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the converter warns about values it clamps
                half = convert_float_to_float16(onnx.load(str(src)), keep_io_types=False)
            onnx.checker.check_model(half)
            onnx.save(half, str(out))
        if not data.exists():
            feeds = [{k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in f.items()}
                     for f in _silero_feeds(src, chunks)]
            _write_folder(feeds, data)
        return out, data
    return build


def _mtcnn_classes():
    """facenet-pytorch's P-Net, R-Net and O-Net layer structure (state_dict keys match pnet.pt,
    rnet.pt, onet.pt)."""
    from torch import nn

    class PNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
            self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
            self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
            self.conv4_1, self.softmax4_1 = nn.Conv2d(32, 2, 1), nn.Softmax(dim=1)
            self.conv4_2 = nn.Conv2d(32, 4, 1)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
            return self.conv4_2(x), self.softmax4_1(self.conv4_1(x))

    class RNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
            self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
            self.dense5_1, self.softmax5_1 = nn.Linear(128, 2), nn.Softmax(dim=1)
            self.dense5_2 = nn.Linear(128, 4)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.prelu3(self.conv3(x))
            x = x.permute(0, 3, 2, 1).contiguous()
            x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
            return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))

    class ONet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
            self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
            self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
            self.dense6_1, self.softmax6_1 = nn.Linear(256, 2), nn.Softmax(dim=1)
            self.dense6_2, self.dense6_3 = nn.Linear(256, 4), nn.Linear(256, 10)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.pool3(self.prelu3(self.conv3(x)))
            x = self.prelu4(self.conv4(x))
            x = x.permute(0, 3, 2, 1).contiguous()
            x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
            return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))

    return {"pnet": PNet, "rnet": RNet, "onet": ONet}


def mtcnn_module(net: str):
    import torch

    m = _mtcnn_classes()[net]()
    m.load_state_dict(torch.load(facenet_dir() / f"{net}.pt", weights_only=True))
    return m.eval()


#: P-Net runs on every level of an image pyramid: DATA feeds of several sizes.
PNET_SIZES = [(48, 48), (60, 80), (36, 52), (72, 72)]


def _mtcnn(net: str, n: int, exporter: str = "torchscript"):
    size = {"rnet": 24, "onet": 48, "pnet": 48}[net]

    def build(folder: Path) -> tuple[Path, Path]:
        out = folder / f"mtcnn_{net}{'' if exporter == 'torchscript' else '-' + exporter}.onnx"
        module = mtcnn_module(net)
        example = (_torch(mtcnn_scale(image_crops(1, size, seed=99))),)
        dyn = {"x": {0: "batch", 2: "height", 3: "width"}} if net == "pnet" else {"x": {0: "batch"}}
        from edgecomp.export import export_model

        export_model(module, example, out, exporter=exporter, opset=17 if exporter == "torchscript" else 18, dynamic=dyn)
        if net == "pnet":
            data = folder / f"pnet_data{n}"
            if not data.exists():
                feeds = [{"x": mtcnn_scale(image_crops(1, PNET_SIZES[i % len(PNET_SIZES)], seed=i))} for i in range(n)]
                _write_folder(feeds, data)
        else:
            data = folder / f"{net}_data{n}.npz"
            if not data.exists():
                np.savez(data, x=mtcnn_scale(image_crops(n, size)))
        return out, data
    return build


def export_digits(out: Path) -> Path:
    """The trained digits MobileNetV2 (models/weights, width 0.5) exported to ``out`` with
    TorchScript at opset 17, batch dynamic."""
    from edgecomp.export import export_model
    from models.digits import load_trained

    module = load_trained("mobilenet_v2", 0.5)
    if isinstance(module, tuple):
        module, example = module
    else:
        import torch

        example = (torch.zeros(1, 1, 32, 32),)
    export_model(module, example, out, exporter="torchscript", opset=17, dynamic={"x": {0: "batch"}})
    return out


def _digits(folder: Path) -> tuple[Path, Path]:
    """The trained digits MobileNetV2 (models/weights), on sklearn's digits test split."""
    from models.digits import load_digits_32

    out = export_digits(folder / "digits-ts17.onnx")
    data = folder / "digits_test.npz"
    if not data.exists():
        x, _ = load_digits_32("test")
        np.savez(data, x=x[:32])
    return out, data


def _reference(base: str, variant: str):
    def build(folder: Path) -> tuple[Path, Path]:
        return _build_reference(base, variant, folder), BASES[base].data(folder)
    return build


# --- generated: what converters write ---------------------------------------------------------

def _he(rng, *shape) -> np.ndarray:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 2 else shape[0]
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _photo_data(folder: Path, name: str, n: int, size: tuple[int, int]) -> Path:
    """``n`` photo crops scaled to [-1, 1] as ``x`` (paddle's ``(x / 255 - 0.5) / 0.5``)."""
    path = folder / f"{name}.npz"
    if not path.exists():
        np.savez(path, x=(image_crops(n, size) / 127.5 - 1.0).astype(np.float32))
    return path


def paddle_crnn_proto(classes: int = 40, seed: int = SEED) -> onnx.ModelProto:
    """A paddle-style CRNN recognizer at opset 11: Conv+BN+Relu+MaxPool x2, a Conv over the
    remaining height, Squeeze, Transpose to ``[T, 1, 32]``, MatMul+Add to ``classes``, Softmax,
    and a final Reshape to its own runtime shape (``Concat`` of ``Unsqueeze(Gather(Shape))``).
    The graph output is declared ``[1, seqlen]``: what it returns is ``[T, 1, classes]``
    (paddle2onnx writes such declarations; onnxruntime only logs a warning)."""
    from onnx import TensorProto, numpy_helper

    rng = np.random.default_rng(seed)
    w = {"conv1_w": _he(rng, 16, 3, 3, 3), "bn1_scale": (1 + 0.1 * rng.standard_normal(16)).astype(np.float32),
         "bn1_bias": (0.1 * rng.standard_normal(16)).astype(np.float32),
         "bn1_mean": (0.1 * rng.standard_normal(16)).astype(np.float32),
         "bn1_var": (1 + 0.2 * rng.random(16)).astype(np.float32),
         "conv2_w": _he(rng, 32, 16, 3, 3), "conv2_b": (0.05 * rng.standard_normal(32)).astype(np.float32),
         "conv3_w": _he(rng, 32, 32, 8, 1), "conv3_b": (0.05 * rng.standard_normal(32)).astype(np.float32),
         "fc_w": _he(rng, 32, classes), "fc_b": (0.05 * rng.standard_normal(classes)).astype(np.float32)}
    w.update({f"idx{i}": np.array(i, np.int64) for i in range(3)})  # scalar: Gather gives a scalar dim
    n = [helper.make_node("Conv", ["x", "conv1_w"], ["c1"], pads=[1, 1, 1, 1], name="conv2d_0"),
         helper.make_node("BatchNormalization", ["c1", "bn1_scale", "bn1_bias", "bn1_mean", "bn1_var"], ["b1"],
                          name="batch_norm_0"),
         helper.make_node("Relu", ["b1"], ["r1"], name="relu_0"),
         helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool2d_0"),
         helper.make_node("Conv", ["p1", "conv2_w", "conv2_b"], ["c2"], pads=[1, 1, 1, 1], name="conv2d_1"),
         helper.make_node("Relu", ["c2"], ["r2"], name="relu_1"),
         helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2], name="pool2d_1"),
         helper.make_node("Conv", ["p2", "conv3_w", "conv3_b"], ["c3"], name="conv2d_2"),
         helper.make_node("Relu", ["c3"], ["r3"], name="relu_2"),
         helper.make_node("Squeeze", ["r3"], ["sq"], axes=[2], name="squeeze_0"),
         helper.make_node("Transpose", ["sq"], ["tr"], perm=[2, 0, 1], name="transpose_0"),
         helper.make_node("MatMul", ["tr", "fc_w"], ["mm"], name="linear_0"),
         helper.make_node("Add", ["mm", "fc_b"], ["fc"], name="linear_0.add"),
         helper.make_node("Softmax", ["fc"], ["sm"], axis=2, name="softmax_0"),
         helper.make_node("Shape", ["sm"], ["shape"], name="shape_0")]
    for i in range(3):
        n += [helper.make_node("Gather", ["shape", f"idx{i}"], [f"dim{i}"], axis=0, name=f"gather_{i}"),
              helper.make_node("Unsqueeze", [f"dim{i}"], [f"dim{i}_1d"], axes=[0], name=f"unsqueeze_{i}")]
    n += [helper.make_node("Concat", ["dim0_1d", "dim1_1d", "dim2_1d"], ["target"], axis=0, name="concat_0"),
          helper.make_node("Reshape", ["sm", "target"], ["softmax_0.tmp_0"], name="reshape2_0")]
    g = helper.make_graph(n, "crnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, "w"])],
                          [helper.make_tensor_value_info("softmax_0.tmp_0", TensorProto.FLOAT, [1, "seqlen"])],
                          [numpy_helper.from_array(v, k) for k, v in w.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)], producer_name="PaddlePaddle")
    m.ir_version = 6
    return m


def _paddle_crnn(folder: Path) -> tuple[Path, Path]:
    path = folder / "paddle_crnn.onnx"
    if not path.exists():
        onnx.save(paddle_crnn_proto(), str(path))
    return path, _photo_data(folder, "paddle_crnn", 12, (32, 64))


def overridable_cnn_proto(seed: int = SEED) -> onnx.ModelProto:
    """A small CNN classifier (opset 13, IR 7) some of whose weights are graph inputs with a
    default (overridable initializers): BatchNorm's scale after conv1, the first Linear's
    weight and the last Linear's bias; the rest are plain constants (conv2's channels, read by a
    1x1 conv3, can be pruned), so each command has something it may change and something it must
    leave read from the input."""
    from onnx import TensorProto, numpy_helper

    rng = np.random.default_rng(seed)
    w = {"conv1_w": _he(rng, 16, 3, 3, 3), "bn_scale": (1 + 0.1 * rng.standard_normal(16)).astype(np.float32),
         "bn_bias": (0.1 * rng.standard_normal(16)).astype(np.float32),
         "bn_mean": (0.1 * rng.standard_normal(16)).astype(np.float32),
         "bn_var": (1 + 0.2 * rng.random(16)).astype(np.float32),
         "conv2_w": _he(rng, 32, 16, 3, 3), "conv2_b": (0.05 * rng.standard_normal(32)).astype(np.float32),
         "conv3_w": _he(rng, 32, 32, 1, 1), "conv3_b": (0.05 * rng.standard_normal(32)).astype(np.float32),
         "fc1_w": _he(rng, 32, 32), "fc1_b": (0.05 * rng.standard_normal(32)).astype(np.float32),
         "fc2_w": _he(rng, 32, 10), "fc2_b": (0.05 * rng.standard_normal(10)).astype(np.float32)}
    n = [helper.make_node("Conv", ["x", "conv1_w"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
         helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["b1"], name="bn1"),
         helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
         helper.make_node("Conv", ["r1", "conv2_w", "conv2_b"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
         helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
         helper.make_node("Conv", ["r2", "conv3_w", "conv3_b"], ["c3"], name="conv3"),
         helper.make_node("Relu", ["c3"], ["r3c"], name="relu3c"),
         helper.make_node("GlobalAveragePool", ["r3c"], ["gap"], name="gap"),
         helper.make_node("Flatten", ["gap"], ["flat"], axis=1, name="flatten"),
         helper.make_node("MatMul", ["flat", "fc1_w"], ["m1"], name="fc1"),
         helper.make_node("Add", ["m1", "fc1_b"], ["a1"], name="fc1.add"),
         helper.make_node("Relu", ["a1"], ["r3"], name="relu3"),
         helper.make_node("MatMul", ["r3", "fc2_w"], ["m2"], name="fc2"),
         helper.make_node("Add", ["m2", "fc2_b"], ["logits"], name="fc2.add")]
    overridable = [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(w[k].shape))
                   for k in OVERRIDABLE_WEIGHTS]
    g = helper.make_graph(n, "overridable", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16]),
                                             *overridable],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
                          [numpy_helper.from_array(v, k) for k, v in w.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 7
    return m


#: The weights of :func:`overridable_cnn_proto` that are graph inputs with a default.
OVERRIDABLE_WEIGHTS = ("bn_scale", "fc1_w", "fc2_b")


def _overridable_cnn(folder: Path) -> tuple[Path, Path]:
    path = folder / "overridable_cnn.onnx"
    if not path.exists():
        onnx.save(overridable_cnn_proto(), str(path))
    return path, _photo_data(folder, "overridable_cnn", 16, (16, 16))


@dataclasses.dataclass
class ZooEntry:
    name: str
    build: Callable[[Path], tuple[Path, Path]]
    what: str


def _entries() -> dict[str, ZooEntry]:
    e = [
        ZooEntry("silero_vad", _silero("silero_vad.onnx", 24),
                 "silero-vad v6 as published (spox, opset 16): If on sr, weights as Constants inside the "
                 "subgraphs, LSTM, 1-D convs, scalar int64 sr"),
        ZooEntry("silero_vad_op15", _silero("silero_vad_16k_op15.onnx", 24),
                 "silero-vad 16 kHz, TorchScript opset 15: If subgraphs, LSTM, Conv1d, scalar sr"),
        ZooEntry("silero_vad_ifless", _silero("silero_vad_op18_ifless.onnx", 24),
                 "silero-vad opset 18 'ifless' variant"),
        ZooEntry("silero_vad_half", _silero("silero_vad_half.onnx", 24),
                 "silero_vad_half.onnx as shipped: despite its name, every input, output, weight and Cast target is "
                 "float32 (the weights are not even float16-rounded); If subgraphs, LSTM"),
        ZooEntry("silero_vad_fp16", _silero_fp16("silero_vad.onnx", 24),
                 "silero-vad v6 converted to float16 by onnxruntime.transformers.float16 (keep_io_types=False): "
                 "float16 input/state/outputs, float16 Constants inside If subgraphs, LSTM, scalar int64 sr"),
        ZooEntry("mtcnn_pnet", _mtcnn("pnet", 8), "MTCNN P-Net (facenet-pytorch weights), TorchScript opset 17, "
                                                  "variable HxW, PReLU, ceil-mode MaxPool, softmax over channels"),
        ZooEntry("mtcnn_rnet", _mtcnn("rnet", 16), "MTCNN R-Net 24x24, TorchScript opset 17: convs, permute + Linear, "
                                                  "PReLU, softmax"),
        ZooEntry("mtcnn_onet", _mtcnn("onet", 16), "MTCNN O-Net 48x48, TorchScript opset 17: three heads"),
        ZooEntry("mtcnn_pnet-dynamo", _mtcnn("pnet", 8, "dynamo"), "MTCNN P-Net, dynamo opset 18, variable HxW"),
        ZooEntry("mtcnn_onet-dynamo", _mtcnn("onet", 16, "dynamo"), "MTCNN O-Net, dynamo opset 18"),
        ZooEntry("digits", _digits, "trained digits MobileNetV2 w0.5 (models/weights), TorchScript opset 17"),
        ZooEntry("paddle_crnn", _paddle_crnn, "paddle-style CRNN recognizer, opset 11: output declared [1, seqlen], "
                                              "returns [T, 1, 40] through a run-time Reshape"),
        ZooEntry("overridable_cnn", _overridable_cnn, "CNN, opset 13 / IR 7: BatchNorm scale, a Linear weight and a "
                                                      "bias are graph inputs with defaults (overridable initializers)"),
    ]
    for base, b in BASES.items():
        for v, what in VARIANTS.items():
            if v == "bn" and not b.has_bn or v == "nofold" and b.has_bn:
                continue
            e.append(ZooEntry(f"{base}-{v}", _reference(base, v), f"models/{base}: {what}"))
    e += [
        ZooEntry("mnv2_224", _large("mnv2_224"), "MobileNetV2 w1.0 at 3x224x224, 1000 classes (imagenet_224), TorchScript 17"),
        ZooEntry("encoder_base", _large("encoder_base"), "text encoder 4 layers, hidden 256, FFN 1024, seq 64, TorchScript 17"),
        ZooEntry("resnet_w1", _large("resnet_w1"), "small_resnet width 1.0 (16/32/64), 3x32x32, TorchScript 17"),
        ZooEntry("mnv2_224-half", _large("mnv2_224-half"), "mnv2_224 exported in float16 (module.half()), TorchScript 17"),
    ]
    return {x.name: x for x in e}


def _large(kind: str):
    """Larger settings for scripts/bench_zoo.py (not in the test matrix)."""
    def build(folder: Path) -> tuple[Path, Path]:
        out = folder / f"{kind}.onnx"
        if kind == "mnv2_224-half":
            module, args = _mnv2(width=1.0, size=224, classes=1000)
            module, args = module.half(), (args[0].half(),)
            names, dyn, data = ("x",), {"x": {0: "batch"}}, _image_data(224, 32)
        elif kind == "mnv2_224":
            module, args = _mnv2(width=1.0, size=224, classes=1000)
            names, dyn, data = ("x",), {"x": {0: "batch"}}, _image_data(224, 32)
        elif kind == "encoder_base":
            from models.text_encoder import tiny_encoder

            module, args = tiny_encoder(layers=4, hidden=256, heads=4, ffn=1024, vocab=1000, seq=64)
            names = ("input_ids", "attention_mask")
            dyn = {n: {0: "batch", 1: "seq"} for n in names}
            data = _text_data(32, 64)
        else:
            from models.resnet import small_resnet

            module, _ = small_resnet(width=1.0, num_classes=10, in_channels=3)
            module, args = _randomize_bn(module), (_torch(imagenet_scale(image_crops(1, 32, seed=99))),)
            names, dyn, data = ("x",), {"x": {0: "batch"}}, _image_data(32, 32)
        if not out.exists() and kind.endswith("-half"):  # export's parity check is float32's: check as "half" does
            proto = _torchscript_proto(module, args, names, 17, dyn)
            _check_against_torch(proto, module, args, names, atol=2e-2, rtol=2e-2)
            onnx.save(proto, str(out))
        elif not out.exists():
            _export(module, args, names, out, "torchscript", 17, dyn)
        return out, data(folder)
    return build


ZOO: dict[str, ZooEntry] = _entries()

#: Entries with larger settings, for the benchmark script only.
LARGE = ("mnv2_224", "encoder_base", "resnet_w1", "mnv2_224-half")


# --- running zoo models ---------------------------------------------------------------------

def feeds(data: Path, limit: int | None = None) -> list[dict[str, np.ndarray]]:
    if data.is_dir():
        files = sorted(data.glob("*.npz"))[:limit]
        return [dict(np.load(f)) for f in files]
    z = dict(np.load(data))
    n = next(iter(z.values())).shape[0]
    return [{k: v[i:i + 1] for k, v in z.items()} for i in range(n if limit is None else min(n, limit))]


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def outputs(path: Path, data: Path, limit: int | None = None) -> tuple[list[str], list[list[np.ndarray]]]:
    """Each output's arrays over the DATA samples; a model that fails on a sample is an AssertionError."""
    s = session(path)
    names = [o.name for o in s.get_outputs()]
    floats = {i.name: _ORT_FLOATS.get(i.type) for i in s.get_inputs()}
    per_sample = []
    for i, f in enumerate(feeds(data, limit)):
        # float arrays are cast to a float input's precision, as edgecomp casts DATA
        feed = {k: v.astype(floats[k]) if floats[k] and v.dtype.kind == "f" else v for k, v in f.items() if k in floats}
        try:
            per_sample.append(s.run(None, feed))
        except Exception as e:
            msg = str(e).splitlines()[0]
            raise AssertionError(f"{path.name} fails on DATA sample {i}: {type(e).__name__}: {msg}") from None
    return names, [[sample[j] for sample in per_sample] for j in range(len(names))]


def pooled_cosine(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Mean per-sample cosine; for outputs of under 8 values a sample (silero's probability) the
    cosine over all samples' values together, since one value's cosine is only its sign."""
    r = [np.asarray(a, np.float64).ravel() for a in ref]
    g = [np.asarray(a, np.float64).ravel() for a in got]
    if r[0].size < 8:
        r, g = [np.concatenate(r)], [np.concatenate(g)]
    cos = []
    for a, b in zip(r, g):
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        cos.append(1.0 if na == nb == 0 else float(a @ b / (na * nb)) if na and nb else 0.0)
    return float(np.mean(cos))


def sample_cosine(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Mean cosine of each sample's flattened output (validate's definition)."""
    cos = []
    for a, b in zip(ref, got):
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        cos.append(1.0 if na == nb == 0 else float(a @ b / (na * nb)) if na and nb else 0.0)
    return float(np.mean(cos))


def float_outputs(names, arrays):
    return [(n, a) for n, a in zip(names, arrays) if np.issubdtype(a[0].dtype, np.floating)]


def fidelity(ref_path: Path, cand_path: Path, data: Path) -> dict[str, float]:
    """pooled_cosine of each float output of ``cand_path`` against ``ref_path`` on DATA."""
    names, ref = outputs(ref_path, data)
    _, got = outputs(cand_path, data)
    return {n: pooled_cosine(r, g) for (n, r), (_, g) in zip(float_outputs(names, ref), float_outputs(names, got))}


class Zoo:
    """Builds zoo models into ``folder``, each once (per Zoo object)."""

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
                self._built[name] = ZOO[name].build(self.folder)
            except Exception as e:
                self._errors[name] = e
                raise
        return self._built[name]


def main(argv=None, zoo_class=None, entries=None, description: str = __doc__) -> None:
    """Build the zoo's models (all, or those named) into OUTDIR and print a line for each."""
    import argparse
    import time

    zoo_class, entries = zoo_class or Zoo, entries if entries is not None else ZOO
    ap = argparse.ArgumentParser(description=description.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("names", nargs="*", help="zoo models (default: all)")
    a = ap.parse_args(argv)
    zoo = zoo_class(a.outdir)
    width = max(map(len, entries)) + 2
    for name in a.names or entries:
        t0 = time.perf_counter()
        path, data = zoo.get(name)
        m = onnx.load(str(path))
        print(f"{name:{width}s} {time.perf_counter() - t0:5.2f}s opset {default_opset(m):2d} "
              f"params {param_count(m):8d} {path} {data}")


if __name__ == "__main__":
    main()
