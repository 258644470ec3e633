"""The options of validation and benchmarking, declared once (:mod:`edgecomp.options`)."""

from __future__ import annotations

from edgecomp.options import THREADS, Option, in_range

__all__ = ["VALIDATE_OPTIONS", "VALIDATE_DATA_NEEDED", "BENCH_OPTIONS"]

VALIDATE_OPTIONS = (
    Option("k", int, 10, "neighbours for the k-NN agreement of embeddings", check=in_range(1)),
)

#: The data validation reads whatever its options (key -> what reads it).
VALIDATE_DATA_NEEDED = {"eval": "validate"}

BENCH_OPTIONS = (
    THREADS,
    Option("warmup", int, 10, "untimed runs per model", check=in_range(0)),
    Option("runs", int, 50, "timed runs per model (interleaved)", check=in_range(1)),
    Option("profile", bool, False, "also profile warmup + runs more runs per model with onnxruntime's profiler: "
                                   "time per op type and the slowest nodes (separate runs: latency unaffected)"),
)
