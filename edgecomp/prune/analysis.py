"""What the dependency analysis finds: channel layouts, the edits a cut needs, and the groups."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
import onnx_ir as ir

__all__ = ["Layout", "Edit", "Analysis"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a value's channels sit: ``axis`` (negative, from the end) and the atoms laid side by
    side along it, each as ``(atom, repeat)`` — a channel of the atom spans ``repeat`` consecutive
    positions (a flattened ``H·W`` block, or a head's ``d`` columns)."""

    axis: int
    parts: tuple[tuple[int, int], ...]
    rank: int | None = None

    def atoms(self) -> list[int]:
        return [a for a, _ in self.parts]

    def indices(self, kept: Mapping[int, np.ndarray], sizes: Mapping[int, int]) -> np.ndarray:
        """Positions along the axis that survive when atom ``a`` keeps channels ``kept[a]``."""
        out, offset = [], 0
        for atom, rep in self.parts:
            k = kept.get(atom, np.arange(sizes[atom]))
            out.append((offset + (k[:, None] * rep + np.arange(rep)[None, :])).reshape(-1))
            offset += sizes[atom] * rep
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    def width(self, sizes: Mapping[int, int]) -> int:
        return sum(sizes[a] * r for a, r in self.parts)



@dataclasses.dataclass
class Edit:
    """One change a cut implies.

    kind ``param``: take ``indices(layout)`` of ``node.inputs[index]`` along ``axis`` (``role``
    says whether it is a layer's weight as producer ``out`` or consumer ``in``, or another
    parameter); ``group``: set a depthwise Conv's ``group`` to the kept width; ``dim``: set element
    ``position`` of the constant at ``node.inputs[index]`` (of the ints attribute ``attr`` when
    that is set, ``index`` -1) to ``factor ·`` the kept width; ``take``: read ``node.inputs[index]``
    through a Gather of the kept positions along ``axis`` (after an Expand to ``expand`` when that
    is set), for a computed tensor with an axis per head (an attention score bias).
    """

    kind: str
    node: ir.Node
    index: int
    layout: Layout
    axis: int = 0
    role: str = "param"
    position: int = 0
    factor: int = 1
    attr: str | None = None
    expand: tuple[int, ...] | None = None



@dataclasses.dataclass
class Analysis:
    """The result of :func:`find_groups`."""

    sizes: dict[int, int]
    kinds: dict[int, str]
    names: dict[int, str]
    parent: dict[int, int]
    blocked: dict[int, list[str]]
    edits: list[Edit]
    values: dict[str, Layout]  # every value whose shape changes, with its layout
    head_values: set[str]  # values inside attention blocks whose shapes are cleared

    def root(self, atom: int) -> int:
        while self.parent[atom] != atom:
            self.parent[atom] = self.parent[self.parent[atom]]
            atom = self.parent[atom]
        return atom

    def groups(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for a in self.sizes:
            out.setdefault(self.root(a), []).append(a)
        return out

    def group_blocked(self, root: int, groups: dict[int, list[int]] | None = None) -> list[str]:
        """Why ``root``'s group is kept whole; pass :meth:`groups` when asking for many groups
        (rebuilding it per group was quadratic)."""
        reasons = []
        for a in (self.groups() if groups is None else groups)[root]:
            reasons += [r for r in self.blocked.get(a, []) if r not in reasons]
        return reasons



class NotChannelwise(Exception):
    """An op that does not keep channel positions; the message names it."""
