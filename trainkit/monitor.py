"""Which metric picks best.pt, drives early stopping and the plateau schedule, and which way is better."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# the monitorable metrics (train.monitor) and whether higher or lower is better
MODES = {"val_accuracy": "max", "val_top5": "max", "val_loss": "min"}


@dataclass(frozen=True)
class Monitor:
    name: str  # a metrics.csv column, e.g. "val_accuracy"
    mode: str  # "max" | "min"

    @classmethod
    def for_metric(cls, name: str) -> Monitor:
        return cls(name, MODES[name])

    def value(self, metrics: dict[str, Any]) -> float:
        """The monitored value of a metrics.csv row."""
        return float(metrics[self.name])

    def is_better(self, a: float, b: float | None) -> bool:
        """Is `a` an improvement on `b` (None: nothing yet)? A NaN is never better."""
        if math.isnan(a):
            return False
        if b is None or math.isnan(b):
            return True
        return a < b if self.mode == "min" else a > b

    def format(self, value: float) -> str:
        return f"{value:.4f}" if self.name == "val_loss" else f"{100 * value:.2f}%"
