"""Train a ternary model with Trained Ternary Quantization (TTQ) on Fashion-MNIST and export it.

TTQ (Zhu, Han, Mao, Dally, arXiv 1612.01064): every convolution but the
first keeps a latent float weight w and two learned scales W_p, W_n; the
forward pass uses w_t = +W_p where w > delta, -W_n where w < -delta, 0
otherwise, with delta = 0.05 * max|w|. Gradients (straight-through):
dL/dW_p = sum of dL/dw_t over the positive positions, dL/dW_n = -sum over the
negative ones, and the latent weight gets dL/dw_t scaled by W_p, 1 or W_n.
The first layer (stem conv) and the last (the Linear classifier) stay full
precision, as in the paper.

The network and the training loop are those of train_fashion_mnist.py
(SmallResNet, same data, augmentation and one-cycle schedule, a lower peak
learning rate). As in the paper, training starts from the full-precision
model: the weights of fashion_mnist_resnet.onnx (BatchNorm folded, so each
BatchNorm starts as the identity carrying the Conv's bias). After training the
ternary values are baked into the weights and the model is exported with the
legacy exporter, which folds each BatchNorm into its Conv: a ternary layer's
weights then take the values {-W_n * s_m, 0, +W_p * s_m} per output channel m,
exactly the per-row asymmetric ternary weights fgq-onnx detects and packs
losslessly.

Writes ``fashion_mnist_ttq.onnx`` (and prints its onnxruntime top-1 on
``fashion_mnist_test.npz``) into --out-dir (default: this script's folder).

Usage::

    python models/train_ttq.py [--epochs 1] [--max-lr 0.05] [--seed 0] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper
from train_fashion_mnist import SmallResNet, export_onnx, load_split, op_counts, ort_top1, to_input, torch_top1, train

THRESHOLD = 0.05  # delta = THRESHOLD * max|w|, the paper's t


class _TernaryQuantize(torch.autograd.Function):
    """w -> {-W_n, 0, +W_p} with TTQ's straight-through gradients."""

    @staticmethod
    def forward(ctx, weight, w_p, w_n):
        delta = THRESHOLD * weight.abs().max()
        positive, negative = weight > delta, weight < -delta
        ctx.save_for_backward(positive, negative, w_p, w_n)
        return w_p * positive - w_n * negative

    @staticmethod
    def backward(ctx, grad):
        positive, negative, w_p, w_n = ctx.saved_tensors
        # The paper sums over the positions; dividing by their count lets one SGD learning rate suit both
        # the scales and the weights (the sum over tens of thousands of positions makes a huge step).
        grad_p = ((grad * positive).sum() / positive.sum().clamp(min=1)).reshape(w_p.shape)
        grad_n = (-(grad * negative).sum() / negative.sum().clamp(min=1)).reshape(w_n.shape)
        grad_w = grad * (w_p * positive + w_n * negative + (~(positive | negative)))
        return grad_w, grad_p, grad_n


class TTQConv2d(nn.Conv2d):
    """A Conv2d whose forward uses the TTQ ternary weight (until `bake`)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None)
        self.load_state_dict(conv.state_dict())
        with torch.no_grad():  # initial scales: mean |w| above the threshold, per sign
            w = self.weight
            delta = THRESHOLD * w.abs().max()
            self.w_p = nn.Parameter(w[w > delta].mean().reshape(1))
            self.w_n = nn.Parameter((-w[w < -delta]).mean().reshape(1))
        self.baked = False

    def ternary_weight(self) -> torch.Tensor:
        return _TernaryQuantize.apply(self.weight, self.w_p, self.w_n)

    def bake(self) -> None:
        """Store the ternary values as the weight: the exported model carries them, nothing else."""
        with torch.no_grad():
            self.weight.copy_(self.ternary_weight())
        self.baked = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.baked else self.ternary_weight()
        return self._conv_forward(x, weight, self.bias)


def load_pretrained(model: SmallResNet, path: Path) -> None:
    """Weights of the folded fp32 export: each Conv weight as is, its bias as the following BatchNorm's beta.

    The export lists its Conv/Gemm nodes in the order the modules are
    declared (stem, then per block conv1, conv2, shortcut, then fc); shapes are checked.
    """
    proto = onnx.load(str(path))
    arrays = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in proto.graph.initializer}
    linear = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    modules = list(model.modules())
    layers = [m for m in modules if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(linear) == len(layers)
    for node, layer in zip(linear, layers):
        weight, bias = arrays[node.input[1]], arrays[node.input[2]]
        assert weight.shape == layer.weight.shape, (node.name, weight.shape, layer.weight.shape)
        layer.weight.data.copy_(weight)
        if isinstance(layer, nn.Linear):
            layer.bias.data.copy_(bias)
            continue
        norm = modules[modules.index(layer) + 1]  # each Conv2d is declared right before its BatchNorm2d
        assert isinstance(norm, nn.BatchNorm2d)
        norm.weight.data.fill_(1.0)
        norm.bias.data.copy_(bias)
        norm.running_mean.zero_()
        norm.running_var.fill_(1.0)


def make_ttq(model: SmallResNet) -> list[TTQConv2d]:
    """Swap every Conv2d of the residual stages (not the stem) for a TTQConv2d; the Linear stays float."""
    swapped = []
    for stage in (model.stage1, model.stage2, model.stage3):
        for parent in stage.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Conv2d) and not isinstance(child, TTQConv2d):
                    setattr(parent, name, TTQConv2d(child))
                    swapped.append(getattr(parent, name))
    return swapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (default: 1; it starts from the trained fp32 model)")
    parser.add_argument("--max-lr", type=float, default=0.05, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    x_train_u8, y_train = load_split("train")
    x_test_u8, y_test = load_split("test")
    x_train, x_test = to_input(x_train_u8), to_input(x_test_u8)

    model = SmallResNet()
    load_pretrained(model, Path(__file__).resolve().parent / "fashion_mnist_resnet.onnx")
    print(f"fp32 start: torch top-1 {torch_top1(model, x_test, y_test):.2f}%")
    layers = make_ttq(model)
    model = model.to(memory_format=torch.channels_last)
    print(f"TTQ SmallResNet: {len(layers)} ternary convolutions; stem conv and classifier in float")
    start = time.time()
    train(model, x_train, y_train, args.epochs, args.seed, max_lr=args.max_lr)
    print(f"training took {time.time() - start:.0f}s; torch top-1 {torch_top1(model, x_test, y_test):.2f}%")

    for layer in layers:
        layer.bake()
        values = np.unique(layer.weight.detach().numpy())
        assert len(values) <= 3, f"a baked layer has {len(values)} distinct values"
    print("scales (W_p, W_n) per layer:", [(round(layer.w_p.item(), 4), round(layer.w_n.item(), 4)) for layer in layers])
    path = args.out_dir / "fashion_mnist_ttq.onnx"
    export_onnx(model, path, keep_batchnorm=False)
    ops = op_counts(path)
    assert "BatchNormalization" not in ops, f"BN not folded: {ops}"
    data = np.load(Path(__file__).resolve().parent / "fashion_mnist_test.npz")
    accuracy, _ = ort_top1(path, data["input"], data["y"])
    print(f"{path.name}: ops {ops}; onnxruntime top-1 {accuracy:.2f}% on {len(data['y'])} test images")


if __name__ == "__main__":
    main()
