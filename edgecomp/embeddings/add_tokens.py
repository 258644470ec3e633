"""AddTokensPass: append vocabulary rows to the table with ``vocab_size`` rows.

New rows go after the existing ones (ids ``V .. V+n-1``), so every old id reads the same row.
They are given by the caller, e.g. the mean of the rows of each new word's sub-tokens under the
original vocabulary (:func:`edgecomp.embeddings.new_token_rows`)::

      E' = [E; mean_{t in tokens(w_1)} E[t]; ...]

A tied output projection reads the grown table too, so its output gains the new tokens' logits
and the output shapes are updated.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgecomp.embeddings.tables import ADDED_ROWS_KEY, find_embedding_tables, register_const
from edgecomp.errors import ConfigError
from edgecomp.passes.base import EdgecompPass, PassReport

__all__ = ["AddTokensPass"]


class AddTokensPass(EdgecompPass):
    """Append rows to the vocabulary table.

    Args:
        rows: [n, D] new rows.
        vocab_size: rows of the table to grow (other tables are left alone).
    """

    def __init__(self, *, rows: np.ndarray, vocab_size: int):
        rows = np.asarray(rows, np.float32)
        if rows.ndim != 2 or not len(rows):
            raise ConfigError("no new token rows to add")
        self.vocab_size, self.added = vocab_size, len(rows)
        self._rows = rows

    def call(self, model: ir.Model) -> PassReport:
        tables, _ = find_embedding_tables(model, tied=True)
        out_rows = []
        for t in tables:
            v, d = t.value.const_value.shape.numpy()
            if v != self.vocab_size:
                continue
            if self._rows.shape[1] != d:
                raise ConfigError(f"new rows are {self._rows.shape[1]} wide but {t.value.name} is {d}")
            name = t.value.name
            grown = np.concatenate([t.array, self._rows.astype(t.array.dtype)])
            before = int(t.value.const_value.metadata_props.get(ADDED_ROWS_KEY, 0))
            model.graph.initializers.pop(name)
            new = register_const(model, name, grown)
            new.const_value.metadata_props[ADDED_ROWS_KEY] = str(before + self.added)  # for --train-rows new
            t.value.replace_all_uses_with(new)
            for head in t.heads:
                for out in _head_outputs(head):
                    if out.shape is not None and out.shape[-1] == v:
                        out.shape = ir.Shape([*list(out.shape)[:-1], v + self.added])
            out_rows.append(t.row(decision=f"added {self.added} rows", reason="tied head grows too" if t.heads
                                  else "", **{"rows after": v + self.added}))
        if not out_rows:
            raise ConfigError(f"no embedding table with {self.vocab_size} rows to add tokens to")
        return self.report(model, True, {"added tokens": self.added}, out_rows)


def _head_outputs(head: ir.Node) -> list[ir.Value]:
    if head.op_type == "Gemm":
        return [head.outputs[0]]
    return [head.outputs[0], *(u.node.outputs[0] for u in head.outputs[0].uses())]
