
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgecomp.measure.bench import benchmark
from edgecomp.measure.validate import cosine_rows, knn_agreement, validate
from tests.conftest import run_ort


def _perturbed(mlp_path, tmp_path, scale=0.05):
    m = onnx.load(str(mlp_path))
    rng = np.random.default_rng(3)
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array((a + scale * rng.standard_normal(a.shape)).astype(a.dtype), t.name))
    p = tmp_path / "pert.onnx"
    onnx.save(m, str(p))
    return p


def test_interleaved_bench_ratios(mlp_path, tmp_path):
    other = _perturbed(mlp_path, tmp_path)
    res = benchmark([mlp_path, other], threads=1, warmup=2, runs=15, shapes={"x": (1, 8)})
    assert [s.runs for s in res.models] == [15, 15]
    assert res.models[0].ratio_to_first == 1.0
    assert res.models[1].ratio_to_first == pytest.approx(res.models[1].p50_ms / res.models[0].p50_ms)
    s = res.models[0]
    assert 0 < s.p50_ms <= s.p90_ms <= s.p99_ms
    assert s.throughput_per_s == pytest.approx(1e3 / s.p50_ms)


def test_validate_identical_models_is_exact(mlp_path, mlp_data):
    data, labels = mlp_data
    res = validate(mlp_path, mlp_path, data, labels)
    o = res.outputs[0]
    assert res.samples == 32
    assert o.max_abs_err == 0.0 and o.cosine_min == pytest.approx(1.0) and o.top1_agreement == 1.0
    assert res.ref_accuracy == res.cand_accuracy


def test_validate_against_numpy_reference(mlp_path, mlp_data, tmp_path):
    data, labels = mlp_data
    cand = _perturbed(mlp_path, tmp_path)
    res = validate(mlp_path, cand, data, labels)
    x = np.load(data)["x"]
    ref = run_ort(mlp_path, {"x": x})[0].astype(np.float64)
    got = run_ort(cand, {"x": x})[0].astype(np.float64)
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    o = res.outputs[0]
    assert o.max_abs_err == pytest.approx(np.abs(ref - got).max(), rel=1e-5)
    assert o.mean_abs_err == pytest.approx(np.abs(ref - got).mean(), rel=1e-5)
    assert o.cosine_mean == pytest.approx(cos.mean(), abs=1e-6)
    assert o.cosine_min == pytest.approx(cos.min(), abs=1e-6)
    assert o.top1_agreement == pytest.approx(np.mean(ref.argmax(1) == got.argmax(1)))
    y = np.load(labels)
    assert res.cand_accuracy == pytest.approx(np.mean(got.argmax(1) == y))


def test_cosine_and_knn_helpers():
    a = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [0.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(cosine_rows(a, b), [1.0, 1.0, -1.0])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8))
    assert knn_agreement(x, x, k=5) == 1.0
    assert knn_agreement(x, rng.standard_normal((50, 8)), k=5) < 0.5


class _FakeClock:
    """A timer whose readings make every run of model k last ``durations[k]`` seconds, with an
    optional pseudo-random jitter; runs go round-robin over the models (compare_latency interleaves)."""

    def __init__(self, durations, jitter=0.0, seed=0):
        self.durations, self.jitter, self.now, self.calls = durations, jitter, 0.0, 0
        self.rng = np.random.default_rng(seed)

    def __call__(self):
        k = (self.calls // 2) % len(self.durations)
        if self.calls % 2:
            self.now += self.durations[k] * (1 + self.jitter * self.rng.standard_normal())
        self.calls += 1
        return self.now


def _two_models(tmp_path):
    from onnx import helper

    from tests.conftest import make_model, save, vinfo

    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vinfo("x", [1, 4])], [vinfo("y", [1, 4])])
    return [save(m, tmp_path / "a.onnx"), save(m, tmp_path / "b.onnx")]


