"""Raw log rows scored as the pipeline scores a landed file, without learning from them: the
features from each line's carried feature state, the forecasts from its carried hidden state,
the alarm from its carried calibration (flows.model.file_step does each step).

A line with no carried state starts fresh, as a new line does in the pipeline. Rows at or before
their line's watermark are flagged `late` and not scored, as the pipeline rejects them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from features import FeatureSpec
from flows.model.file_step import judge_lines, late_mask, prepare_lines, score_lines
from flows.model.forecast_mixture import MixtureSetup
from flows.storage.line_states import CarriedLines
from lru_online import OnlineLearner
from lru_online.alarms import AlarmConfig


class RawRowsError(ValueError):
    """Log rows the model cannot score; the message names the column or row."""


def output_columns(spec: FeatureSpec, horizon: int) -> dict[str, str]:
    """The scored columns after entity and timestamp, with their MLflow types."""
    columns = {
        "late": "long",
        "score": "double",
        "anomaly": "long",
        "anomaly_score": "double",
        "anomaly_threshold": "double",
    }
    for step in range(horizon):
        for sensor in spec.sensors:
            columns[f"forecast_h{step + 1}_{sensor}"] = "double"
    return columns


def score_raw_rows(
    learner: OnlineLearner,
    rows: pd.DataFrame,
    spec: FeatureSpec,
    alarms: AlarmConfig,
    carried: CarriedLines,
    mixture: MixtureSetup | None = None,
) -> pd.DataFrame:
    """One output row per input row, in the input's order and index; forecasts and scores are
    the mixture's where the pipeline mixes (`mixture`)."""
    frame = _checked(rows, spec)
    horizon = learner.model.config.horizon
    columns = output_columns(spec, horizon)
    out = {name: np.full(len(frame), np.nan) for name in columns}
    late = late_mask(frame, spec, carried.watermarks)
    out["late"] = late.astype(np.int64)
    out["anomaly"] = np.zeros(len(frame), dtype=np.int64)
    if not late.all():
        # The late rows are decided above, once: the rest go in with no watermark to test.
        features = prepare_lines(frame[~late], spec, carried.features, {}).features
        scored, _, _ = score_lines(learner, features, carried.hidden, mixture)
        judged = judge_lines(features, scored, carried.alarm, alarms)
        # The builder orders rows by line (sorted ids), then time, stably: the same order here
        # gives each feature row's place in the input.
        codes, _ = pd.factorize(frame[spec.entity_column], sort=True)
        stamps = pd.DatetimeIndex(frame[spec.timestamp_column]).as_unit("ns").asi8
        order = np.lexsort((stamps, codes))
        placed = order[~late[order]]
        out["score"][placed] = scored.scores
        out["anomaly"][placed] = judged.alarms.astype(np.int64)
        out["anomaly_score"][placed] = judged.scores
        out["anomaly_threshold"][placed] = judged.thresholds
        for step in range(horizon):
            for index, sensor in enumerate(spec.sensors):
                out[f"forecast_h{step + 1}_{sensor}"][placed] = scored.forecast[:, step, index]
    result = pd.DataFrame(out, index=rows.index)
    result.insert(0, spec.timestamp_column, frame[spec.timestamp_column].to_numpy())
    result.insert(0, spec.entity_column, frame[spec.entity_column].to_numpy())
    return result


def _checked(rows: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """The entity, timestamp and sensor columns, typed; a clear error naming what is wrong."""
    wanted = [spec.entity_column, spec.timestamp_column, *spec.sensors]
    missing = [c for c in wanted if c not in rows.columns]
    if missing:
        raise RawRowsError(f"log rows lack the columns {missing}; the model takes {wanted}")
    frame = rows[wanted].reset_index(drop=True)
    frame[spec.entity_column] = frame[spec.entity_column].astype(str)
    stamps = pd.to_datetime(frame[spec.timestamp_column], utc=True, errors="coerce")
    if stamps.isna().any():
        row = int(np.flatnonzero(stamps.isna().to_numpy())[0])
        raise RawRowsError(
            f"row {row}: {spec.timestamp_column} {rows[spec.timestamp_column].iloc[row]!r} is not a timestamp"
        )
    frame[spec.timestamp_column] = stamps
    for sensor in spec.sensors:
        values = pd.to_numeric(frame[sensor], errors="coerce")
        bad = values.isna() & frame[sensor].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise RawRowsError(f"row {row}: {sensor} {frame[sensor].iloc[row]!r} is not a number")
        frame[sensor] = values.astype(np.float64)
    return frame
