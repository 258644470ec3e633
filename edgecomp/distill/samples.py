"""Training samples for distillation: DATA or tokenized text, split and batched for torch.

Samples are feeds (name → array with a leading axis of 1): text is tokenized into memory, DATA
is read from disk sample by sample when a batch needs it (a subset is a list of indices into
it, never a copy), so a DATA larger than memory trains in bounded memory. A batch stacks
them; arrays of different shapes (token sequences of different lengths) are zero-padded to the
longest, which is what an attention mask of zeros means. The train/held-out split and each
epoch's order are fixed by the seed, so every process of a data-parallel run, and a resumed
run, sees the same batches.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import os
from typing import Sequence

import numpy as np
import torch

from edgecomp.errors import DataError

__all__ = ["Samples", "from_data", "from_text", "epoch_order"]


class _Subset(collections.abc.Sequence):
    """Items ``idx`` of ``base``, read from it when indexed."""

    def __init__(self, base: Sequence, idx: Sequence[int]):
        self.base, self.idx = base, list(idx)

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i):
        return self.base[self.idx[i]]


@dataclasses.dataclass
class Samples:
    feeds: Sequence[dict[str, np.ndarray]]  # a list, or a Dataset read sample by sample
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.feeds)

    @property
    def names(self) -> list[str]:
        return list(self.feeds[0]) if self.feeds else []

    def subset(self, idx: Sequence[int]) -> "Samples":
        return Samples(_Subset(self.feeds, idx), None if self.labels is None else self.labels[list(idx)])

    def split(self, held_out: float, seed: int) -> tuple["Samples", "Samples"]:
        """(train, held-out): a seeded random ``held_out`` fraction (at least 2 samples) is held out."""
        n = len(self)
        n_val = max(2, int(round(n * held_out))) if held_out > 0 else 0
        if n - n_val < 1:
            raise DataError(f"{n} samples are too few to hold out {held_out:.0%} for early stopping; "
                            "give more data or --held-out 0")
        perm = np.random.default_rng(seed).permutation(n)
        return self.subset(sorted(perm[n_val:])), self.subset(sorted(perm[:n_val]))

    def sizes(self) -> np.ndarray:
        """Elements per sample (the sequence length, for token feeds)."""
        return np.array([sum(a.size for a in f.values()) for f in self.feeds])

    def batch(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        """Stack samples ``idx`` into tensors (zero-padded to the longest)."""
        out = {}
        for name in self.names:
            arrays = [self.feeds[i][name] for i in idx]
            shape = np.max([a.shape for a in arrays], axis=0)
            if any(a.shape != tuple(shape) for a in arrays):
                arrays = [np.pad(a, [(0, s - d) for s, d in zip(shape, a.shape)]) for a in arrays]
            arr = np.concatenate(arrays)
            out[name] = torch.from_numpy(arr.astype(np.int64 if arr.dtype.kind in "iub" else np.float32, copy=False))
        return out

    def batch_labels(self, idx: Sequence[int]) -> torch.Tensor | None:
        return None if self.labels is None else torch.from_numpy(self.labels[list(idx)].astype(np.int64))

    def fingerprint(self) -> str:
        """A hash of every array and label, so a checkpoint is not resumed on other data."""
        h = hashlib.sha256()
        for feed in self.feeds:
            for k in sorted(feed):
                h.update(k.encode())
                h.update(str(feed[k].shape).encode())
                h.update(np.ascontiguousarray(feed[k]).tobytes())
        if self.labels is not None:
            h.update(self.labels.tobytes())
        return h.hexdigest()[:16]


def from_data(path: str | os.PathLike, labels: str | os.PathLike | None = None) -> Samples:
    """Every sample of DATA (``.npz`` with a sample axis, or a folder of ``.npz`` feeds)."""
    from edgecomp.data import Dataset, load_labels

    ds = Dataset(path)
    y = load_labels(labels, len(ds)) if labels else None
    return Samples(ds, y)


def from_text(path: str | os.PathLike, tokenizer: str | os.PathLike, max_len: int = 128,
              labels: str | os.PathLike | None = None) -> Samples:
    """One sample per non-empty line of a text file, tokenized (input_ids, attention_mask)."""
    from edgecomp.data import load_labels
    from edgecomp.text import load_tokenizer, read_lines, tokenize

    lines = read_lines(path)
    feeds = tokenize(load_tokenizer(tokenizer), lines, max_len=max_len)
    y = load_labels(labels, len(feeds)) if labels else None
    return Samples(feeds, y)


def epoch_order(n: int, seed: int, epoch: int, sizes: np.ndarray | None = None, batch: int = 1,
                bucket: int = 50) -> np.ndarray:
    """The sample order of one epoch: a permutation fixed by (seed, epoch).

    With ``sizes`` that vary (token sequences), each run of ``bucket`` batches is sorted by size
    and the batches are shuffled, so a batch pads to similar lengths (less wasted compute).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if sizes is None or batch <= 1 or np.all(sizes == sizes[0]):
        return order
    span = batch * bucket
    chunks = [order[i:i + span] for i in range(0, n, span)]
    order = np.concatenate([c[np.argsort(sizes[c], kind="stable")] for c in chunks])
    full = n // batch * batch
    batches = order[:full].reshape(-1, batch)[rng.permutation(full // batch)]
    return np.concatenate([batches.reshape(-1), order[full:]])
