"""Config the user writes (targets files, recipes, sweep addresses, quantize --exclude) is checked
up front: every bad value is one line naming the file, the place and the key, before any work."""

from __future__ import annotations

import math
import re
import socket
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgecomp.cli import cli
from edgecomp.data import DEFAULT_MAX_SAMPLES
from edgecomp.errors import ConfigError, EdgecompError, InputFileError
from edgecomp.pipeline.recipe import STEP_OPTIONS, apply_override, load_recipe, parse_recipe
from edgecomp.targets import Isa, load_profiles

SPEC = "import torch\n\n\ndef make():\n    return torch.nn.Linear(4, 2), (torch.randn(1, 4),)\n"


def _one_error_line(res) -> str:
    """The single line a failed command printed; it must be an `Error:` line without a traceback."""
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), lines
    return lines[0]


# --- targets files --------------------------------------------------------------------------------

PROFILE = "[profile.board]\n"


@pytest.mark.parametrize("body, pattern", [
    ("threads = 0\n", r"profile 'board': threads must be an integer >= 1, got 0"),
    ("threads = -2\n", r"threads must be an integer >= 1, got -2"),
    ("threads = 1.5\n", r"threads must be an integer >= 1, got 1.5"),
    ("threads = true\n", r"threads must be an integer >= 1, got True"),
    ("cores = 4\n", r"profile 'board': unknown key\(s\) \['cores'\]; valid keys: description, threads, pin, isa"),
    ("description = 3\n", r"description must be a string"),
    ("pin = \"0-\"\n", r"pin must be a CPU list like"),
    ("pin = \"a\"\n", r"pin must be a CPU list like"),
    ("pin = \"3-1\"\n", r"pin must be a CPU list like"),
    ("pin = \"\"\n", r"pin must be a CPU list like"),
    ("pin = [0, 1]\n", r"pin must be a CPU list like"),
    ("isa = 3\n", r"isa must be a table"),
    ("[profile.board.isa]\narch = \"sparc64\"\n", r"profile 'board': isa.arch must be one of x86_64, aarch64, got 'sparc64'"),
    ("[profile.board.isa]\navx2 = \"yes\"\n", r"isa.avx2 must be true or false, got 'yes'"),
    ("[profile.board.isa]\narch = \"aarch64\"\navx2 = true\n", r"isa.avx2 is an x86_64 feature, but isa.arch is aarch64"),
    ("[profile.board.isa]\narm_dot = true\n", r"isa.arm_dot is an aarch64 feature"),
    ("[profile.board.isa]\nsse = true\n", r"unknown isa keys \['sse'\]"),
])
def test_bad_profile_values_name_file_profile_and_key(tmp_path, body, pattern):
    f = tmp_path / "devices.toml"
    f.write_text(PROFILE + body)
    with pytest.raises(ConfigError, match=pattern) as e:
        load_profiles(f)
    assert str(e.value).startswith(f"{f}: ") and "\n" not in str(e.value)


def test_profile_top_level_tables_must_be_profiles(tmp_path):
    f = tmp_path / "devices.toml"
    f.write_text("[board]\nthreads = 2\n")
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) \['board'\]; profiles are tables: \[profile.NAME\]"):
        load_profiles(f)


def test_good_profile_values(tmp_path):
    f = tmp_path / "devices.toml"
    f.write_text('[profile.a]\nthreads = 2\npin = 0\n[profile.b]\npin = "0-3"\n[profile.c]\npin = "0,2"\n'
                 '[profile.c.isa]\narch = "x86_64"\navx2 = true\nvnni = true\n')
    p = load_profiles(f)
    assert (p["a"].pin, p["a"].threads, p["b"].pin, p["c"].pin) == ("0", 2, "0-3", "0,2")
    assert p["c"].isa == Isa("x86_64", avx2=True, vnni=True)


def _unreadable(monkeypatch, path: Path) -> None:
    real = Path.read_bytes

    def read_bytes(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)  # chmod 000 does not stop root


