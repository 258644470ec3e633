"""The qemu-user CPU models an emulated target may name, and the fake ``/proc/cpuinfo`` each gets.

onnxruntime's aarch64 build reads ``/proc/cpuinfo`` on import (through the cpuinfo library) to
learn each core's MIDR; under qemu-user the guest would read the host's x86 file and segfault.
qemu resolves absolute paths inside its ``-L`` root first, so every CPU gets a root whose
``proc/cpuinfo`` describes that core (its MIDR and feature list). The kernels themselves are
chosen from the HWCAP bits qemu gives the guest for its ``-cpu`` model, so the file only has to
be plausible and consistent with it.

A spec is ``MODEL[,prop=on|off...]`` as qemu takes it (``max,sve=off``). SME is on for ``max``
unless ``sme=off`` (or ``sve=off``, which qemu 7.2 needs for SME): onnxruntime then routes int8
GEMMs through KleidiAI's SME kernels, whose emulation by qemu 7.2 gave wrong results.
"""

from __future__ import annotations

import dataclasses
import re

from edgecomp.errors import ConfigError

__all__ = ["CpuModel", "CPU_MODELS", "parse_cpu", "has_sme", "cpuinfo_text"]

_BASE = "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"
_V82 = _BASE + " atomics fphp asimdhp asimdrdm lrcpc dcpop"


@dataclasses.dataclass(frozen=True)
class CpuModel:
    implementer: int
    variant: int
    part: int
    revision: int
    features: str


#: qemu 7.2's aarch64 ``-cpu`` models with the MIDR of the real core (``max`` is qemu's own: 'Q').
CPU_MODELS: dict[str, CpuModel] = {
    "cortex-a53": CpuModel(0x41, 0x0, 0xD03, 4, _BASE),
    "cortex-a55": CpuModel(0x41, 0x1, 0xD05, 0, _V82 + " asimddp"),
    "cortex-a57": CpuModel(0x41, 0x1, 0xD07, 1, _BASE),
    "cortex-a72": CpuModel(0x41, 0x0, 0xD08, 3, _BASE),
    "cortex-a76": CpuModel(0x41, 0x4, 0xD0B, 1, _V82 + " asimddp"),
    "neoverse-n1": CpuModel(0x41, 0x4, 0xD0C, 1, _V82 + " asimddp"),
    "a64fx": CpuModel(0x46, 0x1, 0x001, 0, _V82 + " fcma sve"),
    "max": CpuModel(0x00, 0x0, 0x051, 0, _V82 + " asimddp sha3 sm3 sm4 sha512 asimdfhm jscvt fcma ilrcpc flagm "
                                          "sve svei8mm svebf16 i8mm bf16 sve2 sme"),
}
_PROP = re.compile(r"[a-z0-9-]+=(on|off)")


def parse_cpu(spec: str) -> tuple[str, dict[str, bool]]:
    """(model, {property: on}) of a ``-cpu`` spec; one-line ConfigError when qemu would not take it."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"emulate must name a qemu CPU such as cortex-a76 or \"max,sve=off\", got {spec!r}")
    model, *props = [p.strip() for p in spec.split(",")]
    if model not in CPU_MODELS:
        raise ConfigError(f"emulate = {spec!r}: unknown qemu CPU {model!r}; choose one of {', '.join(CPU_MODELS)}")
    bad = [p for p in props if not _PROP.fullmatch(p)]
    if bad:
        raise ConfigError(f"emulate = {spec!r}: CPU properties are NAME=on or NAME=off, got {', '.join(bad)}")
    return model, {k: v == "on" for k, v in (p.split("=") for p in props)}


def has_sme(spec: str) -> bool:
    model, props = parse_cpu(spec)
    return model == "max" and props.get("sme", True) and props.get("sve", True)


def cpuinfo_text(spec: str, processors: int) -> str:
    """A ``/proc/cpuinfo`` for ``processors`` cores of the CPU ``spec``."""
    model, props = parse_cpu(spec)
    m = CPU_MODELS[model]
    off = {k for k, on in props.items() if not on}
    if "sve" in off:
        off |= {"sve2", "svei8mm", "svebf16", "sme"}
    features = " ".join(f for f in m.features.split() if f not in off)
    block = (f"BogoMIPS\t: 50.00\nFeatures\t: {features}\nCPU implementer\t: {m.implementer:#04x}\n"
             f"CPU architecture: 8\nCPU variant\t: {m.variant:#x}\nCPU part\t: {m.part:#05x}\n"
             f"CPU revision\t: {m.revision}\n\n")
    return "".join(f"processor\t: {i}\n{block}" for i in range(max(1, processors)))
