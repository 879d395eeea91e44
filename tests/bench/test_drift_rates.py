"""bench/drift_rates.py's count of alarmed normal rows, on output files written by hand."""

from __future__ import annotations

import json
import math

import pandas as pd

from bench.drift_rates import normal_rows_alarmed


def test_alarmed_normal_rows_leave_out_labelled_and_warming_up_rows(tmp_path):
    times = pd.date_range("2026-01-05T06:00:00Z", periods=4, freq="10s") + pd.to_timedelta([0, 0, 0, 0.5], unit="s")
    outputs = tmp_path / "batches"
    outputs.mkdir()
    pd.DataFrame(
        {
            "entity": ["line-1"] * 4,
            "timestamp": times,
            "anomaly": [1, 0, 1, 1],
            "anomaly_threshold": [math.inf, 2.0, 2.0, 2.0],  # the first row is still warming up
        }
    ).to_parquet(outputs / "batch-00000001-part-0000.parquet")
    pd.DataFrame(
        {"entity": ["line-2"] * 2, "timestamp": times[:2], "anomaly": [0, 1], "anomaly_threshold": [2.0, 2.0]}
    ).to_parquet(outputs / "batch-00000002-part-0000.parquet")
    truth = tmp_path / "ground_truth.json"
    # The simulator writes times with a fraction of a second only where they have one.
    labelled = [
        {"entity": "line-1", "timestamp": times[3].isoformat(), "file": "batch-1"},
        {"entity": "line-9", "timestamp": times[0].isoformat(), "file": "batch-1"},
    ]
    truth.write_text(json.dumps({"anomalies": labelled}))
    # line-1: rows 2 and 3 judged as normal (row 3 alarmed), row 4 labelled; line-2: both, one alarmed.
    assert normal_rows_alarmed(outputs, truth) == (2, 4, 0.5)
    # A second part of file 2 (another line group): the file's parts count together.
    pd.DataFrame(
        {"entity": ["line-3"] * 2, "timestamp": times[:2], "anomaly": [1, 1], "anomaly_threshold": [2.0, 2.0]}
    ).to_parquet(outputs / "batch-00000002-part-0000-group-1.parquet")
    assert normal_rows_alarmed(outputs, truth) == (4, 6, 0.75)
