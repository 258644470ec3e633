"""The options of pruning, with their defaults and allowed values."""

from __future__ import annotations

import dataclasses
import re

from edgecomp.errors import ConfigError

__all__ = ["IMPORTANCES", "HOLD_OUT_EVERY", "FIDELITY_WARN", "PruneOptions"]


IMPORTANCES = ("auto", "l1", "l2", "activation", "obs")



KINDS = ("channels", "heads")



HOLD_OUT_EVERY = 5  # with --data, every 5th sample is held out: it checks repairs and the result, never fits them



FIDELITY_WARN = 0.95  # warn when the held-out mean cosine or top-1 agreement falls below this



@dataclasses.dataclass
class PruneOptions:
    """Every option of structured pruning, with its default."""

    sparsity: float = 0.5  # fraction of each group's channels (or heads) removed
    importance: str = "auto"  # auto (activation with data, else l2) | l1 | l2 | activation | obs
    scope: str = "per-layer"  # per-layer | global
    protect: tuple[str, ...] = ()  # regexes on node names: layers kept whole
    # Kept channel counts are multiples of this; 0 = auto: 8 for groups of >= 32 channels, else 1
    # (odd counts made the pruned digits MobileNetV2 1.6-2x slower in onnxruntime 1.32).
    round_to: int = 0
    kinds: tuple[str, ...] = KINDS  # channels (incl. FFN neurons) and/or heads
    repair: bool = True  # least squares re-fit of consumers (needs data)
    ridge: float = 1e-3  # λ = ridge · tr(A_K) / K (the kept features' Gram) in the repair fit
    max_samples: int | None = None
    threads: int = 1

    def validate(self) -> None:
        if not 0.0 < self.sparsity < 1.0:
            raise ConfigError(f"--sparsity must be strictly between 0 and 1, got {self.sparsity}")
        if self.importance not in IMPORTANCES:
            raise ConfigError(f"--importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")
        if self.scope not in ("per-layer", "global"):
            raise ConfigError(f"--scope must be global or per-layer, got {self.scope!r}")
        if self.round_to < 0:
            raise ConfigError(f"--round-to must be >= 1 (or 0 for auto), got {self.round_to}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ConfigError(f"--kinds takes a comma list of {', '.join(KINDS)}, got {','.join(self.kinds)!r}")
        for p in self.protect:
            try:
                re.compile(p)
            except re.error as e:
                raise ConfigError(f"--protect {p!r} is not a valid regular expression ({e})") from None