@pytest.mark.parametrize("kind", ["binary", "directory", "unreadable", "missing"])
def test_unusable_files_get_one_line(tmp_path, monkeypatch, kind):
    for load, what in ((load_profiles, "target profile file"), (load_recipe, "recipe")):
        f = tmp_path / f"{load.__name__}.toml"
        if kind == "binary":
            f.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00garbage")
        elif kind == "directory":
            f.mkdir()
        elif kind == "unreadable":
            f.write_text('[[steps]]\nstep = "export"\n')
            _unreadable(monkeypatch, f)
        with pytest.raises(EdgecompError) as e:
            load(f)
        msg = str(e.value)
        assert str(f) in msg and "\n" not in msg
        assert {"binary": "not a UTF-8 text file", "directory": "is a directory", "unreadable": "cannot read",
                "missing": "not found" if load is load_profiles else "neither a file"}[kind] in msg


# --- recipe values --------------------------------------------------------------------------------

BAD_STEPS = [
    ("prune", "sparsity", 7.5, r"sparsity must be in \(0, 1\), got 7.5"),
    ("prune", "sparsity", 0, r"sparsity must be in \(0, 1\), got 0.0"),
    ("prune", "importance", "random", r"importance must be one of auto, l1, l2, activation, obs, got 'random'"),
    ("prune", "scope", "local", r"scope must be one of auto, per-layer, global"),
    ("prune", "protect", ["(["], r"protect pattern '\(\[' is not a valid regular expression"),
    ("prune", "kinds", [], r"kinds must be a non-empty list of channels, heads"),
    ("prune", "kinds", ["rows"], r"kinds must be a non-empty list"),
    ("prune", "round_to", -1, r"round_to must be >= 0, got -1"),
    ("quantize", "tolerance", math.nan, r"tolerance must be a finite number, got nan"),
    ("quantize", "tolerance", math.inf, r"tolerance must be a finite number, got inf"),
    ("quantize", "method", "kl", r"method must be one of minmax, percentile, entropy, mse, got 'kl'"),
    ("quantize", "percentile", 100, r"percentile must be in \(50, 100\), got 100.0"),
    ("quantize", "percentile", 0.5, r"percentile must be in \(50, 100\)"),
    ("quantize", "weight_bits", 6, r"weight_bits must be one of auto, 7, 8, got 6"),
    ("quantize", "smooth", 1.5, r"smooth must be auto, off, or an alpha in \(0, 1\), got 1.5"),
    ("quantize", "smooth", "sometimes", r"smooth must be auto, off, or an alpha"),
    ("quantize", "bias_correction", "yes", r"bias_correction must be one of auto, on, off"),
    ("quantize", "families", "matmul,gemm", r"families must be auto, all, or a comma list of matmul, conv"),
    ("quantize", "exclude", ["(["], r"exclude pattern '\(\[' is not a valid regular expression"),
    ("quantize", "exclude", [3], r"exclude pattern 3 is not a string"),
    ("quantize", "metric", "f1", r"metric must be one of cosine, top1, mae"),
    ("quantize", "max_samples", -5, r"max_samples must be >= 1"),
    ("export", "exporter", "onnx", r"exporter must be one of auto, dynamo, torchscript, got 'onnx'"),
    ("export", "opset", 3, r"opset 3 is outside 7\.\.23 that torch .*ONNX exporters support"),
    ("export", "opset", 1000, r"opset 1000 is outside 7\.\.23"),
    ("export", "atol", 0, r"atol must be > 0, got 0.0"),
    ("export", "atol", -1e-3, r"atol must be > 0"),
    ("export", "hf_output", "pooled", r"hf_output must be one of embeddings, hidden"),
    ("export", "dynamic", {"x": {"batch": "b"}}, r"dynamic must map input names to \{axis = 'label'\} tables"),
    ("export", "dynamic", {"x": "batch"}, r"dynamic must map input names"),
    ("export", "input", {"x": "1xq"}, r"input x: bad shape '1xq'"),
    ("optimize", "fusions", "gpt2", r"fusions must be one of none, bert"),
    ("distill", "lr", 0, r"lr must be > 0, got 0.0"),
    ("distill", "held_out", 1.0, r"held_out must be in \[0, 1\), got 1.0"),
    ("distill", "batch_size", 0, r"batch_size must be >= 1, got 0"),
    ("distill", "epochs", 0, r"epochs must be >= 1"),
    ("distill", "temperature", -1, r"temperature must be > 0"),
    ("distill", "patience", 0, r"patience must be >= 1"),
    ("distill", "seed", -1, r"seed must be in \[0, 4294967295\]"),
    ("distill", "match", "l1", r"match must be one of cosine, mse"),
    ("distill", "shrink", "layers=0", r"shrink must be layers=N \(N >= 1"),
    ("distill", "shrink", "depth=2", r"shrink must be layers=N"),
    ("distill", "student", "no_colon", r"student must be a SPEC like package.module:factory"),
    ("distill", "student", "nowhere/student.py:make", r"student names the file nowhere/student.py, which does not exist"),
    ("reduce-embeddings", "bits", 3, r"bits must be one of 8, 4, got 3"),
    ("reduce-embeddings", "energy", 1.5, r"energy must be in \(0, 1\], got 1.5"),
    ("reduce-embeddings", "rank", -1, r"rank must be >= 1"),
    ("validate", "k", 0, r"k must be >= 1, got 0"),
    ("bench", "runs", 0, r"runs must be >= 1, got 0"),
    ("bench", "warmup", -1, r"warmup must be >= 0"),
    ("bench", "threads", -1, r"threads must be >= 1, got -1"),
    ("bench", "runs", True, r"runs: expected int, got a boolean"),
    ("bench", "runs", "many", r"runs: expected int, got 'many'"),
]


