"""Structured and unstructured pruning (the steps and the math: :mod:`edgecomp.prune.step`).

Light on purpose: ``run`` and the public names load :mod:`~edgecomp.prune.step` on first use,
so reading :mod:`edgecomp.prune.options` (the CLI's flags) imports no graph code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgecomp.lazy import lazy_exports

if TYPE_CHECKING:
    from edgecomp.prune.step import (
        UNSTRUCTURED_DATA,
        PruneResult,
        nothing_to_prune_message,
        prune_model,
        prune_weights,
        run,
        step_result,
        verify_pruned,
    )

__all__ = ["UNSTRUCTURED_DATA", "PruneResult", "nothing_to_prune_message", "prune_model", "prune_weights", "run",
           "step_result", "verify_pruned"]

__getattr__, __dir__ = lazy_exports(__name__, {"step": __all__})
