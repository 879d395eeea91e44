"""What the feature builder needs to know about a log: its columns and how time is measured."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureSpec:
    entity_column: str
    timestamp_column: str
    sensors: tuple[str, ...]
    # Nominal sampling interval: Δt is expressed in these units.
    time_scale_seconds: float = 10.0
    label_columns: tuple[str, ...] = ()
    # A line's scaling learns its first `baseline_rows` readings of each sensor, then holds
    # (0: it keeps learning every reading).
    baseline_rows: int = 0
    # Sensors that enter as their change from the line's previous reading (features.changes).
    change_sensors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.change_sensors) - set(self.sensors)
        if unknown:
            raise ValueError(f"FeatureSpec.change_sensors names no sensor of the log: {sorted(unknown)}")
        if self.baseline_rows < 0:
            raise ValueError(f"FeatureSpec.baseline_rows must be >= 0, got {self.baseline_rows}")

    @property
    def n_targets(self) -> int:
        return len(self.sensors)

    @property
    def n_inputs(self) -> int:
        # standardised value and fresh-reading mask per sensor, plus log(1 + Δt)
        return 2 * len(self.sensors) + 1

    @property
    def input_names(self) -> list[str]:
        return [f"z_{s}" for s in self.sensors] + [f"fresh_{s}" for s in self.sensors] + ["log1p_dt"]
