"""Quarantine at the granularity of the fault, in real flow runs over plant-wide files: one bad
line never blinds the others, repeated and out-of-order timestamps cost what they concern, every
row is counted, and a quarantined line's carried state waits untouched for its next file."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import select

from flows.ingest.landing import read_batch
from flows.monitor.status import balanced, pipeline_status
from flows.orchestrate.prefect_flows import continual_update
from flows.storage.database import Database
from flows.storage.models import Batch, EntityState
from tests.flows.helpers import small_config, small_plant

LINES, ROWS = 50, 20


@pytest.fixture(scope="module")
def plant(tmp_path_factory, prefect_api):
    """A plant of 50 lines whose history (two plant-wide files) is processed; its next two
    files are held back for the tests to break."""
    workdir = tmp_path_factory.mktemp("plant")
    settings, config = small_config(
        workdir, initial_training={"batches": 2, "epochs": 1}, drift={"on_detect": "record"}
    )
    truth = small_plant(
        settings, entities=LINES, batches=4, rows_per_batch=ROWS, plant_files=True, broken_batches={}, anomaly_rate=0.0
    )
    held = [settings.paths.landing / name for name in truth.files[2:]]
    frames = [read_batch(path, settings.log_schema) for path in held]
    for path in held:
        path.unlink()
    continual_update(config=config)
    return settings, config, frames


def _states(settings) -> dict[str, tuple[int, bytes]]:
    db = Database(settings.database_url)
    with db.session() as session:
        found = {e.entity: (e.version, e.hidden_state) for e in session.scalars(select(EntityState))}
    db.dispose()
    return found


def _batch(settings, name: str) -> Batch:
    db = Database(settings.database_url)
    with db.session() as session:
        batch = session.scalars(select(Batch).where(Batch.source_file.like(f"%{name}"))).one()
    db.dispose()
    return batch


def test_one_bad_line_and_repeated_timestamps_cost_only_their_rows(plant):
    """In one plant file: line-7 reads 9,999 once (its 20 rows go), three lines repeat a
    timestamp (line-11 resends a row exactly: dropped; line-12 and line-13 send two different
    readings: those two rows each go), line-20's rows come shuffled (put in order). Every other
    row is scored, and the counts balance."""
    settings, config, frames = plant
    before = _states(settings)
    broken = frames[0].copy()
    rows_of = {line: broken.index[broken["entity"] == line] for line in broken["entity"].unique()}
    broken.loc[rows_of["line-7"][5], "temperature"] = 9999.0
    resent = broken.loc[[rows_of["line-11"][3]]]
    conflicting = [broken.loc[[rows_of[line][8]]].assign(flow=1.0) for line in ("line-12", "line-13")]
    shuffled = broken.loc[rows_of["line-20"]].sample(frac=1.0, random_state=0)
    broken = pd.concat([broken.drop(index=rows_of["line-20"]), shuffled, resent, *conflicting], ignore_index=True)
    broken.to_csv(settings.paths.landing / "plant-broken.csv", index=False)
    continual_update(config=config)

    batch = _batch(settings, "plant-broken.csv")
    assert batch.status == "processed"
    assert (batch.rows_received, batch.rows_duplicate) == (LINES * ROWS + 3, 1)
    assert batch.rows_quarantined == ROWS + 4  # line-7's rows, and both readings of each conflicting pair
    assert batch.rows_scored == LINES * ROWS - ROWS - 2
    listed = {q["line"]: q for q in pipeline_status(settings)["quarantined_lines"] if q["file"] == "plant-broken.csv"}
    assert {line: q["rows"] for line, q in listed.items()} == {"line-7": ROWS, "line-12": 2, "line-13": 2}
    assert "line 'line-7': column 'temperature'" in listed["line-7"]["reasons"][0]
    assert "physical range" in listed["line-7"]["reasons"][0] and listed["line-7"]["validation_page"]
    assert "share an (entity, timestamp) pair" in listed["line-12"]["reasons"][0]
    status = pipeline_status(settings)
    assert balanced(status) and status["rows"]["duplicate"] == 1

    after = _states(settings)
    assert after["line-7"] == before["line-7"]  # its carried state untouched
    assert all(after[line][0] == before[line][0] + 1 for line in before if line != "line-7")
    output = pd.read_parquet(settings.workdir / batch.output_path)
    assert "line-7" not in set(output["entity"]) and len(output) == batch.rows_scored
    line20 = output[output["entity"] == "line-20"]["timestamp"]
    assert len(line20) == ROWS and line20.is_monotonic_increasing


def test_the_quarantined_line_continues_from_its_state_in_the_next_file(plant):
    settings, config, frames = plant
    before = _states(settings)
    frames[1].to_csv(settings.paths.landing / "plant-next.csv", index=False)
    continual_update(config=config)
    batch = _batch(settings, "plant-next.csv")
    assert batch.status == "processed" and batch.rows_scored == LINES * ROWS and batch.rows_quarantined == 0
    after = _states(settings)
    assert after["line-7"][0] == before["line-7"][0] + 1 and after["line-7"][1] != before["line-7"][1]
    output = pd.read_parquet(settings.workdir / batch.output_path)
    line7 = output[output["entity"] == "line-7"]
    assert len(line7) == ROWS and np.isfinite(line7["forecast_h1_temperature"]).all()  # forecast from its state
    assert balanced(pipeline_status(settings))
