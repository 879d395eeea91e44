"""What the feature builder needs to know about a log: its columns and how time is measured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Periods a line's readings may repeat over, by the clock: each adds the sine and cosine of the
# row's phase in it (UTC) to the model's inputs, so a daily or weekly profile can be forecast
# from the time of the row instead of learnt back from the rows alone.
CLOCK_PERIODS_SECONDS = {"day": 86_400.0, "week": 7 * 86_400.0}
# Their names as a type, for the settings to check a config against (subscripting with the
# tuple is the same as naming each).
ClockPeriod = Literal[tuple(CLOCK_PERIODS_SECONDS)]


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
    # Names of CLOCK_PERIODS_SECONDS whose phase enters the model's inputs.
    clock_periods: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown_periods = [p for p in self.clock_periods if p not in CLOCK_PERIODS_SECONDS]
        if unknown_periods or len(set(self.clock_periods)) != len(self.clock_periods):
            raise ValueError(
                f"FeatureSpec.clock_periods must name each of {sorted(CLOCK_PERIODS_SECONDS)} at most once, "
                f"got {list(self.clock_periods)}"
            )
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
        # standardised value and fresh-reading mask per sensor, log(1 + Δt), each clock phase
        return 2 * len(self.sensors) + 1 + 2 * len(self.clock_periods)

    @property
    def input_names(self) -> list[str]:
        clock = [f"clock_{period}_{part}" for period in self.clock_periods for part in ("sin", "cos")]
        return [f"z_{s}" for s in self.sensors] + [f"fresh_{s}" for s in self.sensors] + ["log1p_dt", *clock]
