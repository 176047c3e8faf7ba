"""Data for calibration and evaluation: image folders, .npz files, readers.

Every source is turned into batches of onnxruntime feeds (input name ->
array), streamed so that memory does not grow with the number of samples.
"""

from __future__ import annotations

import enum
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx_ir as ir
from PIL import Image, UnidentifiedImageError

from fgq_onnx.errors import FgqError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


class CalibrationDataReader(Protocol):
    """onnxruntime's protocol: get_next() returns a feed dict, then None when done."""

    def get_next(self) -> dict[str, np.ndarray] | None: ...


class Layout(str, enum.Enum):
    NCHW = "nchw"
    NHWC = "nhwc"


class Color(str, enum.Enum):
    RGB = "rgb"
    BGR = "bgr"
    GREY = "grey"


@dataclass(frozen=True)
class ImageOptions:
    """How images become tensors; unset fields are inferred from the model's input."""

    size: tuple[int, int] | None = None  # (height, width) after the centre crop
    resize: int | None = None  # shorter side before cropping; default: the crop's larger side
    layout: Layout | None = None
    color: Color | None = None
    scale: float = 1.0 / 255.0  # pixel values are multiplied by this first
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int | None, ...]  # None for a dynamic dimension
    dtype: np.dtype

    @classmethod
    def of(cls, value: ir.Value) -> InputSpec:
        shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (value.shape or ()))  # -1: dynamic (Paddle)
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        return cls(value.name, shape, np.dtype(dtype))

    @property
    def batch(self) -> int | None:
        return self.shape[0] if self.shape else None


def model_inputs(model: ir.Model) -> list[InputSpec]:
    """The inputs a user must feed (initializers listed as inputs excluded)."""
    return [InputSpec.of(v) for v in model.graph.inputs if v.const_value is None]


@dataclass(frozen=True)
class _ImageFormat:
    layout: Layout
    color: Color
    height: int
    width: int


MAX_IMAGE_PIXELS = 1 << 26  # 8192 x 8192: a model claiming more would have every image resized to it


def _image_format(spec: InputSpec, options: ImageOptions) -> _ImageFormat:
    if len(spec.shape) != 4:
        raise FgqError(f"input '{spec.name}' has shape {list(spec.shape)}: images need a 4-D input (NCHW or NHWC)")
    layout = options.layout
    if layout is None:
        layout = Layout.NCHW if spec.shape[1] in (1, 3) else Layout.NHWC if spec.shape[3] in (1, 3) else None
    if layout is None:
        raise FgqError(f"cannot tell the channel axis of input '{spec.name}' {list(spec.shape)}; give --layout")
    channels, height, width = (spec.shape[1], spec.shape[2], spec.shape[3]) if layout is Layout.NCHW else (spec.shape[3], spec.shape[1], spec.shape[2])
    color = options.color or (Color.GREY if channels == 1 else Color.RGB)
    if channels is not None and channels != (1 if color is Color.GREY else 3):
        raise FgqError(f"input '{spec.name}' has {channels} channels but --color is {color.value}")
    if options.size is not None:
        height, width = options.size
    if height is None or width is None:
        raise FgqError(f"input '{spec.name}' has a dynamic image size; give --size HEIGHT WIDTH")
    if not (height > 0 and width > 0 and height * width <= MAX_IMAGE_PIXELS):  # checked before any image is resized to it
        raise FgqError(f"input '{spec.name}' takes {height} x {width} images; calibration images must have 1 to {MAX_IMAGE_PIXELS:,} pixels (give --size)")
    return _ImageFormat(layout, color, height, width)


def load_image(path: Path, fmt: _ImageFormat, options: ImageOptions) -> np.ndarray:
    """One image -> float32 array in the model's layout, without the batch axis."""
    with Image.open(path) as image:
        image = image.convert("L" if fmt.color is Color.GREY else "RGB")
        side = options.resize or max(fmt.height, fmt.width)
        ratio = side / min(image.size)
        image = image.resize((max(fmt.width, round(image.width * ratio)), max(fmt.height, round(image.height * ratio))), Image.Resampling.BILINEAR)
        left, top = (image.width - fmt.width) // 2, (image.height - fmt.height) // 2
        image = image.crop((left, top, left + fmt.width, top + fmt.height))
        pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels.reshape(fmt.height, fmt.width, -1)
    if fmt.color is Color.BGR:
        pixels = pixels[..., ::-1]
    pixels = (pixels * options.scale - np.asarray(options.mean, np.float32)) / np.asarray(options.std, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1) if fmt.layout is Layout.NCHW else pixels, dtype=np.float32)


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


