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
import re
from pathlib import Path

from edgecomp.errors import ConfigError

__all__ = ["Isa", "TargetProfile", "BUILTIN_PROFILES", "ARCHES", "MOBILE_EPS", "host_isa", "load_profiles", "get_profile"]


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
    ep: str | None = None  # a mobile execution provider (MOBILE_EPS) that runs the model; None: the CPU EP
    emulate: str | None = None  # a qemu-user -cpu model whose numerics stand for this target (edgecomp.emulate)
    kleidiai: bool = True  # False: emulated runs set mlas.disable_kleidiai=1 (set the same session config on the device)
    remote: str | None = None  # ssh://user@host[:port]: bench/validate/convert measure on that device (edgecomp.remote)
    python: str | None = None  # the device's python command for the runner (default python3)
    ssh_config: str | None = None  # an ssh config file (ssh -F) for the device (default: the user's)

    @property
    def quant_format(self) -> str:
        """The int8 form this target runs: QDQ for a mobile EP (it has no com.microsoft kernels)."""
        return "qdq" if self.ep else "contrib"

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
                      Isa("aarch64", arm_dot=True), emulate="cortex-a76"),
        TargetProfile("arm-board-4core", "Raspberry-Pi-class 4-core ARMv8 board without dot-product", 4,
                      Isa("aarch64"), emulate="cortex-a53"),
        TargetProfile("arm-phone-nnapi", "ARMv8.2 Android phone running the model on onnxruntime's NNAPI EP "
                      "(int8 in QDQ form)", 4, Isa("aarch64", arm_dot=True), ep="NNAPI"),
        # Emulated targets (qemu-user running onnxruntime's aarch64 build): numerics, never latency.
        TargetProfile("arm64-neon", "ARMv8.0 core, NEON only (emulated Cortex-A53)", 1, Isa("aarch64"),
                      emulate="cortex-a53"),
        TargetProfile("arm64-dotprod", "ARMv8.2 core with dot-product (emulated Cortex-A76)", 1,
                      Isa("aarch64", arm_dot=True), emulate="cortex-a76"),
        TargetProfile("arm64-i8mm", "ARMv8.6 core with i8mm, no SVE (emulated qemu max,sve=off)", 1,
                      Isa("aarch64", arm_dot=True), emulate="max,sve=off"),
        TargetProfile("arm64-sve", "ARMv8.2 core with SVE (emulated A64FX)", 1, Isa("aarch64"), emulate="a64fx"),
        TargetProfile("arm64-sme", "ARMv9 core with SVE2 and SME, KleidiAI kernels (emulated qemu max)", 1,
                      Isa("aarch64", arm_dot=True), emulate="max"),
        TargetProfile("arm64-sme-nokleidiai", "ARMv9 core with SME, KleidiAI off (mlas.disable_kleidiai=1)", 1,
                      Isa("aarch64", arm_dot=True), emulate="max", kleidiai=False),
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


#: Architectures whose int8 kernel choice this module understands (see :class:`Isa`).
ARCHES = ("x86_64", "aarch64")
_ISA_FLAGS = {"avx2": "x86_64", "avx512": "x86_64", "vnni": "x86_64", "arm_dot": "aarch64"}
_PROFILE_KEYS = ("description", "threads", "pin", "isa", "ep", "emulate", "kleidiai", "remote", "python", "ssh_config")
#: Execution providers a profile may name: they take standard QDQ int8, not onnxruntime's contrib ops.
MOBILE_EPS = ("XNNPACK", "NNAPI", "CoreML", "QNN")
_PIN = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


def load_profiles(path: str | os.PathLike | None = None) -> dict[str, TargetProfile]:
    """Built-in profiles plus those in a user TOML file (``[profile.NAME]`` tables).

    Every value is checked here, so a bad file fails with one line naming the file, the profile
    and the key before anything is measured.
    """
    profiles = dict(BUILTIN_PROFILES)
    if path is None:
        return profiles
    p = Path(path)
    from edgecomp.paths import read_toml

    doc = read_toml(p, "target profile file")
    shape = "profiles are tables: [profile.NAME] with threads, pin, description, [profile.NAME.isa]"
    extra = sorted(set(doc) - {"profile", "measured"})  # measured: tables of `targets measure` (quantize.measured)
    if extra:
        raise ConfigError(f"{p}: unknown top-level key(s) {extra}; {shape}")
    profiles_doc = doc.get("profile", {})
    if not isinstance(profiles_doc, dict) or not all(isinstance(t, dict) for t in profiles_doc.values()):
        raise ConfigError(f"{p}: {shape}")
    for name, t in profiles_doc.items():
        profiles[name] = _parse_profile(p, name, t)
    return profiles


