"""Embedding reduction (the passes in order and the tokenizer side: :mod:`edgecomp.embeddings.step`).

Light on purpose: ``run`` and the public names load :mod:`~edgecomp.embeddings.step` on first
use, so reading :mod:`edgecomp.embeddings.options` (the CLI's flags) imports no graph code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgecomp.lazy import lazy_exports

if TYPE_CHECKING:
    from edgecomp.embeddings.options import ReduceOptions
    from edgecomp.embeddings.step import ReduceResult, reduce_embeddings, run, step_result

__all__ = ["ReduceOptions", "ReduceResult", "reduce_embeddings", "run", "step_result"]

__getattr__, __dir__ = lazy_exports(__name__, {"options": ["ReduceOptions"],
                                               "step": ["ReduceResult", "reduce_embeddings", "run", "step_result"]})