@pytest.mark.parametrize("step, key, value, pattern", BAD_STEPS, ids=[f"{s}.{k}={v!r}" for s, k, v, _ in BAD_STEPS])
def test_bad_step_values_are_refused_at_parse_time(step, key, value, pattern):
    doc = {"steps": [{"step": "export"}, {"step": step, key: value}]}
    if step == "export":
        doc["steps"] = [{"step": "export", key: value}]
    if step == "reduce-embeddings" and key != "bits":
        doc["steps"][1]["bits"] = 8
    index = 1 if step == "export" else 2
    with pytest.raises(ConfigError, match=rf"^recipe.toml: step {index} \({step}\): {pattern}") as e:
        parse_recipe(doc, source="recipe.toml")
    assert "\n" not in str(e.value)


def test_the_message_reads_like_the_file_step_and_value(tmp_path):
    f = tmp_path / "recipe.toml"
    f.write_text('[[steps]]\nstep = "export"\n[[steps]]\nstep = "prune"\nsparsity = 7.5\n')
    with pytest.raises(ConfigError) as e:
        load_recipe(f)
    assert str(e.value) == f"{f}: step 2 (prune): sparsity must be in (0, 1), got 7.5"


@pytest.mark.parametrize("step, pattern", [
    ({"step": "reduce-embeddings", "rank": 8, "energy": 0.9}, r"energy replaces rank; give one of them"),
    ({"step": "reduce-embeddings"}, r"nothing to do; set bits, rank, energy or prune_vocab"),
    ({"step": "distill"}, r"give shrink \(e.g. layers=3\) or student = SPEC or \.onnx file \(one of them\)"),
    ({"step": "distill", "shrink": "layers=2", "student": "m:f"}, r"give shrink .* \(one of them\)"),
])
def test_step_option_combinations(step, pattern):
    with pytest.raises(ConfigError, match=rf"step 2 \({step['step']}\): {pattern}"):
        parse_recipe({"steps": [{"step": "export"}, step]}, source="r.toml")


