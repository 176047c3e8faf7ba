"""Write fashion_mnist_val.npz: a labelled validation set for searches such as `--n auto`.

The model was trained on all 60,000 training images and its accuracy is
reported on the 10,000 test images, so a search that picks settings by
accuracy must not look at the test set. This takes 500 images per class
(5,000) from the training split, seeded, leaving out the calibration
images in calib/, in the test file's format: `input` float32 [n, 1, 28, 28]
= pixel / 255, `y` int64.

    python models/make_validation_set.py   # reads /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from train_fashion_mnist import load_split, to_input

HERE = Path(__file__).resolve().parent
PER_CLASS = 500


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "fashion_mnist_val.npz")
    args = parser.parse_args()
    x, y = load_split("train")
    calibration = {int(p.name.split("_")[0]) for p in (HERE / "calib").glob("*.png")}
    rng = np.random.default_rng(args.seed)
    picks = []
    for label in range(10):
        pool = np.array([i for i in np.flatnonzero(y == label) if i not in calibration])
        picks.append(rng.choice(pool, PER_CLASS, replace=False))
    order = np.sort(np.concatenate(picks))
    np.savez_compressed(args.out, input=to_input(x[order]), y=y[order])
    print(f"wrote {args.out} ({len(order)} training images, none of them calibration images)")


if __name__ == "__main__":
    main()
