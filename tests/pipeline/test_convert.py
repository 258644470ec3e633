"""convert / recipes / sweep: built-in recipes on tiny models, gates, report.html, a Ray sweep."""

import json
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner

from edgecomp.cli import cli
from edgecomp.errors import ConfigError, DataError, OutputError
from edgecomp.pipeline.convert import Source, convert
from edgecomp.pipeline.recipe import builtin_recipes, load_recipe, parse_recipe

ENCODER_EXPORT = ('[[steps]]\nstep = "export"\nexporter = "torchscript"\n'
                  'dynamic = { input_ids = { 0 = "batch", 1 = "seq" }, attention_mask = { 0 = "batch", 1 = "seq" } }\n')


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    for split, n in (("calib", 12), ("eval", 10)):
        (root / split).mkdir()
        for i in range(n):
            L = int(rng.integers(4, 16))
            np.savez(root / split / f"{i:02d}.npz", input_ids=rng.integers(1, 1000, (1, L)), attention_mask=np.ones((1, L), np.int64))
    return root / "calib", root / "eval"


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.external = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href") and v and v.startswith(("http:", "https:", "//")):
                self.external.append(v)


def test_cnn_recipe_on_digits(tmp_path, digits_onnx):
    _, data, labels = digits_onnx
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.load(data)["x"][:60])
    recipe = load_recipe("cnn-int8")
    recipe.steps[0]["exporter"] = "torchscript"
    recipe.steps[2]["families"] = "all"  # timing-based family choice is noisy under load; tested in test_quantize
    out = tmp_path / "out"
    res = convert(Source(spec="models.mobilenet_v2:digits_classifier"), recipe, out, calibration=str(calib),
                  eval_data=str(data), labels=str(labels))
    names = sorted(p.name for p in out.iterdir())
    assert names == ["01-export.onnx", "02-optimize.onnx", "03-quantize.onnx", "model.onnx", "report.html", "report.json"]
    q = res.steps[2]
    assert q.int8_mac_share > 0.5 and q.latency_ratio is not None and q.accuracy is not None
    assert {g["gate"] for g in res.gates} == {"max_accuracy_drop", "min_speedup"}
    drop = next(g for g in res.gates if g["gate"] == "max_accuracy_drop")
    assert drop["value"] == pytest.approx(res.steps[0].accuracy - q.accuracy)
    report = json.loads((out / "report.json").read_text())
    assert report["final_model"].endswith("model.onnx") and len(report["steps"]) == 5
    page = (out / "report.html").read_text()
    parser = _Collector()
    parser.feed(page)
    assert parser.tags.count("svg") >= 2 and "table" in parser.tags  # trade-off + sensitivity plots
    assert parser.external == [] and "<script" not in page
    assert "03-quantize" in page


def test_encoder_recipe_and_failing_gate_exit_status(tmp_path, token_data):
    calib, ev = token_data
    rfile = tmp_path / "enc.toml"
    rfile.write_text('[gates]\nmax_size_mb = 0.001\nmax_accuracy_drop = 0.5\n' + ENCODER_EXPORT +
                     '[[steps]]\nstep = "quantize"\nfamilies = "all"\n[[steps]]\nstep = "validate"\n')
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["convert", "models.text_encoder:tiny_encoder", "--recipe", str(rfile), "-o", str(out),
                                   "--calibration", str(calib), "--eval", str(ev)])
    assert res.exit_code == 4, res.output
    assert "gate max_size_mb" in res.output and "FAIL" in res.output
    assert (out / "model.onnx").exists() and (out / "report.html").exists()
    report = json.loads((out / "report.json").read_text())
    gates = {g["gate"]: g["passed"] for g in report["gates"]}
    assert gates == {"max_size_mb": False, "max_accuracy_drop": True}


@pytest.mark.slow  # built-in recipe
@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_each_builtin_recipe_on_a_tiny_model(name, tmp_path, token_data, digits_onnx):
    recipe = load_recipe(name)
    for step in recipe.steps:
        if step["step"] == "export":
            step["exporter"] = "torchscript"
        if step["step"] == "bench":
            step["runs"], step["warmup"] = 10, 2
        if step["step"] == "distill":
            step.update(max_steps=4, batch_size=4, held_out=0.25)
            if step["shrink"]:
                step["shrink"] = "layers=1"  # the tiny encoder has 2
        if step["step"] == "quantize":
            step["families"] = "all"  # auto times the host; the recipe run must not depend on it
        if step["step"] == "prune":  # 40 samples (8 held out) are too few for the 0.95 floor; tests/prune checks it
            step["allow_degraded"] = True
        if step["step"] == "finetune":  # the digits task itself (new_head auto: 10 classes); tests/pipeline/test_transfer
            step.update(max_steps=4, batch_size=8, held_out=0.25)
    if name.startswith("encoder"):
        calib, ev = token_data
        source, labels = Source(spec="models.text_encoder:tiny_encoder"), None
    else:
        _, ev, labels = digits_onnx
        calib = tmp_path / "calib.npz"
        np.savez(calib, x=np.load(ev)["x"][:40])
        source = Source(spec="models.mobilenet_v2:digits_classifier")
    train_labels = None
    if "finetune" in recipe.step_names():
        train_labels = tmp_path / "calib_labels.npy"
        np.save(train_labels, np.load(labels)[:40])
    res = convert(source, recipe, tmp_path / "out", calibration=str(calib), eval_data=str(ev),
                  labels=str(labels) if labels else None, train_labels=str(train_labels) if train_labels else None)
    final, base = res.final(), res.baseline()
    assert final.step == recipe.step_names()[-3] and final.size_bytes < base.size_bytes
    assert final.latency_ratio is not None and final.cos_mean is not None
    if "distill" not in recipe.step_names():  # a 4-step student is not expected to be faithful
        assert final.cos_mean > 0.9
    if "prune" in recipe.step_names() and "distill" in recipe.step_names():  # healed: trained against the unpruned
        heal = next(s for s in res.steps if s.step == "distill")
        assert heal.summary["healed"] == f"{heal.index - 1:02d}-prune.onnx against {heal.index - 2:02d}-" \
                                         f"{res.steps[heal.index - 3].step}.onnx"
        # the block phase (block_fraction of the steps) first, then the end-to-end pass "steps" counts
        assert heal.summary["steps"] + heal.summary.get("block steps", 0) == 4
        assert "block-wise boundaries" not in heal.tables  # the heal recipes train end to end (measured better)
    assert {g["gate"] for g in res.gates} == set(recipe.gates)


