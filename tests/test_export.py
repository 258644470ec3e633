import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from edgecomp.cli import cli
from edgecomp.errors import OptionError, ParityError, SpecError
from edgecomp.export import export_model, export_spec, load_spec
from tests.conftest import run_ort

REFERENCE_SPECS = {
    "mobilenet_v2_digits": ("models.mobilenet_v2:mobilenet_v2", {"x": ((1, 1, 32, 32), None)},
                            dict(width=0.5, num_classes=10, in_channels=1, input_size=32)),
    "small_resnet": ("models.resnet:small_resnet", None, {}),
    "tiny_encoder": ("models.text_encoder:tiny_encoder", None, {}),
}


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", list(REFERENCE_SPECS))
def test_reference_models_export_with_parity(name, exporter, tmp_path):
    spec, shapes, kwargs = REFERENCE_SPECS[name]
    made = load_spec(spec)(**kwargs)
    module, example = made if isinstance(made, tuple) else (made, None)
    res = export_model(module, example, tmp_path / "m.onnx", input_shapes=shapes, exporter=exporter)
    assert res.exporter == exporter and res.max_abs_diff < 1e-4
    onnx.checker.check_model(str(res.path))
    # Independent check: run the file in onnxruntime against torch on a fresh input.
    if name == "tiny_encoder":
        ids, mask = torch.randint(0, 1000, (2, 16)), torch.ones(2, 16, dtype=torch.int64)
        feed, args = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, (ids, mask)
    else:
        x = torch.randn(1, 1, 32, 32)
        feed, args = {res.input_names[0]: x.numpy()}, (x,)
    with torch.no_grad():
        want = module(*args).numpy()
    np.testing.assert_allclose(run_ort(res.path, feed)[0], want, atol=1e-4, rtol=1e-3)


def test_dynamic_axes_accept_other_batch_sizes(tmp_path):
    res = export_spec("models.resnet:small_resnet", tmp_path / "r.onnx", exporter="torchscript",
                      dynamic={"x": {0: "batch"}})
    out = run_ort(res.path, {"x": np.random.default_rng(0).standard_normal((3, 1, 32, 32)).astype(np.float32)})
    assert out[0].shape == (3, 10)


def test_file_spec_and_input_shapes(tmp_path):
    f = tmp_path / "mymodel.py"
    f.write_text("import torch\ndef make():\n    torch.manual_seed(0)\n    return torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Tanh())\n")
    res = export_spec(f"{f}:make", tmp_path / "m.onnx", input_shapes={"features": ((2, 6), None)})
    assert res.input_names == ["features"]
    with pytest.raises(OptionError, match="^input is needed: the factory gives no example inputs"):
        export_spec(f"{f}:make", tmp_path / "m2.onnx")
    with pytest.raises(OptionError, match=r"^input names \['a', 'b'\] do not match the 1 example inputs"):
        export_spec("models.resnet:small_resnet", tmp_path / "m3.onnx", input_shapes={"a": ((1, 1, 32, 32), None),
                                                                                      "b": ((1,), None)})
    with pytest.raises(OptionError, match=r"^dynamic names unknown input\(s\) \['y'\]"):
        export_spec("models.resnet:small_resnet", tmp_path / "m4.onnx", dynamic={"y": {0: "batch"}})


def test_cli_names_the_flags_of_export_option_errors(tmp_path):
    f = tmp_path / "mymodel.py"
    f.write_text("import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Linear(6, 3))\n")
    for args, line in [([], "Error: --input is needed: the factory gives no example inputs"),
                       (["--input", "x=1x6", "--dynamic", "y:0=batch"], "Error: --dynamic names unknown input(s) ['y']")]:
        res = CliRunner().invoke(cli, ["export", f"{f}:make", "-o", str(tmp_path / "m.onnx"), *args])
        assert res.exit_code == 1 and res.stderr.startswith(line), res.output


@pytest.mark.parametrize("spec,msg", [
    ("no_colon", "bad SPEC"),
    ("not_a_module_xyz:make", "cannot import"),
    ("models.resnet:nope", "has no callable 'nope'"),
    ("/no/such/file.py:f", "SPEC file not found"),
])
def test_bad_specs(spec, msg, tmp_path):
    with pytest.raises(SpecError, match=msg):
        export_spec(spec, tmp_path / "x.onnx")


def test_parity_mismatch_is_an_error_and_writes_nothing(tmp_path):
    class Flaky(torch.nn.Module):
        """Differs between torch and ONNX: torch uses a python-side branch not traced."""

        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x * (2.0 if self.calls == 1 else 3.0)

    out = tmp_path / "flaky.onnx"
    with pytest.raises(ParityError, match="disagree"):
        export_model(Flaky(), (torch.ones(1, 4),), out, exporter="torchscript")
    assert not out.exists()
