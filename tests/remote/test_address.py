"""Device addresses and the profile keys that carry them: checked before anything connects."""

from __future__ import annotations

import pytest

from edgecomp.errors import ConfigError, RemoteError
from edgecomp.remote.transport import SshTransport, parse_address
from edgecomp.targets import load_profiles


@pytest.mark.parametrize("address, host, user, port", [
    ("ssh://pi@pi5.local", "pi5.local", "pi", None),
    ("ssh://pi@pi5.local:2222", "pi5.local", "pi", 2222),
    ("ssh://board", "board", None, None),
    ("ssh://root@[::1]:22", "::1", "root", 22),
])
def test_ssh_addresses(address, host, user, port):
    t = parse_address(address)
    assert isinstance(t, SshTransport) and (t.host, t.user, t.port) == (host, user, port)
    assert t.address == address
    opts = t._ssh("true")
    assert "BatchMode=yes" in opts and not any("StrictHostKeyChecking" in o for o in opts)


@pytest.mark.parametrize("address, words", [
    ("pi@pi5.local", "ssh://user@host"), ("ssh://pi@host:99999", "ssh://user@host"), ("http://x", "ssh://user@host"),
    ("adb://R58M123", "adb targets are not supported"),
])
def test_bad_addresses_are_one_line(address, words):
    with pytest.raises(RemoteError) as e:
        parse_address(address)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_profile_remote_keys(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('[profile.pi5]\nremote = "ssh://pi@pi5.local"\nisa = "arm64-dotprod"\nthreads = 4\n')
    p = load_profiles(f)["pi5"]
    assert p.remote == "ssh://pi@pi5.local" and p.threads == 4 and p.isa.arch == "aarch64" and p.isa.arm_dot
    assert p.python is None and p.emulate is None


@pytest.mark.parametrize("body, words", [
    ('remote = "pi5.local"', "remote"), ("remote = 3", "remote must be a non-empty string"),
    ('python = "/usr/bin/python3"', "add remote"), ('isa = "no-such-profile"', "built-in profile"),
])
def test_profile_remote_errors(tmp_path, body, words):
    f = tmp_path / "t.toml"
    f.write_text(f"[profile.x]\n{body}\n")
    with pytest.raises(ConfigError) as e:
        load_profiles(f)
    assert words in str(e.value) and "profile 'x'" in str(e.value) and "\n" not in str(e.value)
