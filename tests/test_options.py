"""Each option is declared once: the click options and the recipe schema come from the same
declaration, the options dataclasses agree with it, and a rule reads the same from the CLI and
from a recipe (the divergences issue #12 found, fixed to one behaviour each)."""

from __future__ import annotations

import dataclasses
import re

import click
import numpy as np
import pytest
from click.testing import CliRunner

from edgecomp.cli import cli
from edgecomp.data import DEFAULT_MAX_SAMPLES
from edgecomp.distill.config import DistillConfig
from edgecomp.distill.options import OPTIONS as DISTILL
from edgecomp.embeddings.options import OPTIONS as EMBEDDINGS
from edgecomp.embeddings.options import ReduceOptions
from edgecomp.errors import ConfigError, DataError
from edgecomp.export import OPTIONS as EXPORT
from edgecomp.measure.options import BENCH_OPTIONS, VALIDATE_OPTIONS
from edgecomp.options import Option, coerce, in_range
from edgecomp.passes.options import OPTIONS as OPTIMIZE
from edgecomp.pipeline.convert import Source, convert
from edgecomp.pipeline.recipe import STEP_OPTIONS, parse_recipe
from edgecomp.prune.options import OPTIONS as PRUNE
from edgecomp.prune.options import PruneOptions
from edgecomp.quantize.options import OPTIONS as QUANTIZE
from edgecomp.quantize.options import QuantizeOptions

# (recipe step, CLI command, declarations)
CAPABILITIES = [("export", "export", EXPORT), ("optimize", "optimize", OPTIMIZE), ("quantize", "quantize", QUANTIZE),
                ("prune", "prune", PRUNE), ("distill", "distill", DISTILL),
                ("reduce-embeddings", "reduce-embeddings", EMBEDDINGS), ("validate", "validate", VALIDATE_OPTIONS),
                ("bench", "bench", BENCH_OPTIONS)]


def _param(command: str, name: str) -> click.Parameter:
    return next(p for p in cli.commands[command].params if p.name == name)


@pytest.mark.parametrize("step, command, options", CAPABILITIES, ids=[c[0] for c in CAPABILITIES])
def test_the_recipe_schema_and_the_cli_come_from_one_declaration(step, command, options):
    assert STEP_OPTIONS[step] == {o.name: o for o in options}
    for opt in options:
        assert STEP_OPTIONS[step][opt.name] is opt  # the same object, not a copy
        p = _param(command, opt.name)
        assert (p.help or "").lower().startswith(opt.describe(choices=False)[:20].lower()), (command, opt.name)
        if p.multiple:  # repeatable: no flag gives the declared empty default through the option's parser
            assert (opt.parse or list)(()) == opt.default
            continue
        default = p.default
        if isinstance(opt.default, list) and opt.split:
            default = [s for s in str(p.default).split(opt.split) if s]
        if opt.choices and p.default is not None:
            default = next(c for c in opt.choices if str(c) == p.default)
        assert default == opt.default, (command, opt.name, p.default, opt.default)


@pytest.mark.parametrize("cls, options", [(QuantizeOptions, QUANTIZE), (PruneOptions, PRUNE),
                                          (ReduceOptions, EMBEDDINGS), (DistillConfig, DISTILL)])
def test_options_dataclasses_agree_with_the_declarations(cls, options):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for opt in options:
        assert opt.name in fields, (cls.__name__, opt.name)
        f = fields[opt.name]
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        want = tuple(opt.default) if isinstance(opt.default, list) else opt.default
        assert value == want, (cls.__name__, opt.name, value, want)


def test_a_declared_check_reads_the_same_everywhere():
    opt = Option("sparsity", float, 0.5, "", check=in_range(0, 1, open_lo=True, open_hi=True))
    with pytest.raises(ConfigError, match=r"^sparsity must be in \(0, 1\), got 1.5$"):
        coerce(opt, 1.5)
    with pytest.raises(ConfigError, match=r"^sparsity expected float, got 'x'$"):
        coerce(opt, "x")
    wide = dataclasses.replace(opt, check=in_range(0, 10))
    assert coerce(wide, 2) == 2.0 and isinstance(coerce(wide, 2), float)


def _cli_error(*args) -> tuple[int, str]:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    lines = res.output.strip().splitlines()
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    return res.exit_code, lines[-1]


def _recipe(*steps, **data) -> tuple[str, dict]:
    return parse_recipe({"steps": [{"step": "export"}, *steps]}), data


