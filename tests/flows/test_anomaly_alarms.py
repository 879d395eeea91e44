"""Anomaly alarms in a real flow run: a fault injected into one line of a plant's last two files
alarms on that line only, the alarm running on from one file into the next is one stored alarm,
the same fault on every line of the next file at once is one plant-level alarm, and the output
rows, the status, MLflow and the Prefect events read back from the API (one per episode, one for
the plant's) count the same alarms."""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd
from sqlalchemy import select
from typer.testing import CliRunner

from flows.ingest.landing import read_batch
from flows.monitor.status import pipeline_status
from flows.monitor.tracking import Tracker
from flows.orchestrate.cli import app
from flows.orchestrate.prefect_flows import continual_update
from flows.storage.database import Database
from flows.storage.models import AnomalyAlarm, ModelState, PlantAlarm
from tests.flows.helpers import small_config, small_plant

# Any quiet row ends an episode here: the fault's alarm is then its own, whatever alarmed before.
ALARMS = {
    "false_alarm_rate": 0.02,
    "smoothing_rows": 1,
    "calibration_rows": 200,
    "warmup_rows": 50,
    "episode_gap_rows": 1,
    # With any quiet row ending an episode, the rows' rate control would end the stuck fault's
    # episode where its rows fade below the raised bar, and the next row would open another.
    "continuation_step": 0.0,
}


