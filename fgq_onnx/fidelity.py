"""End-to-end fidelity: the converted model against the source model on held-out samples.

The samples are held out of calibration (fgq_onnx/data.py, Split), so ranges,
bias correction and fitting never saw them. Per float output: SQNR
10 log10(sum y^2 / sum (y - y_hat)^2) and cosine over every value of every
sample, and, for outputs shaped like class scores [batch, classes], the share
of samples whose top-1 class agrees.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from fgq_onnx.errors import FgqError

HOLDOUT_EVERY = 5  # one calibration sample in five is held out
HOLDOUT_LIMIT = 256  # held-out samples run through both models, at most
# Below these on the main output the summary warns: SQNR 10 dB is cosine ~0.95. The embedded ResNet's default
# conversion, 0.85 points of top-1 below fp32, measures 14.5 dB, cosine 0.982 and 96.9% top-1 agreement.
POOR_SQNR_DB = 10.0
POOR_TOP1_AGREEMENT = 0.9
AGREEMENT_SAMPLES = 50  # top-1 agreement counts from this many samples (near-tied random logits flip on a few)


@dataclass
class OutputFidelity:
    """One output's agreement with the source model."""

    output: str
    sqnr_db: float
    cosine: float
    top1_agreement: float | None = None  # class-score outputs [batch, classes] only


@dataclass
class Fidelity:
    """What the held-out samples showed; `outputs` in the model's output order (the first is the main one)."""

    samples: int = 0
    outputs: list[OutputFidelity] = field(default_factory=list)
    skipped: str = ""  # why it was not measured, if so

    @property
    def main(self) -> OutputFidelity | None:
        return self.outputs[0] if self.outputs else None

    def warning(self, settings: dict[str, object], worst_layer: str = "") -> str | None:
        """One line when the main output is poor, with what to try given the conversion's `settings`; else None."""
        main = self.main
        if main is None:
            return None
        disagrees = main.top1_agreement is not None and self.samples >= AGREEMENT_SAMPLES and main.top1_agreement < POOR_TOP1_AGREEMENT
        if main.sqnr_db >= POOR_SQNR_DB and not disagrees:
            return None
        agreement = f", top-1 agreement {100 * main.top1_agreement:.1f}%" if main.top1_agreement is not None else ""
        tries = [
            "--method fit" if settings.get("method") != "fit" else "",
            "--bias-correction" if settings.get("bias_correction") is False else "",
            "--act-bits 8" if settings.get("act_bits") == 4 else "",
            "--n 4" if isinstance(settings.get("n"), int) and settings["n"] > 4 else "",
            f"--exclude '{worst_layer}' (the worst weight SQNR) or the first and last layers (--keep-first-last)" if worst_layer else "",
        ]
        return (f"poor fidelity on {self.samples} held-out samples: output '{main.output}' SQNR {main.sqnr_db:.1f} dB, cosine {main.cosine:.4f}"
                f"{agreement}; try {', '.join(t for t in tries if t)}")

    def to_dict(self) -> dict[str, object]:
        if self.skipped:
            return {"skipped": self.skipped}
        return {"samples": self.samples, "outputs": {o.output: {k: v for k, v in vars(o).items() if k != "output"} for o in self.outputs}}


class _Agreement:
    """Streaming sums for the SQNR, cosine and top-1 agreement of one output."""

    def __init__(self):
        self.ref2 = self.out2 = self.cross = self.noise = 0.0
        self.agree = self.rows = 0
        self.classes = True
        self.seen = False

    def update(self, reference: np.ndarray, output: np.ndarray) -> None:
        if reference.shape != output.shape:
            raise FgqError(f"the converted model's output has shape {list(output.shape)}, the source's {list(reference.shape)}")
        self.seen = True
        ref, out = reference.astype(np.float64).ravel(), output.astype(np.float64).ravel()
        self.ref2 += float(ref @ ref)
        self.out2 += float(out @ out)
        self.cross += float(ref @ out)
        self.noise += float(np.sum(np.square(ref - out)))
        self.classes = self.classes and reference.ndim == 2 and reference.shape[1] >= 2
        if self.classes:
            self.agree += int(np.sum(reference.argmax(axis=1) == output.argmax(axis=1)))
            self.rows += reference.shape[0]

    def result(self, name: str) -> OutputFidelity:
        sqnr = math.inf if self.noise == 0.0 else 10.0 * math.log10(max(self.ref2, 1e-300) / self.noise)
        norms = math.sqrt(self.ref2 * self.out2)
        cosine = self.cross / norms if norms > 0 else (1.0 if self.noise == 0.0 else 0.0)
        top1 = self.agree / self.rows if self.classes and self.rows else None
        return OutputFidelity(name, sqnr, cosine, top1)


def measure(source: str | Path | onnx.ModelProto | ir.Model, converted: ir.Model, held_out, main: str | None = None) -> Fidelity:
    """Run the source and the converted model on `held_out` batches and compare their float outputs (`main` first)."""
    from fgq_onnx.evaluate import open_session  # evaluate imports the pipeline's modules: import when used

    with tempfile.TemporaryDirectory(prefix="fgq-fidelity-") as folder:
        source_path = _model_file(source, Path(folder) / "source.onnx")
        converted_path = Path(folder) / "converted.onnx"
        ir.save(converted, converted_path, external_data="converted.onnx.data")
        reference, model = open_session(source_path), open_session(converted_path)
        names = [name for name in reference.outputs if name in model.outputs]
        if main is not None:
            if main not in names:
                raise FgqError(f"the model has no output {main!r}; its outputs are {names}")
            names = [main, *(name for name in names if name != main)]
        sums = {name: _Agreement() for name in names}
        samples = 0
        for feed, _ in held_out:
            expected, actual = reference.run(feed, names), model.run(feed, names)
            for name in names:
                if np.issubdtype(expected[name].dtype, np.floating):
                    sums[name].update(expected[name], actual[name])
            samples += held_out.samples_in(feed)
    return Fidelity(samples, [sums[name].result(name) for name in names if sums[name].seen])


def _model_file(source, path: Path) -> Path:
    """A file onnxruntime can open for the source model: its own path, else a copy saved to `path`."""
    if isinstance(source, (str, Path)):
        return Path(source)
    if isinstance(source, ir.Model):
        ir.save(source, path, external_data=path.name + ".data")
    else:
        onnx.save(source, str(path))
    return path