@dataclass(frozen=True)
class Split:
    """Which samples a Dataset reads: the last of every run of `every` samples is held out of calibration."""

    every: int
    held_out: bool  # True: read only the held-out samples; False: only the others

    def keeps(self, index: np.ndarray) -> np.ndarray:
        return (index % self.every == self.every - 1) == self.held_out

    def count(self, total: int) -> int:
        return int(self.keeps(np.arange(total)).sum())


class Dataset:
    """Batches of feeds (and labels, where the source has them) from one source.

    `split` (folders and .npz files only) reads one side of a calibration /
    held-out split; `limit` then caps the samples read, from the start.
    """

    def __init__(self, source, inputs: list[InputSpec], *, options: ImageOptions = ImageOptions(), batch_size: int = 32, limit: int | None = None, labelled: bool = False, split: Split | None = None):
        if batch_size < 1:
            raise FgqError(f"batch size must be at least 1, got {batch_size}")
        self.inputs, self.options, self.labelled = inputs, options, labelled
        self.skipped = 0  # unreadable images
        self._warned: set[Path] = set()  # unreadable images already reported (the data may be read more than once)
        self.dropped = 0  # samples left out to fill a fixed batch size
        self.classes: list[str] = []
        self._source = source
        self.split = split
        if hasattr(source, "get_next"):
            if split is not None:
                raise ValueError("a CalibrationDataReader cannot be split")
            self.size = None
            self._batches = self._reader_batches
            return
        path = Path(source)
        if path.is_dir():
            self._setup_folder(path)
        elif path.is_file() and path.suffix == ".npz":
            self._setup_npz(path)
        elif path.exists():
            raise FgqError(f"data '{path}' is neither an image folder nor an .npz file")
        else:
            raise FgqError(f"data path '{path}' does not exist")
        self.total = self.size  # samples in the source, before the split and the limit
        if split is not None:
            self.size = split.count(self.size)
        fixed = inputs[0].batch if self._per_sample else None
        self.batch_size = fixed or batch_size
        if limit is not None:
            self.size = min(self.size, limit)
        if fixed and fixed > 1:
            self.dropped = self.size % fixed
            self.size -= self.dropped

    # -- sources -----------------------------------------------------------------

    def _setup_folder(self, folder: Path) -> None:
        if len(self.inputs) != 1:
            raise FgqError(f"an image folder can feed a model with one input; this one has {len(self.inputs)}: use an .npz")
        self._format = _image_format(self.inputs[0], self.options)
        if self.labelled:
            self.classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
            if not self.classes:
                raise FgqError(f"'{folder}' has no class sub-folders (one folder per class is needed for labels)")
            self._files = [(f, i) for i, name in enumerate(self.classes) for f in image_files(folder / name)]
        else:
            self._files = [(f, -1) for f in image_files(folder)]
        if not self._files:
            raise FgqError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in '{folder}'")
        self.size, self._per_sample = len(self._files), True
        self._batches = self._folder_batches
        if self.split is not None:
            self._files = [f for f, kept in zip(self._files, self.split.keeps(np.arange(len(self._files)))) if kept]

    def _setup_npz(self, path: Path) -> None:
        arrays = _npz_members(path)
        missing = [spec.name for spec in self.inputs if spec.name not in arrays]
        if missing:
            raise FgqError(f"'{path}' has no array for input(s) {missing}; it holds {sorted(arrays)}")
        if self.labelled and "y" not in arrays:
            raise FgqError(f"'{path}' has no labels: an array 'y' is needed")
        ranks = {len(arrays[s.name].shape) - len(s.shape) for s in self.inputs}
        if ranks not in ({0}, {1}):
            raise FgqError(f"arrays in '{path}' must have the rank of their input (samples along the batch axis) or one more (one feed per entry)")
        self._per_sample = ranks == {0}
        scalars = [s.name for s in self.inputs if self._per_sample and not s.shape]
        if scalars:
            raise FgqError(f"input '{scalars[0]}' is a scalar, so '{path}' cannot hold its samples along a batch axis: give every array one more axis (one feed per entry)")
        for spec in self.inputs:
            _check_array(arrays[spec.name], spec, self._per_sample)
        self._arrays = {s.name: arrays[s.name] for s in self.inputs}
        self._labels = arrays.get("y")
        counts = {a.shape[0] for a in self._arrays.values()} | ({self._labels.shape[0]} if self.labelled else set())
        if len(counts) != 1:
            raise FgqError(f"arrays in '{path}' disagree on the number of samples: {sorted(counts)}")
        self.size = counts.pop()
        if self._labels is not None and self._labels.shape[0] != self.size:
            self._labels = None  # unused labels that do not match the inputs
        if self.size == 0:
            raise FgqError(f"'{path}' holds no samples")
        self._batches = self._npz_batches

    # -- iteration ---------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        return self._batches()

    def samples_in(self, feed: dict[str, np.ndarray]) -> int:
        """How many samples one feed holds: one per entry of a one-feed-per-entry .npz."""
        if not getattr(self, "_per_sample", True):
            return 1
        first = next(iter(feed.values()), None)
        return len(first) if first is not None and np.ndim(first) else 1

    def _folder_batches(self):
        name, dtype = self.inputs[0].name, self.inputs[0].dtype
        images, labels, produced = [], [], 0
        self.skipped = 0
        for path, label in self._files:
            if produced + len(images) == self.size:
                break
            try:
                images.append(load_image(path, self._format, self.options))
                labels.append(label)
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
                self.skipped += 1
                if path not in self._warned:
                    self._warned.add(path)
                    warnings.warn(f"skipped unreadable image '{path}': {error}", stacklevel=2)
                continue
            if len(images) == self.batch_size:
                yield {name: np.stack(images).astype(dtype)}, np.array(labels)
                produced += len(images)
                images, labels = [], []
        if images and self.inputs[0].batch in (None, len(images)):
            yield {name: np.stack(images).astype(dtype)}, np.array(labels)

    def _npz_batches(self):
        """Batches of `batch_size` samples (or single entries of a one-feed-per-entry file) of the split's side."""
        specs = {spec.name: spec for spec in self.inputs}
        pending: list[tuple[dict[str, np.ndarray], np.ndarray | None]] = []
        produced = 0
        for chunk in self._npz_selected(self.batch_size if self._per_sample else 1):
            if not self._per_sample:  # one feed per entry; a 0-d entry stays an array
                yield {name: _cast_array(np.asarray(rows[0]), specs[name]) for name, rows in chunk[0].items()}, chunk[1]
                produced += 1
                if produced == self.size:
                    return
                continue
            pending.append(chunk)
            while pending and sum(_rows(block) for block, _ in pending) >= self.batch_size:
                feed, labels, pending = _take_rows(pending, min(self.batch_size, self.size - produced))
                yield {name: _cast_array(rows, specs[name]) for name, rows in feed.items()}, labels
                produced += _rows(feed)
                if produced == self.size:
                    return
        if pending and produced < self.size:
            feed, labels, _ = _take_rows(pending, self.size - produced)
            yield {name: _cast_array(rows, specs[name]) for name, rows in feed.items()}, labels

    def _npz_selected(self, step: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Blocks of up to `step` leading-axis entries, read in order, with the other side of the split left out."""
        streams = {name: member.chunks(step) for name, member in self._arrays.items()}
        labels = self._labels.chunks(step) if self._labels is not None else None
        for start in range(0, self.total, step):
            count = min(step, self.total - start)
            chunk = {name: next(stream)[:count] for name, stream in streams.items()}
            label = next(labels)[:count] if labels is not None else None
            if self.split is not None:
                kept = self.split.keeps(np.arange(start, start + count))
                if not kept.any():
                    continue
                chunk = {name: rows[kept] for name, rows in chunk.items()}
                label = label[kept] if label is not None else None
            yield chunk, label

    def _reader_batches(self):
        while (feed := self._source.get_next()) is not None:
            yield {k: np.asarray(v) for k, v in feed.items()}, None


def _rows(feed: dict[str, np.ndarray]) -> int:
    return len(next(iter(feed.values())))


def _take_rows(pending: list, count: int) -> tuple[dict[str, np.ndarray], np.ndarray | None, list]:
    """The first `count` rows of the pending blocks as one block, and the blocks left."""
    names = list(pending[0][0])
    feed = {name: np.concatenate([block[name] for block, _ in pending]) for name in names}
    labels = np.concatenate([label for _, label in pending]) if pending[0][1] is not None else None
    rest_feed = {name: rows[count:] for name, rows in feed.items()}
    rest = [(rest_feed, labels[count:] if labels is not None else None)] if len(next(iter(rest_feed.values()))) else []
    return {name: rows[:count] for name, rows in feed.items()}, labels[:count] if labels is not None else None, rest


class _NpzMember:
    """One array of an .npz, read a block of leading-axis entries at a time (never whole)."""

    def __init__(self, path: Path, member: str, shape: tuple[int, ...], dtype: np.dtype):
        self.path, self.member, self.shape, self.dtype = path, member, shape, dtype

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        entry = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open(self.member) as stream:
                _read_npy_header(stream)
                for start in range(0, self.shape[0], rows):
                    count = min(rows, self.shape[0] - start)
                    data = stream.read(count * entry)
                    if len(data) != count * entry:
                        raise FgqError(f"'{self.path}': array '{self.member}' is truncated")
                    yield np.frombuffer(data, self.dtype).reshape(count, *self.shape[1:])
        except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as error:
            raise FgqError(f"cannot read '{self.path}': {error}") from None


def _read_npy_header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(stream)


def _npz_members(path: Path) -> dict[str, _NpzMember]:
    """The arrays of an .npz by name, from their headers only: shapes and dtypes, no data."""
    members = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as stream:
                    shape, fortran_order, dtype = _read_npy_header(stream)
                name = info.filename[: -len(".npy")]
                if dtype.hasobject:
                    raise FgqError(f"'{path}': array '{name}' holds Python objects, which are not loaded (pickle is unsafe)")
                if fortran_order and len(shape) > 1:
                    raise FgqError(f"'{path}': array '{name}' is in Fortran order; save it with np.ascontiguousarray")
                if not shape:
                    raise FgqError(f"'{path}': array '{name}' is a scalar; arrays need a sample axis")
                members[name] = _NpzMember(path, info.filename, shape, dtype)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:  # not a zip, truncated, bad header
        raise FgqError(f"cannot read '{path}': {error}") from None
    return members


def _check_array(array: _NpzMember, spec: InputSpec, per_sample: bool) -> None:
    """Check an array's shape and dtype against the model input before reading any of it."""
    sample_shape = array.shape[1:]
    expected = spec.shape[1:] if per_sample else spec.shape
    if len(sample_shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, sample_shape)):
        raise FgqError(f"array '{spec.name}' has samples of shape {list(sample_shape)}, but the input takes {list(expected)}")
    numeric = np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    fits = array.dtype == spec.dtype or (np.issubdtype(spec.dtype, np.floating) and numeric)
    fits = fits or (np.issubdtype(spec.dtype, np.integer) and np.issubdtype(array.dtype, np.integer) and np.can_cast(array.dtype, spec.dtype, "same_kind"))
    if not fits:
        raise FgqError(f"array '{spec.name}' is {array.dtype}, which does not fit the input's {spec.dtype}")


def _cast_array(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A block of samples in the input's dtype; integers must fit its range (checked per block)."""
    if array.dtype == spec.dtype:
        return array
    if np.issubdtype(spec.dtype, np.integer) and array.size:
        info = np.iinfo(spec.dtype)
        if array.min() < info.min or array.max() > info.max:
            raise FgqError(f"array '{spec.name}' holds values outside the input's {spec.dtype} range")
    return array.astype(spec.dtype)