def test_builtin_encoder_recipe_parses_and_is_listed():
    assert {"cnn-int8", "encoder-int8"} <= set(builtin_recipes())
    r = load_recipe("encoder-int8")
    assert r.step_names()[0] == "export" and r.steps[1]["max_samples"] == 300
    res = CliRunner().invoke(cli, ["recipes"])
    assert res.exit_code == 0 and "encoder-int8" in res.output and "cnn-int8" in res.output


def test_bad_recipes(tmp_path, token_data):
    calib, _ = token_data
    bad = tmp_path / "bad.toml"
    bad.write_text('[[steps]]\nstep = "export"\nexporter = \n')
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML.*line 3"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="unknown step 'shrink'; valid steps: export"):
        parse_recipe({"steps": [{"step": "shrink"}]})
    with pytest.raises(ConfigError, match=r"unknown key 'methd'; valid keys: method"):
        parse_recipe({"steps": [{"step": "export"}, {"step": "quantize", "methd": "mse"}]})
    with pytest.raises(ConfigError, match="gate min_speedup needs a 'bench' step"):
        parse_recipe({"gates": {"min_speedup": 2}, "steps": [{"step": "export"}]})
    with pytest.raises(ConfigError, match="neither a file nor a built-in recipe"):
        load_recipe("nope-recipe")
    r = parse_recipe({"steps": [{"step": "export"}, {"step": "validate"}]})
    with pytest.raises(DataError, match=r"step 2 \(validate\): validate needs eval data: pass --eval or set \[data\] eval"):
        convert(Source(spec="models.text_encoder:tiny_encoder"), r, tmp_path / "o1")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("user file")
    with pytest.raises(OutputError, match="--overwrite"):
        convert(Source(spec="models.text_encoder:tiny_encoder"), r, tmp_path / "busy", eval_data=str(calib))
    assert (tmp_path / "busy" / "keep.txt").read_text() == "user file"


@pytest.mark.slow  # Ray
def test_sweep_of_four_variants_on_local_ray(tmp_path, token_data):
    calib, ev = token_data
    rfile = tmp_path / "sweep.toml"
    rfile.write_text('[gates]\nmax_accuracy_drop = 0.05\n' + ENCODER_EXPORT +
                     '[[steps]]\nstep = "quantize"\nfamilies = "all"\n[[steps]]\nstep = "validate"\n'
                     '[[steps]]\nstep = "bench"\nruns = 10\nwarmup = 2\n')
    out = tmp_path / "sweep"
    res = CliRunner().invoke(cli, ["sweep", "models.text_encoder:tiny_encoder", "--recipe", str(rfile), "-o", str(out),
                                   "--grid", "quantize.method=minmax,mse", "--grid", "quantize.smooth=auto,off",
                                   "--calibration", str(calib), "--eval", str(ev)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "sweep.json").read_text())
    assert len(data["variants"]) == 4 and all("error" not in v for v in data["variants"])
    assert {(v["quantize.method"], v["quantize.smooth"]) for v in data["variants"]} == {
        ("minmax", "auto"), ("minmax", "off"), ("mse", "auto"), ("mse", "off")}
    from edgecomp.render.text import pareto_front

    pts = [(v["latency"], v["quality"]) for v in data["variants"]]
    want = {data["variants"][i]["variant"] for i in pareto_front(pts)}
    assert want and {v["variant"] for v in data["variants"] if v["pareto"]} == want
    for line in res.output.splitlines():  # the terminal table marks the same variants
        if line.startswith("variant-") and " done:" not in line:
            assert line.split()[0] in want if line.rstrip().endswith("yes") else line.split()[0] not in want
    best = max((v for v in data["variants"] if v["gates passed"]), key=lambda v: (v["quality"], -v["latency"]))
    assert data["best"]["variant"] == best["variant"]
    assert (out / "best.onnx").read_bytes() == (out / best["variant"] / "model.onnx").read_bytes()
    assert "<svg" in (out / "sweep.html").read_text()


def test_recipe_values_of_the_wrong_type():
    from edgecomp.pipeline.recipe import apply_override

    with pytest.raises(ConfigError, match="gates must be a table"):
        parse_recipe({"gates": 5, "steps": [{"step": "export"}]})
    with pytest.raises(ConfigError, match=r"\[data\] calibration must be a path"):
        parse_recipe({"data": {"calibration": 5}, "steps": [{"step": "export"}]})
    r = parse_recipe({"gates": {"max_size_mb": 3}, "steps": [{"step": "export"}]})
    with pytest.raises(ConfigError, match="gate values must be numbers"):
        apply_override(r, "gates.max_size_mb", "abc")
    with pytest.raises(ConfigError, match="expected int"):
        parse_recipe({"steps": [{"step": "export"}, {"step": "bench", "runs": "many"}]})
