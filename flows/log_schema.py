"""What a landed log file holds: its line and timestamp columns, its sensors and their ranges.

Apart from the rest of the settings so that reading and validating a file (in a second
interpreter too, see `flows.ingest.check_process`) needs pydantic, not torch.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SettingsSection(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SensorSpec(SettingsSection):
    name: str
    unit: str
    min: float
    max: float
    source: str
    max_null_fraction: float = Field(0.6, ge=0.0, le=1.0)
    # The model sees this sensor as its change from the previous reading, not its level: for a
    # slow sensor (a temperature) whose level wanders beyond any baseline.
    as_change: bool = False

    @model_validator(mode="after")
    def _range(self) -> SensorSpec:
        if not self.min < self.max:
            raise ValueError(f"sensor {self.name!r}: min {self.min} must be below max {self.max}")
        return self


def _default_sensors() -> list[SensorSpec]:
    return [
        SensorSpec(name="temperature", unit="degC", min=-20, max=150, source="thermal"),
        SensorSpec(name="vibration", unit="mm/s", min=0, max=50, source="vibration"),
        SensorSpec(name="pressure", unit="bar", min=0, max=25, source="hydraulic"),
        SensorSpec(name="flow", unit="l/min", min=0, max=600, source="hydraulic"),
        SensorSpec(name="motor_current", unit="A", min=0, max=120, source="electrical"),
    ]


class LogSchema(SettingsSection):
    entity_column: str = "entity"
    # Files of one machine often have no line column: then every row belongs to this line.
    single_line: str | None = None
    # Each file holds one run of its lines (a batch, a test-bench experiment): a line's feature
    # scaling, hidden state and alarm calibration start afresh with each file, as after a restart
    # (its drift detectors and watermark carry on).
    file_is_run: bool = False
    timestamp_column: str = "timestamp"
    # The field separator of CSV files (SKAB's files use ';').
    delimiter: str = Field(",", min_length=1, max_length=1)
    sensors: list[SensorSpec] = Field(default_factory=_default_sensors, min_length=1)
    label_columns: list[str] = Field(default_factory=lambda: ["anomaly"])
    # Timestamps later than now + this are refused as clock errors.
    max_future_seconds: float = Field(3600.0, ge=0)

    @model_validator(mode="after")
    def _unique(self) -> LogSchema:
        names = [s.name for s in self.sensors]
        reserved = {self.entity_column, self.timestamp_column, *self.label_columns}
        if len(set(names)) != len(names):
            raise ValueError(f"sensor names must be unique, got {names}")
        if reserved & set(names):
            raise ValueError(f"sensor names {sorted(reserved & set(names))} clash with entity/timestamp/label columns")
        return self

    @property
    def sensor_names(self) -> list[str]:
        return [s.name for s in self.sensors]

    @property
    def sources(self) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {}
        for sensor in self.sensors:
            grouped.setdefault(sensor.source, []).append(sensor.name)
        return grouped
