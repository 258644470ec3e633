"""sklearn's bundled digits as 1x32x32 images, and training of the reference classifiers.

    python -m models.digits --arch mobilenet_v2 --width 0.5 --epochs 10

writes ``models/weights/digits_<arch>_w<width>.pt``; ``models.mobilenet_v2:digits_classifier``
loads it. The 8x8 images are upsampled 4x (nearest) and scaled to [-1, 1]; the split is a fixed
80/20 stratified split, so every script and test sees the same held-out images.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["load_digits_32", "build", "train", "load_trained", "weights_path", "write_data", "WEIGHTS_DIR"]

WEIGHTS_DIR = Path(os.environ.get("EDGECOMP_WEIGHTS", Path(__file__).resolve().parent / "weights"))


def load_digits_32(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images [N,1,32,32] float32 in [-1,1], labels [N] int64) for ``split`` in train/test/all."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0) * 2.0 - 1.0
    x = x.repeat(4, axis=1).repeat(4, axis=2)[:, None]
    y = d.target.astype(np.int64)
    if split == "all":
        return x, y
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return (xtr, ytr) if split == "train" else (xte, yte)


def build(arch: str, width: float) -> nn.Module:
    if arch == "mobilenet_v2":
        from models.mobilenet_v2 import MobileNetV2

        return MobileNetV2(width, num_classes=10, in_channels=1, input_size=32)
    if arch == "resnet":
        from models.resnet import SmallResNet

        return SmallResNet(tuple(max(4, int(round(w * width))) for w in (16, 32, 64)))
    raise ValueError(f"unknown arch {arch!r}; use mobilenet_v2 or resnet")


def weights_path(arch: str, width: float) -> Path:
    return WEIGHTS_DIR / f"digits_{arch}_w{width:g}.pt"


def train(model: nn.Module, epochs: int = 10, batch: int = 64, lr: float = 0.05, seed: int = 0,
          log: bool = True) -> float:
    """SGD with cosine decay and light shift augmentation; returns test accuracy."""
    torch.manual_seed(seed)
    xtr, ytr = (torch.from_numpy(a) for a in load_digits_32("train"))
    xte, yte = (torch.from_numpy(a) for a in load_digits_32("test"))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=4e-5, nesterov=True)
    steps = epochs * ((len(xtr) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), batch):
            idx = perm[i : i + batch]
            xb = _shift(xtr[idx])
            loss = nn.functional.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if log:
            print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f} test acc {evaluate(model, xte, yte):.4f}", flush=True)
    return evaluate(model, xte, yte)


def _shift(x: torch.Tensor, max_shift: int = 2) -> torch.Tensor:
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,)))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def load_trained(arch: str, width: float):
    """(model, example) with trained weights; raises with the command to run if they are missing."""
    path = weights_path(arch, width)
    if not path.is_file():
        raise FileNotFoundError(f"no trained weights at {path}; run: python -m models.digits --arch {arch} --width {width:g}")
    model = build(arch, width)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval(), (torch.from_numpy(load_digits_32("test")[0][:1]),)


def write_data(folder: Path) -> None:
    """DATA files for the CLI: calibration images (train), held-out images and labels (test)."""
    folder.mkdir(parents=True, exist_ok=True)
    xtr, _ = load_digits_32("train")
    xte, yte = load_digits_32("test")
    np.savez(folder / "train.npz", x=xtr)
    np.savez(folder / "test.npz", x=xte)
    np.save(folder / "test_labels.npy", yte)
    print(f"wrote {folder}/train.npz ({len(xtr)} images), test.npz ({len(xte)}), test_labels.npy")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="mobilenet_v2", choices=["mobilenet_v2", "resnet"])
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="retrain even if weights exist")
    ap.add_argument("--write-data", metavar="DIR", help="also write DATA files: train.npz, test.npz, test_labels.npy")
    args = ap.parse_args(argv)
    if args.write_data:
        write_data(Path(args.write_data))
    path = weights_path(args.arch, args.width)
    if path.is_file() and not args.force:
        print(f"{path} exists (use --force to retrain)")
        return
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch.manual_seed(args.seed)
    model = build(args.arch, args.width)
    t0 = time.time()
    acc = train(model, args.epochs, seed=args.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    print(f"test accuracy {acc:.4f} in {time.time() - t0:.0f}s -> {path}")


if __name__ == "__main__":
    main()