def test_defaults_pass_their_own_checks_and_unset_means_left_out():
    for step, options in STEP_OPTIONS.items():
        for name, opt in options.items():
            assert opt.problem(opt.default) is None, (step, name)
    r = parse_recipe({"steps": [{"step": "export"}, {"step": "distill", "shrink": "width=0.5"}, {"step": "quantize"},
                                {"step": "prune"}, {"step": "reduce-embeddings", "bits": 8}, {"step": "bench"}]})
    d, q, p, e, b = r.steps[1:]
    assert (q["tolerance"], d["max_steps"], d["student"], e["rank"], e["energy"], b["threads"]) == (None,) * 6
    assert q["max_samples"] == p["max_samples"] == DEFAULT_MAX_SAMPLES  # a bounded sample of DATA by default
    # the old placeholders for "unset" (-1, 0, "") are values now, refused like any other
    for step, key, value, msg in [("quantize", "tolerance", -1.0, "tolerance must be >= 0, got -1.0"),
                                  ("quantize", "max_samples", 0, "max_samples must be >= 1, got 0"),
                                  ("distill", "shrink", "", "shrink must be layers=N"),
                                  ("bench", "threads", 0, "threads must be >= 1, got 0")]:
        with pytest.raises(ConfigError, match=re.escape(msg)):
            parse_recipe({"steps": [{"step": "export"}, {"step": step, key: value}]})
    r = parse_recipe({"steps": [{"step": "export", "dynamic": {"x": {"0": "batch"}}, "input": {"x": "1x4:float32"}},
                                {"step": "quantize", "weight_bits": 7, "smooth": 0.5, "families": "matmul,conv"}]})
    assert r.steps[1]["weight_bits"] == 7


def test_choices_mirror_the_modules_that_use_them():
    from edgecomp.distill.options import MATCH_KINDS
    from edgecomp.distill.students import parse_shrink
    from edgecomp.errors import OptionError

    assert set(STEP_OPTIONS["distill"]["match"].choices) == set(MATCH_KINDS)
    check = STEP_OPTIONS["distill"]["shrink"].check
    for text in ("layers=3", "layers=1", "width=0.5", "layers=0", "layers=2.5", "width=1", "width=0", "depth=3", "x"):
        try:
            parse_shrink(text)
            ok = True
        except OptionError:
            ok = False
        assert (check(text) is None) == ok, text


@pytest.mark.parametrize("gates, pattern", [
    ({"max_size_mb": math.nan}, r"gate max_size_mb must be a finite number, got nan"),
    ({"max_size_mb": math.inf}, r"gate max_size_mb must be a finite number"),
    ({"max_size_mb": 0}, r"gate max_size_mb must be > 0, got 0"),
    ({"min_speedup": -1.0}, r"gate min_speedup must be > 0, got -1.0"),
    ({"max_accuracy_drop": 1.5}, r"gate max_accuracy_drop must be in \[0, 1\], got 1.5"),
    ({"max_accuracy_drop": -0.1}, r"gate max_accuracy_drop must be in \[0, 1\]"),
    ({"max_size_mb": True}, r"gate max_size_mb must be a number"),
])
def test_bad_gate_values(gates, pattern):
    doc = {"gates": gates, "steps": [{"step": "export"}, {"step": "validate"}, {"step": "bench"}]}
    with pytest.raises(ConfigError, match=rf"^r.toml: {pattern}"):
        parse_recipe(doc, source="r.toml")


def test_data_paths_must_exist_relative_to_the_recipe(tmp_path):
    (tmp_path / "calib.npz").write_bytes(b"")
    f = tmp_path / "r.toml"
    f.write_text('[data]\ncalibration = "calib.npz"\n[[steps]]\nstep = "export"\n')
    assert load_recipe(f).data["calibration"] == str(tmp_path / "calib.npz")
    f.write_text('[data]\ncalibration = "calib.npz"\neval = "held.npz"\n[[steps]]\nstep = "export"\n')
    with pytest.raises(InputFileError, match=rf"\[data\] eval = 'held.npz': {tmp_path / 'held.npz'} does not exist"):
        load_recipe(f)


