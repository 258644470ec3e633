import numpy as np
import pytest

from edgecomp.errors import DataError
from edgecomp.quantize.calibration import HIST_BINS, ActivationStats, choose_range
from edgecomp.quantize.qparams import uint8_qparams


def _stats(samples, axis=-1, reservoir=64, hist=True):
    st = ActivationStats("x", axis)
    rng = np.random.default_rng(0)
    for x in samples:
        st.update_ranges(x, reservoir, rng)
    if hist:
        st.hist_lo, st.hist_hi = min(st.min, 0.0), max(st.max, 0.0)
        st.hist = np.zeros(HIST_BINS, np.int64)
        for x in samples:
            st.update_hist(x)
    return st


def _samples(seed=0):
    """Variable-length [1, L, 8] activations with one outlier channel."""
    rng = np.random.default_rng(seed)
    out = []
    for n in (3, 17, 9, 30, 1):
        x = rng.standard_normal((1, n, 8)).astype(np.float32)
        x[..., 3] *= 20
        out.append(x)
    return out


def test_streaming_stats_match_numpy_on_variable_shapes():
    xs = _samples()
    st = _stats(xs)
    allrows = np.concatenate([x.reshape(-1, 8) for x in xs])
    assert st.min == allrows.min() and st.max == allrows.max()
    np.testing.assert_array_equal(st.ch_min, allrows.min(0))
    np.testing.assert_array_equal(st.ch_max, allrows.max(0))
    assert st.hist.sum() == allrows.size
    assert st.rows.shape == (60, 8) and st.rows_seen == 60  # fewer rows than the reservoir: all kept
    assert {tuple(r) for r in st.rows} == {tuple(r) for r in allrows}


def test_reservoir_is_bounded():
    st = _stats([np.ones((1, 500, 4), np.float32)] * 10, reservoir=32, hist=False)
    assert st.rows.shape == (32, 4) and st.rows_seen == 5000


def test_channel_axis_for_conv_activations():
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    st = _stats([x], axis=1, hist=False)
    np.testing.assert_array_equal(st.ch_max, x.max(axis=(0, 2, 3)))


def test_minmax_and_percentile_ranges_against_numpy():
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((1, n, 8)).astype(np.float32) * 3 + 1 for n in (500, 1700, 900)]
    st = _stats(xs)
    allv = np.concatenate([x.ravel() for x in xs])
    assert choose_range(st, "minmax") == (allv.min(), allv.max())
    lo, hi = choose_range(st, "percentile", percentile=99.0)
    bin_w = (st.hist_hi - st.hist_lo) / HIST_BINS
    assert lo == pytest.approx(np.percentile(allv, 1.0), abs=2 * bin_w)
    assert hi == pytest.approx(np.percentile(allv, 99.0), abs=2 * bin_w)


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_clipping_methods_clip_a_heavy_tail_and_lower_error(method):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 20000, 1)).astype(np.float32)
    x[0, :5, 0] = [40, -35, 38, 60, -50]  # a few outliers stretch min/max ~10x
    st = _stats([x])
    lo, hi = choose_range(st, method)
    assert -50 <= lo < 0 < hi <= 60 and (lo, hi) != (-50, 60)  # some clipping inside [min, max]

    def mse(lo, hi):
        s, zp = uint8_qparams(lo, hi)
        q = (np.clip(np.round(x / s) + zp, 0, 255) - zp) * s
        return float(((q - x) ** 2).mean())

    if method == "mse":
        assert mse(lo, hi) < mse(*choose_range(st, "minmax"))


def test_qparams_make_zero_exact():
    scale, zp = uint8_qparams(-1.3, 4.2)
    assert scale == pytest.approx(5.5 / 255)
    assert int(zp) == round(1.3 / (5.5 / 255))  # real 0 sits exactly on level zp
    assert uint8_qparams(0.5, 2.0)[1] == 0  # range widened to include 0


def test_unknown_method_and_missing_histogram():
    st = _stats(_samples(), hist=False)
    with pytest.raises(DataError, match="unknown calibration method"):
        choose_range(st, "magic")
    with pytest.raises(DataError, match="needs histograms"):
        choose_range(st, "percentile")


def test_an_overflowing_float_model_is_refused_in_one_line(tmp_path):
    """A float model whose activations overflow to Inf (then NaN) on the calibration data has no
    range to quantize to: one line naming the value, not an internal error from the scale math."""
    import onnx
    from click.testing import CliRunner
    from onnx import helper, numpy_helper

    from edgecomp.cli import cli

    w1 = numpy_helper.from_array(np.full((4, 8), 1e30, np.float32), "w1")
    w2 = numpy_helper.from_array(np.full((8, 4), 1e30, np.float32), "w2")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                           helper.make_node("MatMul", ["r", "w2"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])], [w1, w2])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "x.npz", x=np.ones((4, 4), np.float32) * 1e10)
    res = CliRunner().invoke(cli, ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"),
                                   "--calibration", str(tmp_path / "x.npz"), "--families", "all"])
    assert res.exit_code == 1 and "NaN or Inf" in res.output and "internal error" not in res.output, res.output
    assert len([line for line in res.output.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "q.onnx").exists()
