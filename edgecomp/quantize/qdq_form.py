"""The QDQ form at parity with the contrib form: what onnxruntime needs to see to fuse it back.

onnxruntime's CPU provider turns ``DequantizeLinear(x_q) · DequantizeLinear(W_q)`` (a MatMul reading
two DequantizeLinear, no QuantizeLinear after it) into the same ``MatMulIntegerToFloat`` the contrib
form writes (its QDQ "MatMulIntegerToFloat" selector, a level-2 fusion). Its level-1
``MatMulAddFusion`` runs first and rewrites ``MatMul → Add(bias [N])`` into ``Gemm`` (with Reshapes
for a 3-D input), after which the int8 fusion no longer matches: the layer runs as a float Gemm on
weights dequantized at every run (MiniLM's QDQ form was 0.67x fp32 against the contrib form's 0.42x).
That fusion takes only a bias Gemm accepts (``[N]`` or ``[1, N]``), so a bias stored with the
output's rank, ``[1, …, 1, N]`` (the same values, broadcast the same way), is left to the int8
fusion, which keeps the Add after ``MatMulIntegerToFloat``.

A 2-D input's bias cannot take that form (``[1, N]`` is Gemm's); it keeps ``[N]``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["bias_for_int8_fusion"]


def bias_for_int8_fusion(bias: np.ndarray, x: ir.Value) -> np.ndarray:
    """``bias`` [N] reshaped to ``[1]*(r-1) + [N]`` when the layer's input ``x`` has a known rank
    ``r >= 3`` (see the module docstring), else as it is."""
    rank = len(x.shape) if x.shape is not None else None
    if rank is None or rank < 3 or bias.ndim != 1:
        return bias
    return bias.reshape((1,) * (rank - 1) + (bias.size,))