def test_equal_timings_never_count_as_faster(tmp_path):
    from edgecomp.measure.bench import compare_latency

    feed = {"x": np.ones((1, 4), np.float32)}
    est = compare_latency(_two_models(tmp_path), feed, timer=_FakeClock([1.0, 1.0]), max_rounds=6)[0]
    assert est.ratio == pytest.approx(1.0) and not est.faster and est.rounds == 6  # undecided: all rounds used
    noisy = compare_latency(_two_models(tmp_path), feed, timer=_FakeClock([1.0, 1.0], jitter=0.2), max_rounds=8)[0]
    assert not noisy.faster


def test_a_real_speedup_is_found_in_few_rounds(tmp_path):
    from edgecomp.measure.bench import compare_latency

    feed = {"x": np.ones((1, 4), np.float32)}
    est = compare_latency(_two_models(tmp_path), feed, timer=_FakeClock([1.0, 0.8], jitter=0.05), max_rounds=12)[0]
    assert est.faster and est.ratio == pytest.approx(0.8, rel=0.05) and est.rounds == 3
    assert est.low <= est.ratio <= est.high < 1.0


def test_validate_takes_in_memory_models_feeds_and_labels(mlp_path, mlp_data, tmp_path):
    import onnx_ir as ir

    data, labels = mlp_data
    cand = _perturbed(mlp_path, tmp_path)
    from_files = validate(mlp_path, cand, data, labels)
    x, y = np.load(data)["x"], np.load(labels)
    in_memory = validate(ir.load(str(mlp_path)), ir.load(str(cand)), [{"x": x[i:i + 1]} for i in range(len(x))], y)
    assert in_memory.samples == from_files.samples == len(x)
    a, b = in_memory.outputs[0], from_files.outputs[0]
    assert (a.cosine_mean, a.max_abs_err, a.top1_agreement) == pytest.approx((b.cosine_mean, b.max_abs_err,
                                                                              b.top1_agreement), rel=1e-6)
    assert in_memory.cand_accuracy == pytest.approx(from_files.cand_accuracy)


def test_a_model_with_far_more_work_measures_slower(tmp_path):
    """Interleaved timing tells a ~100x heavier model from a light one (the ratio is computed, not 1.0)."""
    from onnx import TensorProto, helper

    from tests.conftest import make_model, save, vinfo

    def chain(n, width):
        rng = np.random.default_rng(0)
        nodes, inits, prev = [], {}, "x"
        for i in range(n):
            inits[f"w{i}"] = (rng.standard_normal((width, width)) / width).astype(np.float32)
            nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
            prev = f"h{i}"
        nodes.append(helper.make_node("Identity", [prev], ["y"]))
        return save(make_model(nodes, [vinfo("x", [1, width])], [vinfo("y", [1, width], TensorProto.FLOAT)], inits),
                    tmp_path / f"chain{n}x{width}.onnx")

    light, heavy = chain(1, 256), chain(12, 256)
    res = benchmark([light, heavy], threads=1, warmup=3, runs=30, feed={"x": np.ones((1, 256), np.float32)})
    assert res.models[1].ratio_to_first > 2.0, [m.p50_ms for m in res.models]


def test_bench_option_errors_name_the_option_and_the_cli_names_the_flag(mlp_path):
    from click.testing import CliRunner

    from edgecomp.cli import cli
    from edgecomp.errors import OptionError
    from edgecomp.measure.bench import pin_cpus

    with pytest.raises(OptionError, match="^runs must be >= 1, got 0"):
        benchmark([mlp_path], runs=0)
    with pytest.raises(OptionError, match="^warmup must be >= 0, got -1"):
        benchmark([mlp_path], warmup=-1)
    with pytest.raises(OptionError, match="^pin 'x' is not a list of CPUs"):
        pin_cpus("x")
    res = CliRunner().invoke(cli, ["bench", str(mlp_path), "--pin", "x"])
    assert res.exit_code == 1 and res.stderr.startswith("Error: --pin 'x' is not a list of CPUs"), res.output
