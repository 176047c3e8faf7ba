"""Train the embedded default model: a small ResNet on Fashion-MNIST.

Produces, in --out-dir (default: this script's folder):

* ``fashion_mnist_resnet.onnx``     fp32 model, BatchNorm folded into Conv
* ``fashion_mnist_resnet_bn.onnx``  same weights, BatchNorm kept as
                                    separate BatchNormalization nodes
* ``fashion_mnist_resnet.json``     metadata (onnxruntime fp32 top-1, ...)
* ``fashion_mnist_test.npz``        held-out test split: ``input`` float32
                                    [n,1,28,28] = pixel/255, ``y`` int64
* ``calib/``                        320 calibration PNGs (32 per class)
                                    drawn from the training split

Model contract: input ``input`` float32 [batch, 1, 28, 28] with pixel values
in [0, 1] (pixel / 255, no mean/std normalisation); output ``logits``
float32 [batch, 10]. The batch axis is dynamic.

The idx files are read directly with gzip + numpy (no torchvision).

Usage::

    python models/train_fashion_mnist.py [--epochs 5] [--seed 0] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = [
    "tshirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
]
CALIB_PER_CLASS = 32
MAX_NPZ_BYTES = 12 * 1024 * 1024  # fall back to the first 5,000 images above this
OPSET = 17


# --------------------------------------------------------------------------- data


def read_idx_images(path: Path) -> np.ndarray:
    """uint8 [n, 28, 28] from a gzipped idx3 file (pixels start at byte 16)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    assert int.from_bytes(raw[0:4], "big") == 0x00000803, f"{path}: not idx3-ubyte"
    n, rows, cols = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def read_idx_labels(path: Path) -> np.ndarray:
    """int64 [n] from a gzipped idx1 file (labels start at byte 8)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    assert int.from_bytes(raw[0:4], "big") == 0x00000801, f"{path}: not idx1-ubyte"
    n = int.from_bytes(raw[4:8], "big")
    labels = np.frombuffer(raw, dtype=np.uint8, offset=8)
    assert labels.size == n
    return labels.astype(np.int64)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    x = read_idx_images(DATA_DIR / f"{prefix}-images-idx3-ubyte.gz")
    y = read_idx_labels(DATA_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    assert len(x) == len(y)
    return x, y


def to_input(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [n,28,28] -> float32 [n,1,28,28] in [0, 1]. The model's only preprocessing."""
    return (images_u8.astype(np.float32) / 255.0)[:, None, :, :]


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Per-sample random crop (zero padding `pad`) and random horizontal flip."""
    n, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # [n, h, 1]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # [n, 1, w]
    out = xp[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


# -------------------------------------------------------------------------- model


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut (1x1 conv-BN when the shape changes), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem conv, 3 stages of one basic block (24 -> 48 -> 96, stride 2 between
    stages: 28x28 -> 14x14 -> 7x7), global average pool, Linear to 10 classes."""

    def __init__(self, widths: tuple[int, int, int] = (24, 48, 96), num_classes: int = 10):
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(nn.Conv2d(1, w1, 3, 1, 1, bias=False), nn.BatchNorm2d(w1), nn.ReLU())
        self.stage1 = BasicBlock(w1, w1, 1)
        self.stage2 = BasicBlock(w1, w2, 2)
        self.stage3 = BasicBlock(w2, w3, 2)
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


# ---------------------------------------------------------------------- train/eval


@torch.no_grad()
def torch_top1(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i:i + batch]).contiguous(memory_format=torch.channels_last)
        correct += (model(xb).argmax(1).numpy() == y[i:i + batch]).sum()
    return 100.0 * correct / len(x)


def ort_top1(onnx_path: Path, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> tuple[float, np.ndarray]:
    """onnxruntime top-1 (%) and the full logits array."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(["logits"], {"input": x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return 100.0 * float((logits.argmax(1) == y).mean()), logits


def train(model: nn.Module, x_train: np.ndarray, y_train: np.ndarray, epochs: int, seed: int,
          batch_size: int = 128, max_lr: float = 0.2, weight_decay: float = 5e-4) -> None:
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(x_train)
    y_all = torch.from_numpy(y_train)
    steps_per_epoch = len(x_all) // batch_size  # drop the ragged last batch
    opt = torch.optim.SGD(model.parameters(), lr=max_lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, epochs=epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.25)
    for epoch in range(epochs):
        model.train()
        t0, loss_sum, correct = time.time(), 0.0, 0
        perm = torch.randperm(len(x_all), generator=gen)
        for step in range(steps_per_epoch):
            idx = perm[step * batch_size:(step + 1) * batch_size]
            xb = augment(x_all[idx], gen).contiguous(memory_format=torch.channels_last)
            yb = y_all[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item()
            correct += (logits.argmax(1) == yb).sum().item()
        n = steps_per_epoch * batch_size
        print(f"epoch {epoch + 1}/{epochs}: loss {loss_sum / steps_per_epoch:.4f}  "
              f"train acc {100.0 * correct / n:.2f}%  ({time.time() - t0:.0f}s)", flush=True)


# ------------------------------------------------------------------------- export


def export_onnx(model: nn.Module, path: Path, keep_batchnorm: bool) -> None:
    """Legacy (TorchScript) exporter, opset 17, dynamic batch.

    keep_batchnorm=False: eval-mode export, the exporter folds BN into Conv.
    keep_batchnorm=True:  TrainingMode.PRESERVE + no constant folding keeps
                          BatchNormalization nodes (in inference mode, since the
                          module itself is in eval mode).
    """
    model = model.eval().to(memory_format=torch.contiguous_format)
    extra = {}
    if keep_batchnorm:
        extra = dict(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 28, 28),),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        **extra,
    )
    proto = onnx.load(str(path))
    if keep_batchnorm:
        inline_identity_initializers(proto)
        onnx.save(proto, str(path))
    onnx.checker.check_model(proto, full_check=True)


def inline_identity_initializers(proto: onnx.ModelProto) -> None:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer.

    Without constant folding the exporter deduplicates equal initializers and
    reads the duplicate through an Identity node. This happens here because the
    residual branch BN bias and the shortcut BN bias receive identical gradients
    (they are summed) from the same zero init, so they stay equal. Inlining them
    keeps every BatchNormalization parameter a plain initializer.
    """
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    for node in [n for n in graph.node if n.op_type == "Identity" and n.input[0] in inits]:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[node.input[0]])
        copy.name = node.output[0]
        graph.initializer.append(copy)
        graph.node.remove(node)