@pytest.mark.parametrize("key, value, pattern", [
    ("prune.sparsity", 7.5, r"step 2 \(prune\) with --grid: sparsity must be in \(0, 1\), got 7.5"),
    ("quantize.method", "kl", r"method must be one of minmax"),
    ("quantize.tolerance", math.nan, r"tolerance must be a finite number"),
    ("quantize.exclude", "([", r"exclude: expected list"),
    ("gates.min_speedup", 0, r"gate min_speedup must be > 0"),
    ("gates.max_size_mb", math.nan, r"gate max_size_mb must be a finite number"),
    ("gates.max_accuracy_drop", 0.1, r"gate max_accuracy_drop needs a 'validate' step"),
])
def test_grid_overrides_get_the_same_checks(key, value, pattern):
    from edgecomp.pipeline.sweep import expand

    r = parse_recipe({"steps": [{"step": "export"}, {"step": "prune"}, {"step": "quantize"}, {"step": "bench"}]})
    with pytest.raises(ConfigError, match=pattern):
        apply_override(r, key, value)
    with pytest.raises(ConfigError, match=pattern):
        expand(r, {"quantize.per_channel": [True, False], key: [value]})


def test_grid_override_of_a_step_combination():
    r = parse_recipe({"steps": [{"step": "export"}, {"step": "reduce-embeddings", "rank": 8}]})
    with pytest.raises(ConfigError, match=r"reduce-embeddings\) with --grid reduce-embeddings.energy=0.9: energy replaces rank"):
        apply_override(r, "reduce-embeddings.energy", 0.9)


def test_convert_refuses_a_bad_recipe_before_any_step(tmp_path):
    spec = tmp_path / "tiny.py"
    spec.write_text(SPEC)
    recipe = tmp_path / "bad.toml"
    recipe.write_bytes(b'[[steps]]\nstep = "export"\n[[steps]]\nstep = "prune"\nsparsity = 7.5\n')
    before = recipe.read_bytes()
    out = tmp_path / "out"
    t0 = time.perf_counter()
    res = CliRunner().invoke(cli, ["convert", f"{spec}:make", "--recipe", str(recipe), "-o", str(out)])
    elapsed = time.perf_counter() - t0
    line = _one_error_line(res)
    assert line == f"Error: {recipe}: step 2 (prune): sparsity must be in (0, 1), got 7.5"
    assert not out.exists() and elapsed < 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml", "tiny.py"]  # no work folder either
    assert recipe.read_bytes() == before


@pytest.mark.parametrize("recipe_text, targets_text, pattern", [
    ('[[steps]]\nstep = "export"\nopset = 3\n', None, r"step 1 \(export\): opset 3 is outside 7\.\.23"),
    ('[gates]\nmax_size_mb = nan\n[[steps]]\nstep = "export"\n', None, r"gate max_size_mb must be a finite number"),
    ('[data]\neval = "missing.npz"\n[[steps]]\nstep = "export"\n', None, r"\[data\] eval = 'missing.npz'"),
    ('[[steps]]\nstep = "export"\n', "[profile.board]\nthreads = 0\n", r"profile 'board': threads must be"),
    ('[[steps]]\nstep = "export"\n', "[profile.board.isa]\narch = \"sparc64\"\n", r"isa.arch must be one of"),
    ('[[steps]]\nstep = "export"\n', b"\xff\xfe\x00\x01", r"not a UTF-8 text file"),
])
def test_cli_convert_bad_config_one_line(tmp_path, recipe_text, targets_text, pattern):
    spec = tmp_path / "tiny.py"
    spec.write_text(SPEC)
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text)
    args = ["convert", f"{spec}:make", "--recipe", str(recipe), "-o", str(tmp_path / "out")]
    inputs = [recipe]
    if targets_text is not None:
        targets = tmp_path / "devices.toml"
        targets.write_bytes(targets_text if isinstance(targets_text, bytes) else targets_text.encode())
        args += ["--target", "board", "--targets-file", str(targets)]
        inputs.append(targets)
    before = [p.read_bytes() for p in inputs]
    line = _one_error_line(CliRunner().invoke(cli, args))
    assert re.search(pattern, line), line
    assert not (tmp_path / "out").exists()
    assert [p.read_bytes() for p in inputs] == before


