"""The options of pruning, declared once (:mod:`edgecomp.options`), and :class:`PruneOptions`."""

from __future__ import annotations

import dataclasses

from edgecomp.errors import OptionError
from edgecomp.options import DEFAULT_MAX_SAMPLES, Option, check_values, in_range, regexes

__all__ = ["IMPORTANCES", "KINDS", "SCOPES", "OPTIONS", "HOLD_OUT_EVERY", "FIDELITY_FLOOR", "SYNTHETIC_SAMPLES",
           "PruneOptions"]

IMPORTANCES = ("auto", "l1", "l2", "activation", "obs")
KINDS = ("channels", "heads")
SCOPES = ("auto", "per-layer", "global")
HOLD_OUT_EVERY = 5  # with data, every 5th sample is held out: it checks repairs and the result, never fits them
# The floor a pruned model must keep against the unpruned one: mean cosine and top-1 agreement, on
# the held-out samples of the data, or without data on SYNTHETIC_SAMPLES synthesized inputs. Below
# it the result is refused, or written with exit status 3 when a degraded result is allowed.
FIDELITY_FLOOR = 0.95
SYNTHETIC_SAMPLES = 16  # one top-1 flip in 16 is 93.8%: a classifier must agree on every random input


def _kinds(v: list) -> str | None:
    if not v or any(k not in KINDS for k in v):
        return f"must be a non-empty list of {', '.join(KINDS)}, got {v!r}"
    return None


def _levels(v: list) -> str | None:
    try:
        ok = bool(v) and all(0 < float(s) < 1 for s in v)
    except (TypeError, ValueError):
        ok = False
    return None if ok else f"must be sparsities in (0, 1), e.g. 0.25,0.5,0.75; got {v!r}"


OPTIONS = (
    Option("sparsity", float, 0.5, "fraction removed: of each group's channels/heads (structured) or of the weights",
           check=in_range(0, 1, open_lo=True, open_hi=True)),
    Option("structured", bool, True, "remove whole channels, neurons and heads (faster), or zero single weights "
           "(smaller zipped only, no CPU speed-up)", flag="--structured/--unstructured"),
    Option("importance", str, "auto", "auto: activation-based with data, else L2 weight magnitude; activation and "
           "obs need data", choices=IMPORTANCES,
           needs=lambda v: "calibration" if v in ("activation", "obs") else None),
    Option("scope", str, "auto", "rank per group or across the model; auto: per-layer (structured), global "
           "(unstructured)", choices=SCOPES),
    Option("protect", list, [], "regexes of node names kept whole (repeatable)", check=regexes,
           metavar="REGEX"),
    Option("round_to", int, 0, "kept channel counts multiple of N; 0 = auto: 8 for groups of >= 32 channels "
           "(odd counts run slower in onnxruntime's blocked kernels), else 1", check=in_range(0)),
    Option("kinds", list, list(KINDS), "what structured pruning removes: channels (incl. FFN neurons), heads, or both",
           check=_kinds, split=","),
    Option("repair", bool, True, "with data, re-fit the consumers of cut channels by least squares"),
    Option("max_samples", int, DEFAULT_MAX_SAMPLES, "data samples to use, evenly spaced over DATA (more cost time)",
           check=in_range(1)),
    Option("metric", str, "cosine", "what tolerance bounds: 1-cosine, top-1 accuracy drop, or MAE",
           choices=("cosine", "top1", "mae")),
    Option("tolerance", float, None, "allowed loss vs the input on eval data: instead of sparsity, the largest "
           "uneven cut (per group) whose measured loss stays within it (exit status 3 when none does)",
           check=in_range(0), needs=lambda v: "eval"),
    Option("levels", list, ["0.25", "0.5", "0.75"], "with a tolerance: the sparsities each group's sensitivity is "
           "measured at (more levels: finer uneven cuts, more evaluations)", check=_levels, split=","),
    Option("max_evaluations", int, None, "with a tolerance: the most models evaluated on the eval data (a step "
           "not measured is not taken)", check=in_range(1)),
    Option("allow_degraded", bool, False, f"write the result even below the fidelity floor (mean cosine or top-1 "
           f"agreement < {FIDELITY_FLOOR} against the input, on the data's held-out samples, else on "
           f"{SYNTHETIC_SAMPLES} synthesized inputs), with a warning and exit status 3, instead of refusing it "
           "(e.g. to heal it with distill)"),
)


@dataclasses.dataclass
class PruneOptions:
    """Every option of pruning, with its default (the declared ones are in :data:`OPTIONS`)."""

    sparsity: float = 0.5  # fraction of each group's channels (or heads) removed
    structured: bool = True  # False: magnitude pruning of single weights
    importance: str = "auto"  # auto (activation with data, else l2) | l1 | l2 | activation | obs
    scope: str = "auto"  # auto (per-layer structured, global unstructured) | per-layer | global
    protect: tuple[str, ...] = ()  # regexes on node names: layers kept whole
    # Kept channel counts are multiples of this; 0 = auto: 8 for groups of >= 32 channels, else 1
    # (onnxruntime's conv kernels are blocked by 8: odd counts ran slower, see BENCHMARKS.md).
    round_to: int = 0
    kinds: tuple[str, ...] = KINDS  # channels (incl. FFN neurons) and/or heads
    repair: bool = True  # least squares re-fit of consumers (needs data)
    ridge: float = 1e-3  # λ = ridge · tr(A_K) / K (the kept features' Gram) in the repair fit
    max_samples: int = DEFAULT_MAX_SAMPLES  # evenly spaced samples of DATA used (Dataset.indices)
    metric: str = "cosine"
    tolerance: float | None = None  # with eval data: the cut is fitted to it (prune.tolerance)
    allow_degraded: bool = False  # write a result below FIDELITY_FLOOR (flagged degraded) instead of refusing it
    # With a tolerance: the sparsities measured per group (tolerance.LEVELS), as the CLI's comma list
    # gives them (numbers from a recipe work too; the search reads them with float()).
    levels: tuple[str | float, ...] = ("0.25", "0.5", "0.75")
    max_evaluations: int | None = None  # with a tolerance: evaluation budget of the search
    threads: int = 1

    def validate(self) -> None:
        check_values(OPTIONS, {o.name: getattr(self, o.name) for o in OPTIONS})
        if self.ridge < 0:
            raise OptionError("ridge", f"must be >= 0, got {self.ridge}")

    def resolved_scope(self) -> str:
        return self.scope if self.scope != "auto" else ("per-layer" if self.structured else "global")
