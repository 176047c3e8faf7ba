"""What a conversion did, layer by layer: collected by the passes, shown by the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from fgq_onnx.fidelity import Fidelity


@dataclass
class LayerRecord:
    """One Conv/Gemm/MatMul the converter looked at."""

    node: str
    op_type: str
    weight: str = ""
    shape: tuple[int, ...] = ()
    params: int = 0
    macs: int = 0  # multiply-accumulates per sample
    converted: bool = False
    reason: str = ""  # why it was skipped, or notes on a converted layer
    n: int = 0
    method: str = ""
    grouping: str = ""  # what the groups run along
    groups: int = 0
    short_group: int = 0  # length of the shorter last group of a segment, 0 if none
    source: str = ""  # "int8 weights": decoded from integer codes (DequantizeLinear, Cast*Mul) before ternarizing
    sqnr_db: float = math.nan
    code_bytes: int = 0  # stored bytes of the ternary codes (converted layers)
    scale_bytes: int = 0  # stored bytes of the group scales (and u8 row scales)
    already_ternary: str = ""  # "exact (per row, asymmetric)" when the weight was ternary already and kept as is
    float_activations: bool = False  # its weight is converted, its activation stays float (ConvertConfig.float_activation_layers)

    @property
    def multiplications_eliminated(self) -> float:
        """The paper's measure: one scale multiply per group of N ternary accumulations."""
        return self.macs * (1.0 - 1.0 / self.n) if self.converted else 0.0


@dataclass
class ActivationRecord:
    """One activation tensor given Q/DQ."""

    tensor: str
    bits: int
    signed: bool
    low: float
    high: float
    scale: float


@dataclass
class Report:
    layers: list[LayerRecord] = field(default_factory=list)
    activations: list[ActivationRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    file_bytes_before: int = 0
    file_bytes_after: int = 0
    settings: dict[str, object] = field(default_factory=dict)
    calibration: dict[str, object] = field(default_factory=dict)
    embeddings: list[dict[str, object]] = field(default_factory=list)  # constant tables read by Gather: int8 rows or kept float, why
    search: dict[str, object] = field(default_factory=dict)  # --n auto: budget, measured drop, plan per layer, trials
    fidelity: Fidelity = field(default_factory=lambda: Fidelity(skipped="not measured"))  # the output against the source's

    @property
    def converted(self) -> list[LayerRecord]:
        return [layer for layer in self.layers if layer.converted]

    @property
    def skipped(self) -> list[LayerRecord]:
        return [layer for layer in self.layers if not layer.converted]

    @property
    def multiplications_eliminated(self) -> float:
        """Share of all linear-layer multiplications removed (0..1)."""
        total = sum(layer.macs for layer in self.layers)
        return sum(layer.multiplications_eliminated for layer in self.layers) / total if total else 0.0

    @property
    def sqnr_mean_db(self) -> float:
        values = [layer.sqnr_db for layer in self.converted if math.isfinite(layer.sqnr_db)]
        if not values:  # every layer exact (already ternary): inf, not "no data"
            return math.inf if any(layer.sqnr_db == math.inf for layer in self.converted) else math.nan
        return sum(values) / len(values)

    @property
    def bits_per_weight(self) -> float:
        """8 * bytes of codes and scales of the converted layers / their weights."""
        params = sum(layer.params for layer in self.converted)
        return 8.0 * sum(layer.code_bytes + layer.scale_bytes for layer in self.converted) / params if params else math.nan

    @property
    def sqnr_worst(self) -> LayerRecord | None:
        return min(self.converted, key=lambda layer: layer.sqnr_db, default=None)

    def summary(self) -> dict[str, object]:
        worst = self.sqnr_worst
        return {
            "layers_converted": len(self.converted),
            "layers_skipped": len(self.skipped),
            "params_converted": sum(layer.params for layer in self.converted),
            "params_total": sum(layer.params for layer in self.layers),
            "weight_bytes_before": self.weight_bytes_before,
            "weight_bytes_after": self.weight_bytes_after,
            "file_bytes_before": self.file_bytes_before,
            "file_bytes_after": self.file_bytes_after,
            "multiplications_eliminated": self.multiplications_eliminated,
            "bits_per_weight": self.bits_per_weight,
            "sqnr_mean_db": self.sqnr_mean_db,
            "sqnr_worst_db": worst.sqnr_db if worst else math.nan,
            "sqnr_worst_layer": worst.node if worst else "",
        }

    def to_dict(self) -> dict[str, object]:
        return {
            "settings": self.settings,
            "summary": self.summary(),
            "calibration": self.calibration,
            "notes": self.notes,
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
            "activations": [dataclasses.asdict(act) for act in self.activations],
            "fidelity": self.fidelity.to_dict(),
            **({"embeddings": self.embeddings} if self.embeddings else {}),
            **({"search": self.search} if self.search else {}),
        }

    def to_json(self) -> str:
        def finite(value):
            return None if isinstance(value, float) and not math.isfinite(value) else value

        def clean(obj):
            if isinstance(obj, dict):
                return {key: clean(value) for key, value in obj.items()}
            if isinstance(obj, (list, tuple)):
                return [clean(value) for value in obj]
            return finite(obj)

        return json.dumps(clean(self.to_dict()), indent=2)
