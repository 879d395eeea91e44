"""The feature state one entity carries from batch to batch, stored as JSON (never pickle)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pandas as pd


class FeatureStateError(ValueError):
    """Stored feature state that cannot be read back."""


@dataclass
class EntityFeatureState:
    # river StandardScaler statistics: {"counts": {...}, "means": {...}, "vars": {...}}
    scaler: dict = field(default_factory=lambda: {"counts": {}, "means": {}, "vars": {}})
    # Last standardised reading of each sensor, carried forward over missing readings.
    last_values: dict[str, float] = field(default_factory=dict)
    last_timestamp: pd.Timestamp | None = None
    events: int = 0
    # Last raw reading of each sensor that enters as its change (FeatureSpec.change_sensors).
    last_readings: dict[str, float] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        payload = {
            "version": 1,
            "scaler": self.scaler,
            "last_values": self.last_values,
            "last_timestamp": self.last_timestamp.isoformat() if self.last_timestamp is not None else None,
            "events": self.events,
            "last_readings": self.last_readings,
        }
        return json.dumps(payload, sort_keys=True, allow_nan=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> EntityFeatureState:
        try:
            payload = json.loads(data.decode())
            if payload.get("version") != 1:
                raise FeatureStateError(f"feature state version {payload.get('version')!r} is not supported")
            scaler = {part: dict(payload["scaler"][part]) for part in ("counts", "means", "vars")}
            last_values = {str(k): float(v) for k, v in payload["last_values"].items()}
            stamp = payload["last_timestamp"]
            events = int(payload["events"])
            # A state stored before sensors could enter as changes has none.
            last_readings = {str(k): float(v) for k, v in payload.get("last_readings", {}).items()}
        except FeatureStateError:
            raise
        except (
            UnicodeDecodeError,
            json.JSONDecodeError,
            KeyError,
            TypeError,
            ValueError,
            AttributeError,
        ) as error:
            raise FeatureStateError(f"feature state is unreadable: {error}") from error
        if not all(math.isfinite(v) for v in [*last_values.values(), *last_readings.values()]):
            raise FeatureStateError("feature state holds a non-finite carried value")
        return cls(scaler, last_values, pd.Timestamp(stamp) if stamp else None, events, last_readings)
