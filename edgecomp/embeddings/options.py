"""The options of embedding reduction, declared once (:mod:`edgecomp.options`), and :class:`ReduceOptions`."""

from __future__ import annotations

import dataclasses

from edgecomp.errors import OptionError
from edgecomp.options import Option, check_values, in_range

__all__ = ["OPTIONS", "ReduceOptions"]

OPTIONS = (
    Option("bits", int, None, "row-wise int8, or int4 in blocks (of the low-rank factor with rank)", choices=(8, 4)),
    Option("block", int, None, "values per scale within a row (default: whole row for int8, 64 for int4)",
           check=in_range(2)),
    Option("rank", int, None, "low-rank factorization: [V, R] table + [R, D] projection", check=in_range(1)),
    Option("energy", float, None, "instead of rank: the smallest rank retaining this energy fraction, e.g. 0.99",
           check=in_range(0, 1, open_lo=True)),
    Option("exact_rows", int, 2000, "with a corpus and a rank: the most frequent tokens kept exact (residual table)",
           check=in_range(0)),
    Option("power", float, 0.5, "with a corpus: row weight (count + 1) ** power in the factorization",
           flag="--weight-power", check=in_range()),
    Option("prune_vocab", bool, False, "keep only the token ids of the corpus (or keep-ids file) and special tokens",
           needs=lambda v: "text" if v else None, flag="--prune-vocab/--keep-vocab"),
    Option("unk_id", int, None, "unknown-token id for pruned ids (default: the tokenizer's)", check=in_range(0)),
    Option("remap_tokenizer", bool, False, "write a renumbered tokenizer beside the model instead of an id map in "
           "the graph", flag="--remap-tokenizer/--map-ids-in-graph"),
    Option("min_rows", int, 1000, "quantize only tables with at least this many rows", check=in_range(0)),
)


@dataclasses.dataclass
class ReduceOptions:
    """What ``edgecomp reduce-embeddings`` does (the declared options are in :data:`OPTIONS`)."""

    bits: int | None = None  # 8 or 4: row-wise storage (of the low-rank factor when rank/energy is set)
    block: int | None = None  # values per scale; default: whole row for int8, 64 for int4
    scale_dtype: str | None = None  # default: float32 for int8, float16 for int4
    rank: int | None = None
    energy: float | None = None
    power: float = 0.5  # row weight (count + smoothing) ** power
    smoothing: float = 1.0
    exact_rows: int = 2000  # most frequent corpus tokens kept exact (with a corpus)
    prune_vocab: bool = False
    remap_tokenizer: bool = False
    unk_id: int | None = None  # default: the tokenizer's
    min_rows: int = 1000  # smaller tables (positions, token types) are left alone

    def validate(self) -> None:
        check_values(OPTIONS, {o.name: getattr(self, o.name) for o in OPTIONS})
        if self.rank is not None and self.energy is not None:
            raise OptionError("energy", f"replaces rank; give one of them (got rank {self.rank}, energy {self.energy:g})")
