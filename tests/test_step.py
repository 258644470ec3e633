"""One step shape and rules in one place (#21 items 1-2).

- every capability's ``run`` returns a :class:`~edgecomp.step.StepResult`;
- each rule reads the same from the CLI and from a recipe (format vs target, unstructured pruning
  given data, the data a step always reads);
- ``convert`` keeps models in memory: no file it writes is read back (each at most once), and
  quantize does not run the optimize pass again after the recipe's optimize step.

``convert``'s export is replaced by the MLP fixture loaded in memory (no torch export): what is
tested is the data flow after it.
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from edgecomp.cli import cli
from edgecomp.data import StepData
from edgecomp.errors import ConfigError, DataError
from edgecomp.io import load_model
from edgecomp.pipeline.convert import Source, convert
from edgecomp.pipeline.recipe import STEP_DATA_NEEDED, parse_recipe
from edgecomp.step import EXIT_STATUS, StepContext, StepResult
from edgecomp.targets import BUILTIN_PROFILES
from tests.conftest import make_model, vinfo

NNAPI = BUILTIN_PROFILES["arm-phone-nnapi"]


@pytest.fixture
def fake_export(monkeypatch, mlp_path):
    """convert's export step gives the MLP fixture, in memory, as a real export would."""
    import edgecomp.export
    from edgecomp.export import ExportResult, step_result

    def export_in_memory(out, values, *, spec=None, hf=None):
        assert out is None  # convert saves the model itself, with the other steps' models
        return step_result(ExportResult(None, "fake", None, ["x"], ["logits"], 0.0, 0.0, model=load_model(mlp_path)))

    monkeypatch.setattr(edgecomp.export, "run", export_in_memory)


def _recipe(*steps):
    return parse_recipe({"steps": [{"step": "export"}, *steps]})


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# --- one shape ----------------------------------------------------------------------------------

def test_every_capability_run_returns_a_step_result(mlp_path, mlp_data):
    from edgecomp.embeddings import ReduceOptions
    from edgecomp.embeddings import run as reduce_run
    from edgecomp.passes.optimize_graph import run as optimize_run
    from edgecomp.prune import run as prune_run
    from edgecomp.prune.options import PruneOptions
    from edgecomp.quantize import run as quantize_run
    from edgecomp.quantize.options import QuantizeOptions

    calib, _ = mlp_data
    data = StepData(calibration=str(calib))
    ids = np.random.default_rng(0).standard_normal((1200, 16)).astype(np.float32)
    table = make_model([onnx.helper.make_node("Gather", ["emb", "ids"], ["y"])],
                       [vinfo("ids", ["N", 3], onnx.TensorProto.INT64)], [vinfo("y", ["N", 3, 16])], {"emb": ids})
    results = {
        "optimize": optimize_run(load_model(mlp_path), {"fold_constants": True, "fusions": "none"}),
        "quantize": quantize_run(load_model(mlp_path), QuantizeOptions(families="all"), data, StepContext()),
        "prune": prune_run(load_model(mlp_path), PruneOptions(sparsity=0.25, allow_degraded=True), data),
        "prune unstructured": prune_run(load_model(mlp_path), PruneOptions(sparsity=0.5, structured=False, allow_degraded=True),
                                        StepData()),
        "reduce-embeddings": reduce_run(ir.from_proto(table), ReduceOptions(bits=8, min_rows=0), StepData()),
    }
    for name, res in results.items():
        assert isinstance(res, StepResult), name
        assert isinstance(res.model, ir.Model) and res.step == name.split()[0], name
        assert res.status in EXIT_STATUS and res.summary and all(isinstance(v, list) for v in res.tables.values())
    assert {r["decision"] for r in results["quantize"].tables["layers"]} == {"int8"}
    assert results["prune"].tables["groups"] and "layers" in results["prune unstructured"].tables


def test_status_keeps_the_lowest_exit_status_and_refuses_unknown_ones():
    res = StepResult("quantize")
    res.mark("not faster", "x")
    res.mark("degraded", "y")
    assert (res.status, res.exit_status, res.reason) == ("degraded", 3, "y")
    res.mark("not faster", "z")  # degraded (exit 3) is reported before not faster (exit 5), as convert orders them
    assert res.exit_status == 3
    with pytest.raises(ValueError):
        res.mark("bad", "")


# --- rules in one place ---------------------------------------------------------------------------

