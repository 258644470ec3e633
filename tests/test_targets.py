import pytest

from edgecomp.errors import ConfigError
from edgecomp.render.text import host_line
from edgecomp.targets import BUILTIN_PROFILES, Isa, get_profile, host_isa, load_profiles


def test_user_profiles_extend_builtins(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('[profile.myboard]\ndescription = "my board"\nthreads = 3\npin = "0"\n'
                 '[profile.myboard.isa]\narch = "aarch64"\narm_dot = true\n')
    profiles = load_profiles(f)
    assert set(BUILTIN_PROFILES) < set(profiles)
    p = profiles["myboard"]
    assert (p.threads, p.pin, p.isa) == (3, "0", Isa("aarch64", arm_dot=True))


def test_profile_isa_mismatch_is_stated():
    host = host_isa()
    other = Isa("aarch64", arm_dot=True) if host.arch == "x86_64" else Isa("x86_64", avx2=True)
    profile = next(p for p in BUILTIN_PROFILES.values() if p.isa == other)
    assert "DIFFERS from the host" in host_line(profile, host)


def test_unknown_target_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="choose one of"):
        get_profile("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[profile.x\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_profiles(bad)


def test_u8s8_saturation_rule():
    assert Isa("x86_64", avx2=True).u8s8_saturates
    assert not Isa("x86_64", avx2=True, avx512=True, vnni=True).u8s8_saturates
    assert not Isa("aarch64", arm_dot=True).u8s8_saturates


def test_profile_values_of_the_wrong_type(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('[profile.board]\nthreads = "four"\n')
    with pytest.raises(ConfigError, match="threads must be an integer"):
        load_profiles(f)
    f.write_text("profile = 3\n")
    with pytest.raises(ConfigError, match="profiles are tables"):
        load_profiles(f)
