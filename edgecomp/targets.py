"""Target CPU profiles and the host's instruction set.

A profile fixes how latency is measured for a class of device (threads, pinning) and names the
ISA that class has. The host's ISA is detected from ``/proc/cpuinfo`` (or the platform) and stated
in every report; when a profile's ISA differs from the host, reports say so instead of quietly
presenting host numbers as the device's.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import tomllib
from pathlib import Path

from edgecomp.errors import ConfigError, InputFileError

__all__ = ["Isa", "TargetProfile", "BUILTIN_PROFILES", "host_isa", "load_profiles", "get_profile"]


@dataclasses.dataclass(frozen=True)
class Isa:
    """The instruction-set features that decide int8 kernel choice."""

    arch: str
    avx2: bool = False
    avx512: bool = False
    vnni: bool = False  # AVX512-VNNI or AVX-VNNI: int8 dot products without int16 saturation
    arm_dot: bool = False  # ARM sdot/udot

    def describe(self) -> str:
        feats = [n for n, on in (("AVX2", self.avx2), ("AVX-512", self.avx512), ("VNNI", self.vnni),
                                 ("ARM-dotprod", self.arm_dot)) if on]
        return f"{self.arch} ({', '.join(feats) or 'no SIMD int8 extensions detected'})"

    @property
    def u8s8_saturates(self) -> bool:
        """x86 without VNNI multiplies u8*s8 with VPMADDUBSW, whose int16 pair sums can saturate."""
        return self.arch == "x86_64" and not self.vnni


@dataclasses.dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    threads: int
    isa: Isa
    pin: str | None = None

    def matches_host(self, host: Isa | None = None) -> bool:
        return self.isa == (host or host_isa())


BUILTIN_PROFILES: dict[str, TargetProfile] = {
    p.name: p
    for p in (
        TargetProfile("x86-avx2-2core", "2-core x86-64 box with AVX2, no VNNI (this CI machine's kind)", 2,
                      Isa("x86_64", avx2=True)),
        TargetProfile("x86-avx2-1thread", "one core of an AVX2 x86-64 CPU", 1, Isa("x86_64", avx2=True)),
        TargetProfile("x86-vnni-4core", "4-core x86-64 server with AVX-512 VNNI", 4,
                      Isa("x86_64", avx2=True, avx512=True, vnni=True)),
        TargetProfile("arm-phone-4core", "4 big cores of an ARMv8.2 phone SoC with dot-product", 4,
                      Isa("aarch64", arm_dot=True)),
        TargetProfile("arm-board-4core", "Raspberry-Pi-class 4-core ARMv8 board without dot-product", 4,
                      Isa("aarch64")),
    )
}


def host_isa() -> Isa:
    """Detect the host CPU's int8-relevant features."""
    arch = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return Isa(
        arch=arch,
        avx2="avx2" in flags,
        avx512="avx512f" in flags,
        vnni=bool({"avx512_vnni", "avx_vnni"} & flags),
        arm_dot="asimddp" in flags,
    )


def load_profiles(path: str | os.PathLike | None = None) -> dict[str, TargetProfile]:
    """Built-in profiles plus those in a user TOML file (``[profile.NAME]`` tables)."""
    profiles = dict(BUILTIN_PROFILES)
    if path is None:
        return profiles
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"target profile file not found: {p}")
    try:
        doc = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p} is not valid TOML: {e}") from e
    profiles_doc = doc.get("profile", {})
    if not isinstance(profiles_doc, dict) or not all(isinstance(t, dict) for t in profiles_doc.values()):
        raise ConfigError(f"{p}: profiles are tables: [profile.NAME] with threads, pin, description, [profile.NAME.isa]")
    for name, t in profiles_doc.items():
        isa = t.get("isa", {})
        if not isinstance(t.get("threads", 1), int) or not isinstance(isa, dict):
            raise ConfigError(f"{p}: profile {name!r}: threads must be an integer and isa a table")
        unknown = set(isa) - {"arch", "avx2", "avx512", "vnni", "arm_dot"}
        if unknown:
            raise ConfigError(f"{p}: profile {name!r} has unknown isa keys {sorted(unknown)}")
        profiles[name] = TargetProfile(
            name=name, description=t.get("description", ""), threads=int(t.get("threads", 1)),
            isa=Isa(**{"arch": "x86_64", **isa}), pin=t.get("pin"),
        )
    return profiles


def get_profile(name: str, path: str | os.PathLike | None = None) -> TargetProfile:
    profiles = load_profiles(path)
    if name not in profiles:
        raise ConfigError(f"unknown target {name!r}; choose one of {', '.join(sorted(profiles))}")
    return profiles[name]
