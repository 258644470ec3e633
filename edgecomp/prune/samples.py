"""Calibration samples for pruning: which are used, which are held out, feature rows per layer."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx_ir as ir

from edgecomp.data import Dataset, input_specs
from edgecomp.graph import attribute
from edgecomp.prune.options import HOLD_OUT_EVERY


def n_used(data: Dataset, limit: int | None) -> int:
    return len(data) if limit is None else min(len(data), limit)



def is_held(i: int, n: int) -> bool:
    """Sample ``i`` of ``n`` is held out (every 5th, once there are at least 5)."""
    return n >= HOLD_OUT_EVERY and i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1



def feeds(data: Dataset, model: ir.Model, limit: int | None, part: str = "all") -> Iterable[dict[str, np.ndarray]]:
    """Feeds of DATA: ``all``, the ``fit`` part (not held out) or the ``held`` part."""
    specs = input_specs(model)
    data.check_against(specs)
    n = n_used(data, limit)
    for i, feed in enumerate(data.feeds_for(specs, limit)):
        if part == "all" or (part == "held") == is_held(i, n):
            yield feed



def feature_rows(x: np.ndarray, node: ir.Node, subsample: bool) -> np.ndarray:
    """A consumer's input as rows of features: channels last, one row per position."""
    if node.op_type == "Conv":
        if subsample:
            strides = list(attribute(node, "strides", [1] * (x.ndim - 2)))
            x = x[(slice(None), slice(None), *(slice(None, None, s) for s in strides))]
        return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])
