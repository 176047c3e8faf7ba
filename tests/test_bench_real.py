"""The pure pieces of benchmarks/bench_real.py (benchmarks/real_models.py), without network access.

A fake cache holds stand-ins for the fetched files (photos, tokenizer.json), so
the input builders run without pip; nothing here downloads anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper
from PIL import Image, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import real_models as rm  # noqa: E402

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", ",", "world", "!", "un", "una", "##ffa", "##ble", "naive", ".",
         "##a", "the", "a"]


def tokenizer() -> rm.WordPiece:
    return rm.WordPiece({token: i for i, token in enumerate(VOCAB)})


# -- WordPiece -------------------------------------------------------------------------


def test_wordpiece_splits_a_known_sentence():
    ids, mask = tokenizer().encode("Hello, World! Unaffable NAÏVE.", 12)
    words = ["[CLS]", "hello", ",", "world", "!", "una", "##ffa", "##ble", "naive", ".", "[SEP]", "[PAD]"]
    assert ids.tolist() == [VOCAB.index(w) for w in words]
    assert mask.tolist() == [1] * 11 + [0]
    assert ids.dtype == mask.dtype == np.int64


def test_wordpiece_takes_the_longest_piece_first_and_unk_for_unsplittable_words():
    tok = tokenizer()
    assert tok.pieces("unaffable") == ["una", "##ffa", "##ble"]  # "una", not "un": then "##ffable" has a split
    assert tok.pieces("unx") == ["[UNK]"]  # a word with no complete split is one [UNK], not a partial one
    assert tok.pieces("a" * 101) == ["[UNK]"]


def test_wordpiece_truncates_to_the_length_with_sep_last():
    ids, mask = tokenizer().encode("hello " * 40, 8)
    assert ids.tolist() == [2] + [4] * 6 + [3]
    assert mask.tolist() == [1] * 8


# -- input builders on a fake cache ------------------------------------------------------------


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """Stand-ins for the fetched files: one gradient photo per name (green = its index),
    a tokenizer.json with VOCAB and every word of the sentences; Pillow's built-in font instead of DejaVu Sans."""
    photos = tmp_path / f"{rm.SKIMAGE[0]}-{rm.SKIMAGE[1]}" / "skimage" / "data"
    photos.mkdir(parents=True)
    for index, name in enumerate(rm.PHOTOS):
        width, height = 60 + 7 * index, 50 + 3 * index
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[:, :, 0] = np.linspace(0, 255, width)[None, :]
        pixels[:, :, 1] = index * 10
        pixels[:, :, 2] = np.linspace(0, 255, height)[:, None]
        Image.fromarray(pixels).save(photos / name, format="PNG")
    target = tmp_path / f"{rm.TOKENIZER.package}-{rm.TOKENIZER.version}" / rm.TOKENIZER.inner
    target.parent.mkdir(parents=True)
    words = sorted({w for sentence in rm.sentences() for w in tokenizer().words(sentence)} - set(VOCAB))
    target.write_text(json.dumps({"model": {"vocab": {t: i for i, t in enumerate(VOCAB + words)}}}))
    monkeypatch.setattr(rm, "_font", lambda cache, size: ImageFont.load_default(size))
    return tmp_path


