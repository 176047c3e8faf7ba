"""Reading .npz data block by block: the batches equal np.load's, bad archives are refused cleanly."""

import zipfile

import numpy as np
import pytest

from fgq_onnx.data import Dataset, InputSpec
from fgq_onnx.errors import FgqError

IMAGE = InputSpec("x", (None, 1, 4, 4), np.dtype(np.float32))


def batches(path, spec=IMAGE, **kwargs):
    return list(Dataset(path, [spec], **kwargs))


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
@pytest.mark.parametrize("batch_size, limit", [(4, None), (5, None), (64, None), (3, 7)])
def test_batches_equal_the_whole_array(tmp_path, save, batch_size, limit):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(23, 1, 4, 4)).astype(np.float64), rng.integers(0, 10, 23)
    save(tmp_path / "d.npz", x=x, y=y)
    got = batches(tmp_path / "d.npz", batch_size=batch_size, limit=limit, labelled=True)
    count = limit or len(x)
    assert [len(b["x"]) for b, _ in got] == [min(batch_size, count - s) for s in range(0, count, batch_size)]
    assert all(b["x"].dtype == np.float32 for b, _ in got)  # cast to the input's dtype
    np.testing.assert_array_equal(np.concatenate([b["x"] for b, _ in got]), x[:count].astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([labels for _, labels in got]), y[:count])


def test_one_feed_per_entry(tmp_path):
    scalars = np.arange(5, dtype=np.float32)
    np.savez(tmp_path / "d.npz", t=scalars)
    got = batches(tmp_path / "d.npz", InputSpec("t", (), np.dtype(np.float32)))
    assert [(feed["t"].shape, float(feed["t"])) for feed, _ in got] == [((), float(v)) for v in scalars]


def test_truncated_member_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((8, 1, 4, 4), np.float32))
    with zipfile.ZipFile(path) as archive:
        header = archive.read("x.npy")[:128]  # npy header only: the data is gone
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", header + b"\0" * 100)
    data = Dataset(path, [IMAGE], batch_size=4)  # the header still claims 8 samples
    with pytest.raises(FgqError, match="truncated"):
        list(data)


@pytest.mark.parametrize("array, says", [
    (np.asfortranarray(np.zeros((3, 1, 4, 4), np.float32)), "Fortran order"),
    (np.array(1.0, np.float32), "scalar"),
    (np.zeros((3, 1, 4, 4), np.complex64), "does not fit"),
])
def test_refused_before_reading(tmp_path, array, says):
    np.savez(tmp_path / "d.npz", x=array)
    with pytest.raises(FgqError, match=says):
        Dataset(tmp_path / "d.npz", [IMAGE])


def test_integers_outside_the_input_dtype_are_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.array([[1], [2**40]], np.int64))
    with pytest.raises(FgqError, match="outside"):
        batches(tmp_path / "d.npz", InputSpec("x", (None, 1), np.dtype(np.int32)))
