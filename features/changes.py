"""Sensors that enter as their change from the previous reading, for a fleet.

A slow sensor (a temperature) wanders over hours: its level in a line's baseline says little
about its level later, so measured against that baseline it looks faulty for no reason. Its
change from one reading to the next is what a forecaster can judge. Per line and sensor, the
previous reading is the line's last present one, from the batch before when the batch starts;
a line's first reading ever (or of a new run) has no previous one and counts as no change.
"""

from __future__ import annotations

import numpy as np

from features.scaling import last_observed, latest_observed


def changes_from_previous(
    raw: np.ndarray, line: np.ndarray, offsets: np.ndarray, previous: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(R, C) readings of C sensors as their change from each line's previous reading; NaN stays
    NaN. line: (R,) line index per row, rows of a line together and in time order; offsets:
    (L + 1,); previous: (L, C) each line's last reading before the batch (NaN: none). Returns the
    changes and each line's last reading after the batch."""
    raw = np.asarray(raw, dtype=np.float64)
    present = ~np.isnan(raw)
    latest = latest_observed(present)
    before = np.vstack([np.full((1, raw.shape[1]), -1), latest[:-1]])  # the latest strictly before each row
    in_line = before >= offsets[:-1][line][:, None]
    columns = np.arange(raw.shape[1])
    earlier = np.where(in_line, raw[np.where(in_line, before, 0), columns], previous[line])
    changes = np.where(present, np.nan_to_num(raw - earlier, nan=0.0), np.nan)
    last = last_observed(latest, offsets)
    after = np.where(last >= 0, raw[np.maximum(last, 0), columns], previous)
    return changes, after
