"""Static int8 quantization (the steps and the math: :mod:`edgecomp.quantize.step`).

Light on purpose: ``run`` and the public names load :mod:`~edgecomp.quantize.step` on first use,
so reading :mod:`edgecomp.quantize.options` (the CLI's flags) imports no graph code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgecomp.lazy import lazy_exports

if TYPE_CHECKING:
    from edgecomp.quantize.step import LAYER_COLUMNS, QuantizeResult, quantize_model, run, step_result

__all__ = ["LAYER_COLUMNS", "QuantizeResult", "quantize_model", "run", "step_result"]

__getattr__, __dir__ = lazy_exports(__name__, {"step": __all__})
