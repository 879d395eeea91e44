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
