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


def test_a_profile_with_a_mobile_ep_takes_the_qdq_form(tmp_path):
    assert BUILTIN_PROFILES["arm-phone-nnapi"].quant_format == "qdq"
    assert BUILTIN_PROFILES["x86-avx2-2core"].quant_format == "contrib"
    f = tmp_path / "t.toml"
    f.write_text('[profile.pixel]\nthreads = 4\nep = "XNNPACK"\n[profile.pixel.isa]\narch = "aarch64"\narm_dot = true\n')
    assert load_profiles(f)["pixel"].ep == "XNNPACK" and load_profiles(f)["pixel"].quant_format == "qdq"
    f.write_text('[profile.pixel]\nep = "TensorRT"\n')
    with pytest.raises(ConfigError, match=r"profile 'pixel': ep must be one of XNNPACK, NNAPI, CoreML, QNN"):
        load_profiles(f)


def test_quantize_for_a_mobile_ep_target_writes_standard_ops_only(tmp_path, mlp_path, mlp_data):
    import onnx
    from click.testing import CliRunner

    from edgecomp.cli import cli

    calib, _ = mlp_data
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(cli, ["quantize", str(mlp_path), "-o", str(out), "--calibration", str(calib),
                                   "--target", "arm-phone-nnapi", "--families", "all"])
    assert res.exit_code == 0, res.output
    ops = {(n.domain or "ai.onnx", n.op_type) for n in onnx.load(str(out)).graph.node}
    assert ("ai.onnx", "DequantizeLinear") in ops and {d for d, _ in ops} == {"ai.onnx"}, ops
    # NNAPI runs a layer in int8 only as a whole DQ -> op -> Q unit: the target turns node units on
    quantize_ops = [n for n in onnx.load(str(out)).graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize_ops) >= 3  # the input and both layers' outputs (without node units: 2, one per input)
    bad = CliRunner().invoke(cli, ["quantize", str(mlp_path), "-o", str(tmp_path / "c.onnx"), "--calibration",
                                   str(calib), "--target", "arm-phone-nnapi", "--format", "contrib"])
    assert bad.exit_code == 1 and "runs on the NNAPI EP" in bad.output and not (tmp_path / "c.onnx").exists()
