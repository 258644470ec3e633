"""Defaults of the target-numerics runs, apart so the CLI's flags read them without the runner."""

__all__ = ["DEFAULT_MAX_SAMPLES", "DEFAULT_TIMEOUT_S"]

DEFAULT_MAX_SAMPLES = 16  # samples run on each emulated target (evenly spaced over DATA)
DEFAULT_TIMEOUT_S = 1800.0  # seconds the emulated runs of one target may take in all
