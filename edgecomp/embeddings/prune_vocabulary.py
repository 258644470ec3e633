"""PruneVocabularyPass: keep only the rows of the vocabulary table that a deployment uses.

The table ``E`` [V, D] (the one with ``vocab_size`` rows) becomes ``E[keep]`` [K, D], ``keep``
sorted. With ``remap=True`` callers keep feeding original token ids: each Gather reads through
an int32 map of V entries::

      map[keep[i]] = i,   map[other] = position of ``unk_id`` in keep
      out = Gather(E[keep], Gather(map, ids))

so an id outside the kept set reads the unknown token's row. With ``remap=False`` the ids are
already the new ones (a remapped tokenizer is written beside the model).

A table tied to an output projection is left whole: pruning it would change the model's output
vocabulary.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (not imported by onnx_ir itself)

from edgecomp.embeddings.tables import ADDED_ROWS_KEY, Emitter, find_embedding_tables, register_const
from edgecomp.errors import ConfigError
from edgecomp.passes.base import EdgecompPass, PassReport

__all__ = ["PruneVocabularyPass", "remap_table"]


def remap_table(keep: np.ndarray, vocab_size: int, unk_id: int) -> np.ndarray:
    """The int32 map old id -> new row (see the module docstring)."""
    pos = np.searchsorted(keep, unk_id)
    if pos >= len(keep) or keep[pos] != unk_id:
        raise ConfigError(f"the unknown token id {unk_id} must be among the kept ids")
    index = np.full(vocab_size, pos, np.int32)
    index[keep] = np.arange(len(keep), dtype=np.int32)
    return index


class PruneVocabularyPass(EdgecompPass):
    """Shrink the vocabulary table to the kept token ids.

    Args:
        keep: token ids to keep (the unknown token among them).
        vocab_size: rows of the vocabulary table (other tables are left alone).
        unk_id: where ids outside ``keep`` go.
        remap: put the id map in the graph (else the caller feeds new ids).
    """

    def __init__(self, *, keep: np.ndarray, vocab_size: int, unk_id: int, remap: bool = True):
        keep = np.unique(np.asarray(keep, np.int64))
        if len(keep) == 0 or keep[0] < 0 or keep[-1] >= vocab_size:
            raise ConfigError(f"kept ids must lie in [0, {vocab_size}); got {keep[:1]}..{keep[-1:]}")
        self.vocab_size, self.unk_id, self.remap, self.kept = vocab_size, unk_id, remap, len(keep)
        self._keep = keep
        self._map = remap_table(keep, vocab_size, unk_id)

    def call(self, model: ir.Model) -> PassReport:
        tables, rows = find_embedding_tables(model, tied=True)
        rows = [r for r in rows if r["rows"] == self.vocab_size]
        done = 0
        for t in tables:
            v, d = t.value.const_value.shape.numpy()
            if v != self.vocab_size:
                continue
            if t.heads:
                rows.append(t.row(decision="left whole", reason="tied to an output projection: pruning would "
                                                                "change the output vocabulary"))
                continue
            table = t.array
            pruned = register_const(model, f"{t.value.name}_pruned", np.ascontiguousarray(table[self._keep]))
            index = register_const(model, f"{t.value.name}_id_map", self._map) if self.remap else None
            added = int(t.value.const_value.metadata_props.get(ADDED_ROWS_KEY, 0))
            if added:  # the kept ids are sorted: the kept added rows stay the last ones
                pruned.const_value.metadata_props[ADDED_ROWS_KEY] = str(int(np.sum(self._keep >= v - added)))
            for gather in t.gathers:
                ids = gather.inputs[1]
                if index is not None:
                    new_ids = Emitter(model.graph, gather).op("Gather", [index, ids], axis=0)
                    new_ids.shape = ids.shape
                    gather.replace_input_with(1, new_ids)
                gather.replace_input_with(0, pruned)
            model.graph.initializers.pop(t.value.name)
            model.graph.sort()
            after = pruned.const_value.nbytes + (self._map.nbytes if self.remap else 0)
            rows.append(t.row(decision=f"kept {self.kept} rows", reason="id map in the graph" if self.remap
                              else "ids remapped by the tokenizer", **{"kept share": self.kept / v,
                              "bytes before": table.nbytes, "bytes after": after, "ratio": table.nbytes / after}))
            done += 1
        if done:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return self.report(model, bool(done), {"tables": done, "kept rows": self.kept}, rows)