def test_a_fault_across_two_files_is_one_alarm_on_its_line(tmp_path, prefect_api):
    started = datetime.now(UTC)
    settings, config = small_config(
        tmp_path, initial_training={"batches": 2, "epochs": 2}, drift={"on_detect": "record"}, alarms=ALARMS
    )
    truth = small_plant(settings, entities=3, batches=9, rows_per_batch=60, plant_files=True, broken_batches={})
    last_three = [settings.paths.landing / name for name in truth.files[-3:]]
    frames = [read_batch(path, settings.log_schema) for path in last_three]
    for path in last_three:
        path.unlink()
    continual_update(config=config)  # the plant's history: every line calibrates its detector

    # Pressure stuck high on line-2 over the last 15 rows of the first file and the first 10 of the
    # second (longer, the running feature scaler takes the stuck level in and its rows fade).
    faulty = []
    for number, frame in enumerate(frames[:2]):
        line = frame.index[frame["entity"] == "line-2"]
        span = line[-15:] if number == 0 else line[:10]
        frame.loc[span, "pressure"] = 24.5  # stuck at the top of its physical range [0, 25]
        faulty += list(
            zip(frame.loc[span, "entity"], pd.to_datetime(frame.loc[span, "timestamp"], utc=True), strict=True)
        )
        frame.to_csv(settings.paths.landing / f"fault-{number}.csv", index=False)
        continual_update(config=config)
    # Then the plant's pressure header fails: every line's pressure stuck high over the same rows.
    plant_wide = frames[2]
    stuck = plant_wide.groupby("entity").cumcount().between(20, 34)
    plant_wide.loc[stuck, "pressure"] = 24.5
    plant_wide.to_csv(settings.paths.landing / "plant-fault.csv", index=False)
    continual_update(config=config)

    db = Database(settings.database_url)
    with db.session() as session:
        alarms = list(session.scalars(select(AnomalyAlarm).order_by(AnomalyAlarm.id)))
        plants = list(session.scalars(select(PlantAlarm)))
        run_id = session.get(ModelState, settings.pipeline).online_run_id
    db.dispose()
    fault_start, fault_end = faulty[0][1], faulty[-1][1]
    on_fault = [a for a in alarms if a.entity == "line-2" and a.end_ts >= fault_start and a.start_ts <= fault_end]
    assert len(on_fault) == 1, [(a.entity, a.start_ts, a.end_ts) for a in alarms]
    alarm = on_fault[0]
    assert alarm.start_ts <= faulty[3][1] and alarm.end_ts >= faulty[-2][1]  # into the second file
    assert alarm.rows >= len(faulty) - 3 and alarm.peak_score > alarm.threshold
    assert alarm.plant_alarm_id is None

    # The plant-wide fault: one plant-level alarm naming every line, their own alarms pointing to it.
    assert len(plants) == 1, [(p.entities, p.start_ts) for p in plants]
    plant = plants[0]
    assert plant.entities == sorted(plant_wide["entity"].unique()) and plant.share == 1.0
    stuck_times = pd.to_datetime(plant_wide.loc[stuck, "timestamp"], utc=True)
    assert stuck_times.min() <= plant.start_ts <= stuck_times.min() + pd.Timedelta(minutes=5)
    # Its lines' alarms: those opened in the file, and one alarming on from the file before that
    # started again there (its rows before the plant's file are not the plant's).
    members = [a for a in alarms if a.plant_alarm_id == plant.id]
    assert sorted({a.entity for a in members}) == plant.entities
    assert plant.end_ts == max(a.end_ts for a in members)
    assert 0 < plant.rows <= sum(a.rows for a in members)

    outputs = pd.concat(
        pd.read_parquet(p, columns=["entity", "timestamp", "anomaly", "anomaly_score", "anomaly_threshold"])
        for p in sorted((settings.paths.output / "batches").glob("*.parquet"))
    ).set_index(["entity", "timestamp"])
    flagged = outputs.loc[faulty, "anomaly"]
    assert flagged.mean() > 0.9
    assert outputs["anomaly"].sum() == sum(a.rows for a in alarms)  # every alarmed row is in one alarm
    alarmed = outputs[outputs["anomaly"] == 1]
    assert (alarmed["anomaly_score"] > alarmed["anomaly_threshold"]).all()

    status = pipeline_status(settings)["anomaly_alarms"]
    assert (status["alarms"], status["rows"]) == (len(alarms), int(outputs["anomaly"].sum()))
    assert status["plant_alarms"] == 1 and status["latest_plant"][0]["entities"] == plant.entities
    shown = CliRunner().invoke(app, ["status", "--config", config])
    assert shown.exit_code == 0, shown.output
    assert f"{len(alarms)} on {status['lines']} line(s), {status['rows']} rows, 1 plant-level" in shown.output
    assert f"latest plant-level alarm: 3 lines from {plant.start_ts.isoformat()}" in shown.output
    client = Tracker(settings).client
    assert sum(m.value for m in client.get_metric_history(run_id, "alarms_started")) == len(alarms)
    assert sum(m.value for m in client.get_metric_history(run_id, "plant_alarms_started")) == 1

    # Read back from the Prefect API: one event per alarm episode of a line's own (or opened
    # before the plant's file), with its line and onset; one for the plant-level alarm, naming
    # its lines and their alarms.
    expected = sorted(a.id for a in alarms if a.plant_alarm_id is None or a.batch_id != plant.batch_id)
    events = _pipeline_events(
        settings.alarms.event_name, settings.pipeline, started, until=lambda events: _announced(events) == expected
    )
    assert _announced(events) == expected
    fault_event = next(e for e in events if e["payload"]["alarm_id"] == alarm.id)
    assert fault_event["payload"]["line"] == "line-2" and fault_event["payload"]["file"] == "fault-0.csv"
    assert pd.Timestamp(fault_event["payload"]["onset"]) == pd.Timestamp(alarm.start_ts)
    plant_events = _pipeline_events(
        settings.alarms.plant.event_name, settings.pipeline, started, until=lambda events: len(events) >= 1
    )
    assert [e["payload"]["plant_alarm_id"] for e in plant_events] == [plant.id]
    payload = plant_events[0]["payload"]
    assert payload["lines"] == plant.entities and sorted(payload["alarm_ids"]) == sorted(a.id for a in members)
    assert payload["file"] == "plant-fault.csv"


def _announced(events: list[dict]) -> list[int]:
    return sorted(e["payload"]["alarm_id"] for e in events)