def test_prune_scope_default_is_one_rule_for_cli_and_recipe():
    cli_default = _param("prune", "scope").default
    recipe_default = parse_recipe({"steps": [{"step": "export"}, {"step": "prune"}]}).steps[1]["scope"]
    assert cli_default == recipe_default == "auto"
    assert PruneOptions(scope="auto").resolved_scope() == "per-layer"
    assert PruneOptions(scope="auto", structured=False).resolved_scope() == "global"
    assert PruneOptions(scope="per-layer", structured=False).resolved_scope() == "per-layer"


@pytest.mark.parametrize("importance", ["activation", "obs"])
def test_data_hungry_importance_is_refused_without_data_from_cli_and_recipe(tmp_path, mlp_path, importance):
    code, line = _cli_error("prune", mlp_path, "-o", tmp_path / "p.onnx", "--importance", importance)
    assert line == f"Error: --importance {importance} needs --data DATA", line
    assert not (tmp_path / "p.onnx").exists()
    recipe = parse_recipe({"steps": [{"step": "export"}, {"step": "prune", "importance": importance}]})
    with pytest.raises(DataError, match=rf"step 2 \(prune\): importance {importance} needs calibration data: "
                                        rf"pass --data or set \[data\] calibration"):
        convert(Source(spec="models.text_encoder:tiny_encoder"), recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tolerance_needs_eval_data_from_cli_and_recipe(tmp_path, mlp_path, mlp_data):
    calib, _ = mlp_data
    code, line = _cli_error("quantize", mlp_path, "-o", tmp_path / "q.onnx", "--calibration", calib,
                            "--tolerance", "0.01")
    assert line == "Error: --tolerance 0.01 needs --eval DATA", line  # the recipe names the same value
    recipe = parse_recipe({"steps": [{"step": "export"}, {"step": "quantize", "tolerance": 0.01}]})
    with pytest.raises(DataError, match=r"step 2 \(quantize\): tolerance 0.01 needs eval data"):
        convert(Source(spec="models.text_encoder:tiny_encoder"), recipe, tmp_path / "out", calibration=str(calib))


@pytest.mark.parametrize("command, flag, key, step", [("quantize", "--max-samples", "max_samples", "quantize"),
                                                      ("prune", "--max-samples", "max_samples", "prune"),
                                                      ("bench", "--threads", "threads", "bench")])
def test_unset_is_leaving_the_option_out_and_zero_is_refused_alike(tmp_path, mlp_path, command, flag, key, step):
    args = [command, mlp_path] + (["-o", tmp_path / "x.onnx"] if command != "bench" else []) + [flag, "0"]
    code, line = _cli_error(*args)
    assert code == 2 and f"'{flag}': must be >= 1, got 0" in line, line
    with pytest.raises(ConfigError, match=rf"step 2 \({step}\): {key} must be >= 1, got 0$"):
        parse_recipe({"steps": [{"step": "export"}, {"step": step, key: 0}]})
    default = DEFAULT_MAX_SAMPLES if key == "max_samples" else None  # a bounded sample of DATA; threads unset
    assert parse_recipe({"steps": [{"step": "export"}, {"step": step}]}).steps[1][key] == default
    assert _param(command, key).default == default


def test_library_errors_name_options_neutrally(mlp_path, mlp_data):
    import onnx_ir as ir

    from edgecomp.data import Dataset
    from edgecomp.prune import prune_model
    from edgecomp.quantize import quantize_model

    calib, _ = mlp_data
    with pytest.raises(ConfigError) as e:
        quantize_model(ir.load(str(mlp_path)), Dataset(calib), QuantizeOptions(percentile=40.0))
    assert str(e.value) == "percentile must be in (50, 100), got 40.0"
    with pytest.raises(ConfigError) as e:
        prune_model(ir.load(str(mlp_path)), PruneOptions(kinds=("rows",)))
    assert not re.search(r"--\w", str(e.value)), str(e.value)


def test_cli_renders_an_option_error_in_its_own_flag_names(tmp_path, mlp_path):
    # `--structured` options that unstructured pruning does not read are refused by the library
    # as "round_to has no effect ..."; the CLI says --round-to
    code, line = _cli_error("prune", mlp_path, "-o", tmp_path / "p.onnx", "--unstructured", "--round-to", "4")
    assert line.startswith("Error: --round-to has no effect on unstructured pruning"), line
    np.testing.assert_equal((tmp_path / "p.onnx").exists(), False)