def op_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------------- side data


def write_calib(out_dir: Path, x_train_u8: np.ndarray, y_train: np.ndarray, seed: int) -> int:
    """32 training images per class as 8-bit greyscale PNGs named <index>_<class>.png."""
    calib_dir = out_dir / "calib"
    calib_dir.mkdir(parents=True, exist_ok=True)
    for old in calib_dir.glob("*.png"):
        old.unlink()
    rng = np.random.default_rng(seed)
    count = 0
    for c, name in enumerate(CLASSES):
        picks = np.sort(rng.choice(np.flatnonzero(y_train == c), CALIB_PER_CLASS, replace=False))
        for i in picks:
            Image.fromarray(x_train_u8[i]).save(calib_dir / f"{i:05d}_{name}.png")
            count += 1
    return count


def write_test_npz(path: Path, x_test: np.ndarray, y_test: np.ndarray) -> int:
    """All 10,000 test images if the compressed file stays under 12 MB, else the first 5,000."""
    for n in (len(x_test), 5000):
        np.savez_compressed(path, input=x_test[:n], y=y_test[:n])
        if path.stat().st_size <= MAX_NPZ_BYTES:
            return n
    raise RuntimeError(f"{path} is larger than {MAX_NPZ_BYTES} bytes even with 5,000 images")


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default: 5)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent,
                        help="output folder (default: this script's folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed for init, shuffling, augmentation, calib pick")
    args = parser.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    x_train_u8, y_train = load_split("train")
    x_test_u8, y_test = load_split("test")
    x_train, x_test = to_input(x_train_u8), to_input(x_test_u8)
    print(f"train {x_train.shape}, test {x_test.shape}")

    n_calib = write_calib(out_dir, x_train_u8, y_train, args.seed)
    npz_path = out_dir / "fashion_mnist_test.npz"
    n_test = write_test_npz(npz_path, x_test, y_test)
    x_eval, y_eval = x_test[:n_test], y_test[:n_test]
    print(f"wrote {n_calib} calibration PNGs and {npz_path.name} ({n_test} test images)")

    model = SmallResNet().to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"SmallResNet: {n_params} parameters ({n_params * 4 / 1e6:.2f} MB fp32)")

    t0 = time.time()
    train(model, x_train, y_train, args.epochs, args.seed)
    train_seconds = time.time() - t0
    acc_torch = torch_top1(model, x_eval, y_eval)
    print(f"training took {train_seconds:.0f}s; torch top-1 {acc_torch:.2f}%")

    folded = out_dir / "fashion_mnist_resnet.onnx"
    export_onnx(model, folded, keep_batchnorm=False)
    ops = op_counts(folded)
    assert "BatchNormalization" not in ops, f"BN not folded: {ops}"
    acc_ort, logits = ort_top1(folded, x_eval, y_eval)
    print(f"{folded.name}: ops {ops}; onnxruntime top-1 {acc_ort:.2f}%")
    assert abs(acc_ort - acc_torch) <= 0.1, f"onnxruntime {acc_ort:.2f}% vs torch {acc_torch:.2f}%"

    with_bn = out_dir / "fashion_mnist_resnet_bn.onnx"
    export_onnx(model, with_bn, keep_batchnorm=True)
    ops_bn = op_counts(with_bn)
    assert ops_bn.get("BatchNormalization", 0) > 0, f"no BatchNormalization nodes: {ops_bn}"
    acc_ort_bn, logits_bn = ort_top1(with_bn, x_eval, y_eval)
    max_diff = float(np.abs(logits - logits_bn).max())
    print(f"{with_bn.name}: ops {ops_bn}; top-1 {acc_ort_bn:.2f}%; max |logits diff| vs folded {max_diff:.2e}")
    assert max_diff < 1e-4, f"BN-preserved export differs from folded export by {max_diff}"

    proto = onnx.load(str(folded))
    meta = {
        "model": folded.name,
        "model_with_batchnorm": with_bn.name,
        "architecture": "SmallResNet: stem conv3x3(24) + BasicBlock 24 -> 48 (s2) -> 96 (s2), GAP, Linear(96, 10)",
        "input": {"name": "input", "shape": ["batch", 1, 28, 28], "dtype": "float32",
                  "preprocessing": "grayscale pixel / 255 (no mean/std normalisation)"},
        "output": {"name": "logits", "shape": ["batch", 10], "dtype": "float32"},
        "classes": CLASSES,
        "fp32_top1": round(acc_ort, 2),
        "fp32_top1_measured_with": f"onnxruntime {ort.__version__} on {npz_path.name}",
        "torch_top1": round(acc_torch, 2),
        "num_test_images": n_test,
        "num_calib_images": n_calib,
        "num_parameters": n_params,
        "train_seconds": round(train_seconds, 1),
        "epochs": args.epochs,
        "seed": args.seed,
        "opset": OPSET,
        "ir_version": proto.ir_version,
        "torch_version": torch.__version__,
    }
    (out_dir / "fashion_mnist_resnet.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