# --- sweep addresses ------------------------------------------------------------------------------

@pytest.mark.parametrize("address, pattern", [
    ("127.0.0.1:1", r"cannot reach a Ray cluster at 127.0.0.1:1 \(.*\); start one with 'ray start --head' or drop --address"),
    ("127.0.0.1", r"bad Ray address '127.0.0.1'; write HOST:PORT"),
    ("localhost:port", r"bad Ray address 'localhost:port'"),
    ("localhost:99999", r"bad Ray address"),
])
def test_sweep_refuses_unreachable_or_malformed_addresses_quickly(tmp_path, address, pattern):
    pytest.importorskip("ray")
    spec = tmp_path / "tiny.py"
    spec.write_text(SPEC)
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[steps]]\nstep = "export"\n[[steps]]\nstep = "quantize"\n')
    out = tmp_path / "sweep"
    t0 = time.perf_counter()
    res = CliRunner().invoke(cli, ["sweep", f"{spec}:make", "--recipe", str(recipe), "-o", str(out),
                                   "--grid", "quantize.method=minmax,mse", "--address", address])
    line = _one_error_line(res)
    assert re.search(pattern, line), line
    assert time.perf_counter() - t0 < 30 and not out.exists()


def test_probe_times_out_on_a_port_that_never_answers():
    from edgecomp.pipeline.sweep import parse_address, probe_ray

    assert parse_address(None) is None and parse_address("auto") is None
    assert parse_address("ray://10.0.0.5:10001") == ("10.0.0.5", 10001)
    assert parse_address("[::1]:6379") == ("::1", 6379)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        t0 = time.perf_counter()
        with pytest.raises(ConfigError, match=rf"127.0.0.1:{port} accepts connections but no Ray cluster answers "
                                              r"there within 0.5 s"):
            probe_ray("127.0.0.1", port, timeout=0.5)
        assert time.perf_counter() - t0 < 5


def test_run_sweep_connect_timeout_must_be_positive(tmp_path):
    from edgecomp.pipeline.convert import Source
    from edgecomp.pipeline.sweep import run_sweep

    r = parse_recipe({"steps": [{"step": "export"}, {"step": "quantize"}]})
    for bad in (0, -1, math.nan):
        with pytest.raises(ConfigError, match="connect_timeout must be > 0"):
            run_sweep(Source(spec="x.py:make"), r, {"quantize.method": ["mse"]}, tmp_path / "o", address="h:1",
                      connect_timeout=bad)
    assert not (tmp_path / "o").exists()


# --- quantize --exclude ---------------------------------------------------------------------------

def test_quantize_exclude_regex_is_checked(tmp_path, mlp_path, mlp_data):
    from edgecomp.quantize.options import QuantizeOptions

    with pytest.raises(ConfigError, match=r"^exclude pattern '\(\[' is not a valid regular expression \(.+\)$"):
        QuantizeOptions(exclude=("fc.*", "([")).validate()
    QuantizeOptions(exclude=("fc.*", "^MatMul_\\d+$")).validate()
    calib, _ = mlp_data
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(cli, ["quantize", str(mlp_path), "-o", str(out), "--calibration", str(calib),
                                   "--exclude", "(["])
    line = _one_error_line(res)
    assert line.startswith("Error: Invalid value for '--exclude': pattern '([' is not a valid regular expression"), line
    assert res.exit_code == 2
    assert not out.exists()


def test_compiled_exclude_patterns_are_applied(mlp_path, mlp_data):
    from edgecomp.data import load_data
    from edgecomp.errors import PassFailed
    from edgecomp.io import load_model
    from edgecomp.quantize import quantize_model
    from edgecomp.quantize.options import QuantizeOptions

    with pytest.raises(PassFailed, match="no quantizable layer"):
        quantize_model(load_model(mlp_path), load_data(mlp_data[0]), QuantizeOptions(exclude=(".",)))
