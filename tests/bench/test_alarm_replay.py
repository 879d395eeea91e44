"""bench/alarm_replay.py on a real flow run: re-judging the stored residuals under the settings
the run used gives back its `anomaly` flags row for row and its alarm episodes' onsets (the
files, parts, chunks, carried states and line order are all rebuilt right); under other
settings it judges afresh rather than reading the stored flags back."""

from __future__ import annotations

import pandas as pd
import pytest
from sqlalchemy import select

from bench.alarm_replay import replay
from flows.orchestrate.prefect_flows import continual_update
from flows.storage.database import Database
from flows.storage.models import AnomalyAlarm
from tests.flows.helpers import small_config, small_plant


def _stored(settings) -> tuple[pd.Series, list[tuple[str, pd.Timestamp]]]:
    spec = settings.feature_spec
    outputs = sorted((settings.workdir / "output" / "batches").glob("*.parquet"))
    frame = pd.concat([pd.read_parquet(p) for p in outputs], ignore_index=True)
    index = pd.MultiIndex.from_arrays(
        [frame[spec.entity_column].astype(str), pd.to_datetime(frame[spec.timestamp_column], utc=True)]
    )
    db = Database(settings.database_url)
    try:
        with db.session() as session:
            alarms = session.scalars(select(AnomalyAlarm)).all()
            onsets = sorted((a.entity, pd.Timestamp(a.start_ts)) for a in alarms)
    finally:
        db.dispose()
    return pd.Series(frame["anomaly"].astype(bool).to_numpy(), index=index).sort_index(), onsets


def test_replaying_the_run_settings_gives_back_its_flags_and_onsets(tmp_path, prefect_api):
    settings, config = small_config(
        tmp_path,
        drift={"on_detect": "record"},
        # Chunks within a file, a short warm-up and a followed level: every carried piece is used.
        alarms={"judge_rows": 50, "warmup_rows": 50, "tail_rows": 200},
    )
    small_plant(settings, entities=3, batches=14, rows_per_batch=120, plant_files=True, broken_batches={})
    continual_update(config=config)
    flags, onsets = _stored(settings)
    assert flags.sum() > 0 and onsets  # the plant's anomalies alarm

    same = replay(settings, settings.alarms.config())
    replayed = same.rows.set_index(["entity", "timestamp"])["anomaly"].astype(bool).sort_index()
    assert replayed.index.equals(flags.index)
    assert (replayed.to_numpy() == flags.to_numpy()).all()
    assert sorted(zip(same.onsets["entity"], same.onsets["timestamp"], strict=True)) == onsets

    looser = replay(settings, settings.alarms.model_copy(update={"false_alarm_rate": 0.2}).config())
    assert looser.rows["anomaly"].sum() > flags.sum()

    # A folder replayed under another log format's settings (here a line column it never had)
    # is refused with the file and the column named, not a pandas error.
    schema = settings.log_schema.model_copy(update={"entity_column": "series", "single_line": None})
    with pytest.raises(ValueError, match=r"batch-.*parquet has no line column 'series'.*--config"):
        replay(settings.model_copy(update={"log_schema": schema}), settings.alarms.config())
