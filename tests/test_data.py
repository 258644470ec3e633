import numpy as np
import pytest

from edgecomp.data import Dataset, InputSpec, load_data, load_labels, parse_shape, synthesize_feed
from edgecomp.errors import DataError, InputFileError

SPECS = [InputSpec("input_ids", np.dtype(np.int64), ("batch", "seq")),
         InputSpec("attention_mask", np.dtype(np.int64), ("batch", "seq"))]


def test_npz_with_sample_axis_feeds_one_sample_at_a_time(tmp_path):
    ids = np.arange(30).reshape(5, 6)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    ds = load_data(tmp_path / "d.npz", SPECS)
    assert len(ds) == 5
    feeds = list(ds)
    assert feeds[2]["input_ids"].shape == (1, 6)
    np.testing.assert_array_equal(feeds[2]["input_ids"], ids[2:3])


def test_directory_of_npz_allows_different_shapes(tmp_path):
    for i, n in enumerate([3, 7, 5]):
        np.savez(tmp_path / f"{i:03d}.npz", input_ids=np.ones((1, n), np.int32), attention_mask=np.ones((1, n), np.int64))
    ds = load_data(tmp_path, SPECS)
    feeds = list(ds.feeds_for(SPECS))
    assert [f["input_ids"].shape[1] for f in feeds] == [3, 7, 5]
    assert all(f["input_ids"].dtype == np.int64 for f in feeds)  # int32 ids cast to the model's int64


def test_wrong_names_say_what_is_missing(tmp_path):
    np.savez(tmp_path / "d.npz", ids=np.ones((2, 4)), attention_mask=np.ones((2, 4)))
    with pytest.raises(DataError, match=r"missing \['input_ids'\].*unexpected \['ids'\]"):
        load_data(tmp_path / "d.npz", SPECS)


def test_fixed_dim_mismatch_is_reported():
    spec = [InputSpec("x", np.dtype(np.float32), ("N", 3, 8, 8))]
    with pytest.raises(DataError, match="needs size 3 at axis 1"):
        synthesize_feed(spec, {"x": (1, 4, 8, 8)})


def test_unequal_sample_counts_and_empty_inputs(tmp_path):
    np.savez(tmp_path / "d.npz", a=np.ones((2, 4)), b=np.ones((3, 4)))
    with pytest.raises(DataError, match="different sample counts"):
        Dataset(tmp_path / "d.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .npz files"):
        Dataset(tmp_path / "empty")
    with pytest.raises(InputFileError, match="not found"):
        Dataset(tmp_path / "nope.npz")


def test_parse_shape_and_dtype():
    assert parse_shape("1x3x224x224") == ((1, 3, 224, 224), None)
    assert parse_shape("1x128:int64") == ((1, 128), np.dtype(np.int64))
    with pytest.raises(DataError, match="write it like"):
        parse_shape("1,3")


def test_synthesized_feed_defaults_symbolic_dims_and_takes_shapes():
    feed = synthesize_feed(SPECS)  # batch 1, sequence 128 (documented defaults)
    assert feed["input_ids"].shape == (1, 128) and feed["attention_mask"].shape == (1, 128)
    feed = synthesize_feed(SPECS, {"input_ids": (1, 12), "attention_mask": (1, 12)})
    assert feed["attention_mask"].sum() == 12 and feed["input_ids"].dtype == np.int64


def test_labels_must_match_sample_count(tmp_path):
    np.save(tmp_path / "y.npy", np.arange(4))
    assert load_labels(tmp_path / "y.npy", 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(DataError, match="hold 4 entries but DATA has 5"):
        load_labels(tmp_path / "y.npy", 5)


def test_arrays_without_sample_axis_and_npz_labels(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.float32(3.0))
    with pytest.raises(DataError, match="no sample axis"):
        Dataset(tmp_path / "d.npz")
    np.savez(tmp_path / "y.npz", y=np.arange(3))
    with pytest.raises(DataError, match="labels"):
        load_labels(tmp_path / "y.npz", 3)
