"""Numerics on the target: onnxruntime's own aarch64 build run under qemu-user on an x86 host.

- :mod:`edgecomp.emulate.setup` prepares and finds the cached runtime (``edgecomp targets setup arm64``);
- :mod:`edgecomp.emulate.cpus` the qemu CPU models and the fake ``/proc/cpuinfo`` each needs;
- :mod:`edgecomp.emulate.runner` runs a model on feeds in the emulated onnxruntime (host side);
- :mod:`edgecomp.emulate.guest` is the script the emulated CPython runs (onnxruntime + numpy only);
- :mod:`edgecomp.emulate.numerics` compares a candidate on the target with the host's reference.
"""

from typing import TYPE_CHECKING

from edgecomp.lazy import lazy_exports

if TYPE_CHECKING:
    from edgecomp.emulate.runner import (LATENCY_NOTE, Emulation, EmulatedRun, EmulatedRunner, TargetRunner,
                                         self_check, target_runner)
    from edgecomp.emulate.setup import Runtime, default_cache_dir, load_runtime, prepare

__all__ = ["Emulation", "EmulatedRun", "EmulatedRunner", "LATENCY_NOTE", "Runtime", "TargetRunner", "default_cache_dir",
           "load_runtime", "prepare", "self_check", "target_runner"]

# light, so the CLI's emulation flags (edgecomp.emulate.limits) import no runner
__getattr__, __dir__ = lazy_exports(__name__, {
    "runner": ["Emulation", "EmulatedRun", "EmulatedRunner", "LATENCY_NOTE", "TargetRunner", "self_check", "target_runner"],
    "setup": ["Runtime", "default_cache_dir", "load_runtime", "prepare"]})