def test_format_that_contradicts_the_target_is_refused_from_cli_and_recipe(tmp_path, mlp_path, mlp_data,
                                                                          fake_export):
    calib, _ = mlp_data
    res = _cli("quantize", mlp_path, "-o", tmp_path / "q.onnx", "--calibration", calib, "--target", NNAPI.name,
               "--format", "contrib")
    line = res.output.strip().splitlines()[-1]
    why = ("contrib contradicts the target: it runs on the NNAPI EP, which has no kernels for that form; drop it "
           "(the format follows the target: qdq)")
    assert res.exit_code == 1 and line == f"Error: --format {why}", res.output
    with pytest.raises(ConfigError) as e:  # refused before any step runs: nothing is written
        convert(Source(spec="unused:factory"), _recipe({"step": "quantize", "format": "contrib"}), tmp_path / "out",
                calibration=str(calib), target=NNAPI)
    assert str(e.value) == f"<recipe>: step 2 (quantize): format {why}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "q.onnx").exists()


def test_unset_format_follows_the_target_for_cli_and_recipe():
    from edgecomp.quantize.options import for_target

    assert for_target({}, NNAPI).resolved_format() == "qdq"
    assert for_target({}, BUILTIN_PROFILES["x86-avx2-2core"]).resolved_format() == "contrib"
    assert for_target({"format": "qdq"}, None).resolved_format() == "qdq"
    recipe = _recipe({"step": "quantize"})
    assert recipe.steps[1]["format"] is None  # left out of a recipe as on the command line


def test_unstructured_pruning_given_data_warns_the_same_from_cli_and_recipe(tmp_path, mlp_path, mlp_data,
                                                                           fake_export):
    from edgecomp.prune import UNSTRUCTURED_DATA

    calib, _ = mlp_data
    res = _cli("prune", mlp_path, "-o", tmp_path / "p.onnx", "--unstructured", "--sparsity", "0.3", "--data", calib,
               "--allow-degraded")
    assert res.exit_code in (0, 3) and f"warning: {UNSTRUCTURED_DATA}" in res.stderr, res.output
    out = convert(Source(spec="unused:factory"),
                  _recipe({"step": "prune", "structured": False, "sparsity": 0.3, "allow_degraded": True}),
                  tmp_path / "out", calibration=str(calib))
    assert UNSTRUCTURED_DATA in out.steps[1].warnings
    assert (tmp_path / "p.onnx").exists() and (tmp_path / "out" / "02-prune.onnx").exists()