def test_calibration_and_held_out_photos_are_different_photos(fake_cache):
    views = rm.photo_views(fake_cache)
    assert len(views) == rm.SAMPLES
    photo_of = [int(np.asarray(v)[0, 0, 1]) // 10 for v in views]  # the green channel encodes the photo
    assert not set(photo_of[: rm.CALIB]) & set(photo_of[rm.CALIB:])
    assert len(set(photo_of[rm.CALIB:])) >= 8


@pytest.mark.parametrize("model", rm.MODELS, ids=lambda m: m.name)
def test_input_builders_give_the_declared_shapes_and_dtypes(fake_cache, model):
    inputs = model.inputs(fake_cache)
    assert set(inputs) == set(model.shapes)
    for name, array in inputs.items():
        assert array.shape == (rm.SAMPLES, *model.shapes[name])
        assert array.dtype == (np.int64 if name in ("input_ids", "attention_mask", "token_type_ids") else np.float32)
        assert np.isfinite(array).all()
    first = inputs[next(iter(model.shapes))]
    assert len({sample.tobytes() for sample in first}) == rm.SAMPLES  # distinct samples, not one repeated


def test_preprocessing_follows_the_packages():
    image = Image.new("RGB", (300, 200), (10, 20, 30))
    assert np.allclose(rm.nsfw_tensor(image)[5, 5], [30 - 104, 20 - 117, 10 - 123])  # BGR minus the Caffe mean
    line = rm.text_line_tensor(image, 48, 320)  # 300x200 -> 72x48, zero-padded to 320
    assert line.shape == (3, 48, 320)
    assert np.allclose(line[:, 10, 0], [(c / 255 - 0.5) / 0.5 for c in (30, 20, 10)], atol=1e-6)
    assert np.all(line[:, :, 72:] == 0) and np.all(line[:, :, 71] != 0)


def test_input_mismatches_names_each_problem():
    model = rm.MODELS[0]
    good = {"input:0": np.zeros((2, 224, 224, 3), np.float32)}
    graph = helper.make_graph([], "g", [helper.make_tensor_value_info("input:0", TensorProto.FLOAT, ["n", 224, 224, 3])],
                              [])
    assert rm.input_mismatches(model, good, rm.declared_inputs(graph)) == []
    nchw = helper.make_graph([], "g", [helper.make_tensor_value_info("input:0", TensorProto.FLOAT, [-1, 3, 224, 224])],
                             [])
    assert len(rm.input_mismatches(model, good, rm.declared_inputs(nchw))) == 1
    as_double = {"input:0": good["input:0"].astype(np.float64)}
    assert rm.input_mismatches(model, as_double, rm.declared_inputs(graph)) == ["input:0: float64, the graph declares float32"]


# -- fidelity helpers ------------------------------------------------------------------------------


def test_cosine_per_sample():
    ref = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [0.0, 0.0]])
    y = np.array([[3.0, 0.0], [-1.0, -1.0], [2.0, 0.0], [0.0, 0.0]])
    assert np.allclose(rm.cosine(y, ref), [1.0, -1.0, 0.0, 1.0])  # two all-zero samples agree


def test_sqnr_db_of_a_known_noise():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(8, 100))
    noise = rng.normal(size=ref.shape)
    noise *= np.sqrt(np.sum(ref**2) / np.sum(noise**2) / 100.0)  # noise power exactly 1% of the signal's
    assert rm.sqnr_db(ref + noise, ref) == pytest.approx(20.0)
    assert rm.sqnr_db(ref, ref) == float("inf")


def test_top1_agreement_and_mask_iou():
    ref = np.array([[[0.1, 0.9], [0.8, 0.2]], [[0.3, 0.7], [0.6, 0.4]]])  # [sample, time, class]
    y = np.array([[[0.2, 0.8], [0.1, 0.9]], [[0.4, 0.6], [0.7, 0.3]]])
    assert rm.top1_agreement(y, ref) == 0.75
    assert rm.mask_iou(np.array([0.1, 0.5, 0.6, 0.9]), np.array([0.4, 0.2, 0.7, 0.8]), 0.3) == pytest.approx(2 / 4)
    assert rm.mask_iou(np.zeros(3), np.zeros(3), 0.3) == 1.0


def test_file_bytes_counts_external_data(tmp_path):
    import onnx
    from onnx import numpy_helper

    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    assert rm.file_bytes(path) == path.stat().st_size + (tmp_path / "m.data").stat().st_size
    assert (tmp_path / "m.data").stat().st_size == 64 * 64 * 4
