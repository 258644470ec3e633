"""Never slower on the target: the written model, whole, timed against the model as given.

The family choice (:func:`edgecomp.quantize.families.choose_families`) times candidate builds
before the fidelity search and int4 change the plan, on one calibration sample, in a few rounds:
it does not predict the written model's latency (issue 26: int8 at 1.06-1.10x fp32 in three of six
runs of a small CNN). So after everything is decided, :func:`check_written_model` times the model
that will be written against its input, interleaved, and quantize acts on the result:

- the ratio's 95% interval lies wholly below 1.0: the int8 model is kept (``faster``);
- otherwise (slower, or equal within noise) with ``--families auto``: the float model as given is
  written, with a warning carrying both measurements (the family timing and the whole-model one);
- otherwise with forced families (``all`` or a list): the int8 model is kept, the warning says so,
  and :attr:`SpeedCheck.forced_not_faster` makes the command exit with status 5.

Why the numbers hold on a busy machine (the protocol of
:func:`edgecomp.measure.bench.compare_latency`): the two models run alternately (A B A B ...), so a
slow phase of the machine hits both alike; each round keeps the ratio of the two medians of
``runs`` runs (a median ignores the outliers a preemption causes); the log-ratios of the rounds
give a Student-t 95% interval, whose width grows with the round-to-round spread, so load that
changes between rounds widens the interval instead of moving the verdict. Rounds go on until the
interval excludes 1.0 or ``max_rounds`` is reached; an interval still on 1.0 counts as "not
faster", so noise can only ever make quantize keep float, never ship a slower model. ``runs`` is
sized from one probe run so a round lasts about :data:`ROUND_SECONDS` (at least
:data:`MIN_RUNS` runs: a median of fewer is itself noisy).

Only a target that is this host is timed here; another ISA's model is not (the summary says so).
A target profile with ``remote = ssh://...`` is timed on its device instead, with the same
protocol (:func:`edgecomp.remote.measure.compare_on_device`: the device runs the rounds, sized
there, and the host reads them with the same stopping rule) and the same decision.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import onnx_ir as ir

from edgecomp.runtime import make_session, run_feed

__all__ = ["MAX_ROUNDS", "MAX_RUNS", "MIN_ROUNDS", "MIN_RUNS", "ROUND_SECONDS", "SpeedCheck", "check_written_model",
           "time_against_input"]

ROUND_SECONDS = 0.2  # both models, one round
MIN_RUNS, MAX_RUNS = 9, 200
MIN_ROUNDS, MAX_ROUNDS = 4, 12


@dataclasses.dataclass
class SpeedCheck:
    """The written model's latency over its input's on this host, and what quantize did about it."""

    estimate: Any  # edgecomp.measure.bench.RatioEstimate
    families: str  # "auto", "all" or the forced list
    family_evidence: str = ""  # the in-command family timing of the chosen combination, if any
    where: str = "this host"  # or the device it was timed on (its ssh:// address)

    @property
    def faster(self) -> bool:
        """Faster than the input beyond noise: the whole 95% interval lies below 1.0."""
        return self.estimate.high < 1.0

    @property
    def falls_back(self) -> bool:
        """families auto and not faster: the float model as given is written instead."""
        return self.families == "auto" and not self.faster

    @property
    def forced_not_faster(self) -> bool:
        """Forced families and not faster: the int8 model is kept, the exit status is 5."""
        return self.families != "auto" and not self.faster

    def decision(self) -> str:
        if self.faster:
            return f"int8 kept: the written model is faster than float beyond noise on {self.where}"
        if self.falls_back:
            return f"float written: the int8 model was not faster than float beyond noise on {self.where}"
        return f"int8 kept (families {self.families} forced) although not faster than float on {self.where}: exit 5"

    def warning(self) -> str | None:
        if self.faster:
            return None
        whole = f"the written int8 model runs {self.estimate.ratio:.2f}x the float model's latency on {self.where} " \
                f"({self.estimate.text()}, 95% interval not below 1)"
        if self.falls_back:
            chosen = f"; the family timing had {self.family_evidence}" if self.family_evidence else ""
            return f"{whole}{chosen}: wrote the float model as given (never slower than the input)"
        return (f"{whole}: families {self.families} were forced, so the int8 model is written; exit status 5 "
                "(families auto falls back to float where int8 does not pay)")

    def summary(self) -> dict[str, Any]:
        return {f"latency vs float ({self.where})": self.estimate.text(), "latency decision": self.decision()}


def check_written_model(given: ir.Model, written: ir.Model, feed, threads: int, families: str,
                        family_evidence: str = "", device=None) -> SpeedCheck:
    """:func:`time_against_input` (on ``device``, an :class:`edgecomp.remote.device.Device`, when
    given), with what quantize does about the result."""
    where = device.transport.address if device is not None else "this host"
    return SpeedCheck(time_against_input(given, written, feed, threads, device=device), families, family_evidence,
                      where)


def time_against_input(given: ir.Model, written: ir.Model, feed, threads: int, device=None):
    """``written``'s latency over ``given``'s (the float model as the user gave it) on ``feed``,
    interleaved, in rounds until the ratio's 95% interval excludes 1.0 or :data:`MAX_ROUNDS`
    (a :class:`edgecomp.measure.bench.RatioEstimate`); on ``device`` when given."""
    labels = ["float as given", "written int8"]
    if device is not None:
        from edgecomp.remote.measure import compare_on_device

        return compare_on_device(device, [given, written], feed, threads=threads, round_seconds=ROUND_SECONDS,
                                 min_rounds=MIN_ROUNDS, max_rounds=MAX_ROUNDS, min_runs=MIN_RUNS, max_runs=MAX_RUNS,
                                 labels=labels)[0]
    from edgecomp.measure import bench  # looked up at call time: tests inject a fake clock there

    probe = make_session(given, threads=threads)
    run_feed(probe, feed)  # the first run pays allocations
    t0 = time.perf_counter()
    run_feed(probe, feed)
    one = max(time.perf_counter() - t0, 1e-5)
    del probe
    runs = int(np.clip(ROUND_SECONDS / (2 * one), MIN_RUNS, MAX_RUNS))
    return bench.compare_latency([given, written], feed, threads=threads, runs_per_round=runs, min_rounds=MIN_ROUNDS,
                                 max_rounds=MAX_ROUNDS, labels=labels)[0]