def test_data_a_step_always_reads_is_one_declaration(tmp_path, mlp_path, fake_export):
    from edgecomp.measure.options import VALIDATE_DATA_NEEDED
    from edgecomp.quantize.options import DATA_NEEDED

    assert STEP_DATA_NEEDED["quantize"] is DATA_NEEDED and STEP_DATA_NEEDED["validate"] is VALIDATE_DATA_NEEDED
    res = _cli("quantize", mlp_path, "-o", tmp_path / "q.onnx")
    assert res.exit_code == 1 and res.output.strip().splitlines()[-1] == \
        "Error: static quantization needs --data DATA", res.output
    with pytest.raises(DataError, match=r"^<recipe>: step 2 \(quantize\): static quantization needs calibration "
                                        r"data: pass --data"):
        convert(Source(spec="unused:factory"), _recipe({"step": "quantize"}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- in memory end to end -------------------------------------------------------------------------

def _count_reads(monkeypatch) -> collections.Counter:
    """Every way a model file can be read here, counted by path: onnx.load(_model), onnx_ir.load,
    onnx.checker on a path, an onnxruntime session on a path."""
    reads: collections.Counter = collections.Counter()

    def counted(fn, index=0):
        def wrapper(*args, **kwargs):
            src = args[index] if len(args) > index else None
            if isinstance(src, (str, Path)):
                reads[Path(src).name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for mod, name in ((onnx, "load"), (onnx, "load_model"), (ir, "load"), (onnx.checker, "check_model")):
        monkeypatch.setattr(mod, name, counted(getattr(mod, name)))
    monkeypatch.setattr(ort, "InferenceSession", counted(ort.InferenceSession))
    return reads


def test_convert_reads_no_model_file_back_and_cleans_up_once(tmp_path, mlp_data, fake_export, monkeypatch):
    from edgecomp.passes.optimize_graph import OptimizeGraphPass

    calib, labels = mlp_data
    calls = []
    call = OptimizeGraphPass.call
    monkeypatch.setattr(OptimizeGraphPass, "call", lambda self, model: calls.append(1) or call(self, model))
    reads = _count_reads(monkeypatch)
    recipe = _recipe({"step": "optimize"}, {"step": "quantize", "families": "all"}, {"step": "validate"},
                     {"step": "bench", "runs": 2, "warmup": 0})
    res = convert(Source(spec="unused:factory"), recipe, tmp_path / "out", calibration=str(calib),
                  eval_data=str(calib), labels=str(labels))
    written = {Path(s.model).name for s in res.steps if s.model}
    assert written == {"01-export.onnx", "02-optimize.onnx", "03-quantize.onnx"}
    assert {n: reads[n] for n in written} == {n: 0 for n in written}, reads  # measured in memory
    assert len(calls) == 1  # the optimize step's; quantize does not clean the same graph up again
    assert res.steps[2].summary["cleanup"] == "done by the optimize step before"
    quantized = res.steps[2]
    assert quantized.cos_mean is not None and quantized.latency_ratio is not None and quantized.size_bytes > 0


def test_quantize_cleans_up_when_the_optimize_step_did_not_fold(tmp_path, mlp_data, fake_export, monkeypatch):
    from edgecomp.passes.optimize_graph import OptimizeGraphPass

    calib, _ = mlp_data
    calls = []
    call = OptimizeGraphPass.call
    monkeypatch.setattr(OptimizeGraphPass, "call", lambda self, model: calls.append(1) or call(self, model))
    recipe = _recipe({"step": "optimize", "fold_constants": False}, {"step": "quantize", "families": "all"})
    res = convert(Source(spec="unused:factory"), recipe, tmp_path / "out", calibration=str(calib))
    assert len(calls) == 2 and isinstance(res.steps[2].summary["cleanup"], dict)


def test_export_runs_in_memory_and_returns_a_step_result():
    """Without an output path nothing is written: the model comes back checked against torch."""
    from edgecomp.export import OPTIONS, run
    from edgecomp.options import defaults

    res = run(None, {**defaults(OPTIONS), "exporter": "torchscript"}, spec="models.text_encoder:tiny_encoder")
    assert isinstance(res, StepResult) and isinstance(res.model, ir.Model) and res.step == "export"
    assert res.evidence["path"] is None
    assert res.summary["max abs diff vs torch"] < 1e-4 and res.evidence["inputs"] == ["input_ids", "attention_mask"]


def test_capability_packages_and_the_step_module_import_light():
    """``edgecomp.step`` is a leaf, and a capability's options (what the CLI reads for its flags) do
    not pull in the capability's code: its ``__init__`` loads ``run`` on first use."""
    import subprocess
    import sys

    code = ("import sys, edgecomp.step; assert 'numpy' not in sys.modules, 'step'; "
            "import edgecomp.quantize.options, edgecomp.prune.options, edgecomp.embeddings.options; "
            "heavy = [m for m in ('edgecomp.quantize.step', 'edgecomp.prune.step', 'edgecomp.embeddings.step', "
            "'edgecomp.quantize.calibration', 'edgecomp.prune.groups') if m in sys.modules]; "
            "assert not heavy, heavy; from edgecomp.quantize import run; "
            "assert 'edgecomp.quantize.step' in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def test_validate_and_bench_runs_measure_models_in_memory(mlp_path, mlp_data):
    from edgecomp.errors import DataNeeded
    from edgecomp.measure.bench import run as bench_run
    from edgecomp.measure.validate import run as validate_run

    calib, labels = mlp_data
    ref = load_model(mlp_path)
    cand = load_model(mlp_path)
    cand.graph.initializers["b2"].const_value = ir.tensor(cand.graph.initializers["b2"].const_value.numpy() + 1.0)
    v = validate_run([ref, cand], {"k": 10}, StepData(eval=str(calib), labels=str(labels)))
    assert isinstance(v, StepResult) and v.model is None and v.step == "validate" and v.summary["samples"] == 32
    x = np.load(calib)["x"]
    init = {k: t.const_value.numpy() for k, t in ref.graph.initializers.items()}
    logits = np.maximum(x @ init["w1"] + init["b1"], 0) @ init["w2"] + init["b2"]
    shifted = logits + 1.0
    cos = (logits * shifted).sum(1) / np.linalg.norm(logits, axis=1) / np.linalg.norm(shifted, axis=1)
    same, moved = v.tables["fidelity"]
    assert same["cosine mean"] == pytest.approx(1.0, abs=1e-6)
    assert moved["cosine mean"] == pytest.approx(float(cos.mean()), abs=1e-5)
    with pytest.raises(DataNeeded, match="validate needs eval data"):
        validate_run([ref, cand], {"k": 10}, StepData(calibration=str(calib)))
    b = bench_run([ref, cand], {"threads": None, "warmup": 0, "runs": 3}, StepData(calibration=str(calib)))
    assert isinstance(b, StepResult) and b.model is None and b.step == "bench"
    assert [r["model"] for r in b.tables["latency"]] == ["model 0", "model 1"] and "x" in b.summary["feed"]
    assert b.tables["latency"][0]["ratio_to_first"] == 1.0 and b.tables["latency"][1]["runs"] == 3



def _cosine_to_teacher(teacher: ir.Model, student: ir.Model, x: np.ndarray) -> float:
    from edgecomp.io import model_bytes

    t, s = (ort.InferenceSession(model_bytes(m), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for m in (teacher, student))
    return float(((t * s).sum(1) / np.linalg.norm(t, axis=1) / np.linalg.norm(s, axis=1)).mean())


def test_distill_run_returns_the_student_in_memory(tmp_path, mlp_path, mlp_data, monkeypatch):
    """An in-memory teacher heals a perturbed copy of itself: the trained student comes back as an
    ir.Model measured against the teacher in the rows, and nothing stays on disk (checkpoint included)."""
    from edgecomp.distill import run
    from edgecomp.io import save_model

    calib, _ = mlp_data
    student = load_model(mlp_path)
    w = student.graph.initializers["w2"]
    w.const_value = ir.tensor(w.const_value.numpy() + np.random.default_rng(3).normal(0, 0.5, (16, 4)).astype(np.float32))
    student_path = save_model(student, tmp_path / "student.onnx")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the temporary files land here, to be seen gone
    options = {"student": str(student_path), "max_steps": 4, "batch_size": 8, "held_out": 0.25, "eval_every": 2,
               "patience": None, "lr": 1e-2, "blockwise": False}
    res = run(load_model(mlp_path), options, StepData(calibration=str(calib)), StepContext())
    assert isinstance(res, StepResult) and res.step == "distill" and res.status == "ok"
    assert isinstance(res.model, ir.Model) and res.evidence["path"] is None
    teacher_row, student_row = res.tables["teacher vs student"]
    assert (teacher_row["model"], student_row["model"]) == ("teacher", "student")
    assert student_row["parameters"] == teacher_row["parameters"] == 8 * 16 + 16 + 16 * 4 + 4
    x = np.load(calib)["x"]
    held = x[sorted(np.random.default_rng(0).permutation(len(x))[:8])]  # Samples.split(0.25, seed 0)
    assert student_row["cos to teacher"] == pytest.approx(_cosine_to_teacher(load_model(mlp_path), res.model, held),
                                                          abs=1e-5)
    assert res.summary["steps"] == 4 and [h["step"] for h in res.tables["held-out history"]] == [0, 2, 4]
    left = [p.name for p in tmp_path.iterdir() if not p.name.startswith("torchinductor")]  # torch's compile cache
    assert left == ["student.onnx"]  # no model written, no checkpoint (or its temporary folder) left


def test_convert_heal_keeps_the_student_in_memory(tmp_path, mlp_data, fake_export, monkeypatch):
    """A prune-then-distill recipe: distill's student is saved once and never read back; validate
    measures it in memory. (The trainer still reads the teacher and student it is given from the
    files the earlier steps wrote.)"""
    calib, labels = mlp_data
    reads = _count_reads(monkeypatch)
    recipe = _recipe({"step": "prune", "sparsity": 0.25, "allow_degraded": True},
                     {"step": "distill", "max_steps": 2, "batch_size": 8, "held_out": 0.25, "blockwise": False},
                     {"step": "validate"})
    res = convert(Source(spec="unused:factory"), recipe, tmp_path / "out", calibration=str(calib),
                  eval_data=str(calib), labels=str(labels))
    healed = res.steps[2]
    assert Path(healed.model).name == "03-distill.onnx" and reads["03-distill.onnx"] == 0, reads
    assert healed.summary["healed"] == "02-prune.onnx against 01-export.onnx" and healed.summary["steps"] == 2
    teacher_row, student_row = healed.tables["teacher vs student"]
    assert student_row["parameters"] < teacher_row["parameters"] and healed.cos_mean is not None
    assert student_row["size bytes"] == healed.size_bytes  # the file saved is the model measured in memory
    assert not list((tmp_path / "out").glob("*.ckpt*"))
    assert set(reads) <= {"mlp.onnx", "01-export.onnx", "02-prune.onnx"}, reads  # the trainer's inputs only
