"""The pipeline's anomaly alarms scored against labelled rows (the simulator's
`ground_truth.json`), and the delay from each labelled drift to its first detection."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

# An alarm within this many of a line's rows after a labelled anomaly still counts as catching it:
# a smoothed score crosses its threshold a little after the fault begins.
CATCH_ROWS = 10


def alarm_scores(output_files: list[Path], labelled: list[dict]) -> dict:
    """`flag_scores` of the `anomaly` column of the output files."""
    frames = [pq.read_table(path, columns=["entity", "timestamp", "anomaly"]).to_pandas() for path in output_files]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["entity", "timestamp", "anomaly"])
    return flag_scores(rows, labelled)


def flag_scores(rows: pd.DataFrame, labelled: list[dict]) -> dict:
    """Row-level precision, recall and F1 of the rows' `anomaly` flags (columns entity,
    timestamp, anomaly) against the labelled rows (dicts with entity and timestamp), and the
    share of labelled anomalies (runs of labelled rows of a line) with an alarm on them or
    within CATCH_ROWS rows after."""
    rows = rows.sort_values(["entity", "timestamp"], kind="stable").reset_index(drop=True)
    labels = pd.DataFrame(labelled, columns=["entity", "timestamp"])
    labelled_keys = pd.MultiIndex.from_arrays(
        [labels["entity"], pd.to_datetime(labels["timestamp"], utc=True, format="ISO8601")]
    )
    truth = pd.Series(pd.MultiIndex.from_frame(rows[["entity", "timestamp"]]).isin(labelled_keys), dtype=bool)
    alarm = rows["anomaly"].astype(bool)
    tp, fp, fn = int((truth & alarm).sum()), int((~truth & alarm).sum()), int((truth & ~alarm).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    # Runs of labelled rows per line, each caught if an alarm falls on it or the rows just after.
    line_start = rows["entity"].ne(rows["entity"].shift())
    run_start = truth & (~truth.shift(fill_value=False) | line_start)
    run_id = run_start.cumsum().where(truth)
    ahead = alarm[::-1].groupby(rows["entity"][::-1]).rolling(CATCH_ROWS + 1, min_periods=1).max()
    alarm_soon = pd.Series(ahead.droplevel(0).sort_index().to_numpy(), dtype=bool)
    caught = alarm_soon.groupby(run_id).max() if truth.any() else pd.Series(dtype=bool)
    return {
        "rows": len(rows),
        "labelled_rows": int(truth.sum()),
        "alarmed_rows": int(alarm.sum()),
        "precision": round(precision, 3),
        "recall": round(recall, 3),
        "f1": round(2 * precision * recall / (precision + recall), 3) if precision + recall else 0.0,
        "false_alarms_per_1000_normal_rows": round(1000.0 * fp / max(int((~truth).sum()), 1), 2),
        "anomalies": len(caught),
        "anomalies_caught": int(caught.sum()),
    }


def drift_delays(drifts: list[dict], detections: list[dict]) -> list[dict]:
    """For each labelled drift (kind, time), the first detection (detector, feature, entity,
    event_time) at or after it, and the delay between them."""
    delays = []
    for drift in drifts:
        start = pd.Timestamp(drift["time"])
        after = [d for d in detections if pd.Timestamp(d["event_time"]) >= start]
        first = min(after, key=lambda d: pd.Timestamp(d["event_time"])) if after else None
        delays.append(
            {
                "kind": drift["kind"],
                "starts": start.isoformat(),
                "detected": first["event_time"] if first else None,
                "by": f"{first['detector']}({first['feature'] or 'error'}) on {first['entity']}" if first else None,
                "delay": str(pd.Timestamp(first["event_time"]) - start) if first else None,
            }
        )
    return delays
