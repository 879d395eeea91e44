"""The drift reference of a model: per-sensor distribution summaries and its forecast error."""

from __future__ import annotations

import numpy as np

from flows.monitor.drift_statistics import summarise


def build_reference(raw: np.ndarray, sensors: tuple[str, ...], mae: float) -> dict:
    """raw: (rows, sensors) readings the model was trained on (NaN where absent)."""
    summaries = {}
    for index, sensor in enumerate(sensors):
        values = raw[:, index]
        if np.isfinite(values).any():
            summaries[sensor] = summarise(values).to_dict()
    return {"sensors": summaries, "mae": mae}