def _pipeline_events(name: str, pipeline: str, since: datetime, until, seconds: float = 60.0) -> list[dict]:
    """The pipeline's events of that name since `since` that the Prefect API holds, once
    `until(events)` is true or `seconds` have passed: its persister writes events a moment after
    they are emitted, and not all of a run's at once."""
    import time

    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + seconds
    while True:
        with get_client(sync_client=True) as client:
            response = client.request(
                "POST",
                "/events/filter",
                json={"filter": {"event": {"name": [name]}, "occurred": {"since": since.isoformat()}}, "limit": 50},
            )
        events = [e for e in response.json()["events"] if e["resource"]["prefect.resource.name"] == pipeline]
        if until(events) or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def _fault_free_plant_of_30_lines(tmp_path, initial_files: int, epochs: int, files: int, valve_change: int):
    """30 lines, 40 rows each per plant-wide file, no faults and no bearing wear, every line's
    valve changed from file `valve_change` on, through a real flow run; its settings."""
    settings, config = small_config(
        tmp_path, initial_training={"batches": initial_files, "epochs": epochs}, drift={"on_detect": "record"}
    )
    small_plant(
        settings,
        entities=30,
        batches=files,
        rows_per_batch=40,
        plant_files=True,
        broken_batches={},
        anomaly_rate=0.0,
        gradual_drift_start=99,
        abrupt_drift_batch=valve_change,
    )
    continual_update(config=config)
    return settings


def test_a_fault_free_plant_of_small_files_alarms_within_its_rate(tmp_path, prefect_api):
    """A plant of 30 lines, 40 rows per line per plant-wide file, no faults and no drift, with the
    embedded defaults' alarms: its live rows alarm at most 2α. The consistency columns start
    reporting after a line's first 100 readings, when the forecast columns already have a scale
    and held scores; read against the line's rows before they started, they alarmed at ~6α."""
    settings = _fault_free_plant_of_30_lines(tmp_path, initial_files=2, epochs=1, files=12, valve_change=99)
    outputs = sorted((settings.workdir / "output" / "batches").glob("*.parquet"))
    rows = pd.concat([pd.read_parquet(p, columns=["anomaly", "anomaly_threshold"]) for p in outputs])
    live = rows[rows["anomaly_threshold"] < float("inf")]  # past each line's warm-up
    assert len(live) >= 30 * 40 * 5
    assert live["anomaly"].mean() <= 2 * settings.alarms.false_alarm_rate


def test_a_change_made_on_every_line_at_once_is_judged_relative_to_the_plant(tmp_path, prefect_api):
    """30 lines in plant-wide files; from file 8 on every line's valve is changed (the pressure
    and flow relation jumps), no faults. Judged relative to the plant (the defaults), that file's
    rows alarm at well under the rate each line alone gives them (its stored residuals re-judged
    with `common_mode_lines: 0` through the pipeline's own judge), and the other files' rows
    alarm no more often than alone."""
    from dataclasses import replace

    from bench.alarm_replay import replay

    settings = _fault_free_plant_of_30_lines(tmp_path, initial_files=4, epochs=2, files=11, valve_change=8)
    assert settings.alarms.common_mode_lines == 20
    change, others = {}, {}
    for name, lines in (("plant", 20), ("alone", 0)):
        rows = replay(settings, replace(settings.alarms.config(), common_mode_lines=lines)).rows
        files = rows.groupby("entity").cumcount() // 40
        change[name] = rows["anomaly"][files == 8].mean()
        others[name] = rows["anomaly"][files > 4][files != 8].mean()
        if name == "plant":  # the replay gives back what the run flagged (tests/bench/test_alarm_replay.py)
            outputs = sorted((settings.workdir / "output" / "batches").glob("*.parquet"))
            stored = pd.concat([pd.read_parquet(p, columns=["entity", "anomaly"]) for p in outputs])
            assert int(stored["anomaly"].sum()) == int(rows["anomaly"].sum())
    alpha = settings.alarms.false_alarm_rate
    assert change["alone"] > 10 * alpha
    assert change["plant"] < 0.6 * change["alone"]
    assert others["plant"] <= others["alone"] + alpha
