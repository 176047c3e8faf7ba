"""End-to-end fidelity: what the converted model's outputs showed against the source model's on held-out samples.

The samples are held out of calibration (fgq_onnx/data.py, Split), so ranges,
bias correction and fitting never saw them. Per float output: SQNR
10 log10(sum y^2 / sum (y - y_hat)^2) and cosine over every value of every
sample, and, for outputs shaped like class scores [batch, classes], the share
of samples whose top-1 class agrees. The result types and the warning rule live
here; evaluate.measure_fidelity runs the two models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HOLDOUT_EVERY = 5  # one calibration sample in five is held out
HOLDOUT_LIMIT = 256  # held-out samples run through both models, at most
# Below these on the main output the summary warns: SQNR 10 dB is cosine ~0.95. The embedded ResNet's default
# conversion, 0.85 points of top-1 below fp32, measures 14.5 dB, cosine 0.982 and 96.9% top-1 agreement.
POOR_SQNR_DB = 10.0
POOR_TOP1_AGREEMENT = 0.9
AGREEMENT_SAMPLES = 50  # top-1 agreement counts from this many samples (near-tied random logits flip on a few)
# Under --min-sqnr a check on fewer held-out samples than this gets a caution: open_nsfw's 20 dB plan, checked by
# the plain SQNR of 6 held-out photos, gave 13 dB on 32 new ones, one near its decision boundary; the check now
# takes a lower bound over the samples, which a few samples keep loose (docs/benchmark-real.md).
FEW_BUDGET_SAMPLES = 20


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
        """One line when the main output is poor, with what to try given the conversion's `settings`, or when a
        --min-sqnr budget was checked on few samples; else None."""
        main = self.main
        if main is None:
            return None
        disagrees = main.top1_agreement is not None and self.samples >= AGREEMENT_SAMPLES and main.top1_agreement < POOR_TOP1_AGREEMENT
        if main.sqnr_db >= POOR_SQNR_DB and not disagrees:
            budget = settings.get("min_sqnr")
            if budget is None or self.samples >= FEW_BUDGET_SAMPLES:
                return None
            return (f"--min-sqnr {budget} was checked on only {self.samples} held-out samples: inputs unlike them can "
                    f"fall well short of it; give more calibration data (one sample in {HOLDOUT_EVERY} is held out)")
        agreement = f", top-1 agreement {100 * main.top1_agreement:.1f}%" if main.top1_agreement is not None else ""
        tries = [
            "--method fit" if settings.get("method") not in ("fit", "block") else "",
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