def _parse_profile(p: Path, name: str, t: dict) -> TargetProfile:
    where = f"{p}: profile {name!r}"
    unknown = sorted(set(t) - set(_PROFILE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(_PROFILE_KEYS)}")
    description = t.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{where}: description must be a string, got {description!r}")
    threads = t.get("threads", 1)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError(f"{where}: threads must be an integer >= 1, got {threads!r}")
    pin = t.get("pin")
    if isinstance(pin, int) and not isinstance(pin, bool) and pin >= 0:
        pin = str(pin)
    if pin is not None and not (isinstance(pin, str) and _valid_pin(pin)):
        raise ConfigError(f"{where}: pin must be a CPU list like \"0\", \"0-3\" or \"0,2\", got {pin!r}")
    ep = t.get("ep")
    if ep is not None and ep not in MOBILE_EPS:
        raise ConfigError(f"{where}: ep must be one of {', '.join(MOBILE_EPS)} (leave it out for the CPU EP), "
                          f"got {ep!r}")
    isa = t.get("isa", {})
    if isinstance(isa, str) and isa in BUILTIN_PROFILES:  # isa = "arm64-dotprod": that built-in profile's ISA
        isa = {k: v for k, v in dataclasses.asdict(BUILTIN_PROFILES[isa].isa).items() if v}
    if not isinstance(isa, dict):
        raise ConfigError(f"{where}: isa must be a table ([profile.{name}.isa] with arch and feature flags) or "
                          f"a built-in profile's name, got {isa!r}")
    unknown = sorted(set(isa) - {"arch", *_ISA_FLAGS})
    if unknown:
        raise ConfigError(f"{where} has unknown isa keys {unknown}; valid: arch, {', '.join(_ISA_FLAGS)}")
    arch = isa.get("arch", "x86_64")
    if arch not in ARCHES:
        raise ConfigError(f"{where}: isa.arch must be one of {', '.join(ARCHES)}, got {arch!r}")
    for flag, flag_arch in _ISA_FLAGS.items():
        value = isa.get(flag, False)
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: isa.{flag} must be true or false, got {value!r}")
        if value and arch != flag_arch:
            raise ConfigError(f"{where}: isa.{flag} is an {flag_arch} feature, but isa.arch is {arch}")
    emulate, kleidiai = t.get("emulate"), t.get("kleidiai", True)
    if emulate is not None:
        from edgecomp.emulate.cpus import parse_cpu

        try:
            parse_cpu(emulate)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        if arch != "aarch64":
            raise ConfigError(f"{where}: emulate runs an aarch64 CPU, but isa.arch is {arch}; add isa.arch = \"aarch64\"")
    if not isinstance(kleidiai, bool):
        raise ConfigError(f"{where}: kleidiai must be true or false, got {kleidiai!r}")
    remote, python, ssh_config = _remote_keys(where, t)
    return TargetProfile(name=name, description=description, threads=threads, isa=Isa(**{**isa, "arch": arch}),
                         pin=pin, ep=ep, emulate=emulate, kleidiai=kleidiai, remote=remote, python=python,
                         ssh_config=ssh_config)


def _remote_keys(where: str, t: dict) -> tuple[str | None, str | None, str | None]:
    """remote (a device address, checked by :func:`edgecomp.remote.parse_address`), python, ssh_config."""
    from edgecomp.errors import RemoteError
    from edgecomp.remote.transport import parse_address

    remote, python, ssh_config = t.get("remote"), t.get("python"), t.get("ssh_config")
    for key, value in (("remote", remote), ("python", python), ("ssh_config", ssh_config)):
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise ConfigError(f"{where}: {key} must be a non-empty string, got {value!r}")
    if remote is not None:
        try:
            parse_address(remote)
        except RemoteError as e:
            raise ConfigError(f"{where}: remote {e}") from None
    if (python or ssh_config) and remote is None:
        raise ConfigError(f"{where}: python and ssh_config apply to a device; add remote = \"ssh://user@host\"")
    return remote, python, ssh_config


def _valid_pin(spec: str) -> bool:
    if not _PIN.fullmatch(spec.replace(" ", "")):
        return False
    for part in spec.replace(" ", "").split(","):
        lo, _, hi = part.partition("-")
        if hi and int(hi) < int(lo):
            return False
    return True


def get_profile(name: str | None, path: str | os.PathLike | None = None) -> TargetProfile | None:
    """The profile ``name`` (None when no target is named), after checking the whole targets file
    when one is given: a bad ``--targets-file`` is refused even when no profile from it is used."""
    profiles = load_profiles(path)
    if name is None:
        return None
    if name not in profiles:
        raise ConfigError(f"unknown target {name!r}; choose one of {', '.join(sorted(profiles))}")
    return profiles[name]
