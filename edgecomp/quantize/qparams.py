"""Quantization parameter math shared by the int8 planners and emitters: a leaf module (numpy only),
so every quantize module can use it without importing another.

- :func:`quantize_weight` — symmetric int8 (or 7-bit) weights, one scale per output channel::

      qmax = 127 (8 bits) or 63 (7 bits),  scale_c = max|W_c| / qmax  (1 where W_c is all zero)
      q = clip(round(W / scale_c), -qmax, qmax)

- :func:`uint8_qparams` — an asymmetric uint8 activation grid of ``levels`` steps covering
  ``[lo, hi]`` widened to hold 0 (so a zero pads exactly)::

      scale = (hi − lo) / levels,  zero_point = clip(round(−lo / scale), 0, levels)
"""

from __future__ import annotations

import numpy as np

__all__ = ["quantize_weight", "uint8_qparams"]


def quantize_weight(w: np.ndarray, bits: int, axis: int, per_channel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8, per channel along ``axis`` (or one scale): (q, scale) with ``w ≈ q * scale``.

    ``scale`` always has one entry per channel (repeated when per-tensor), which the int8 ops
    accept and which keeps their zero-point shapes uniform.
    """
    qmax = 127 if bits == 8 else 63
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
    absmax = np.abs(w).max(axis=reduce_axes)
    if not per_channel:
        absmax = np.full_like(absmax, np.abs(w).max())
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def uint8_qparams(lo: float, hi: float, levels: int = 255) -> tuple[np.float32, np.uint8]:
    """Scale and zero point of an asymmetric uint8 grid of ``levels``+1 values (255: all of
    uint8; 127: 7-bit activations in [0, 127]) covering [lo, hi] ∋ 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / levels if hi > lo else 1.0
    zp = int(np.clip(round(-lo / scale), 0, levels))
    return np.float32(scale), np.uint8(zp)
