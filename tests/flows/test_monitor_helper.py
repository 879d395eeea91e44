from pathlib import Path

import pytest
from sqlalchemy import select

from flows.monitor.helper import MonitorHelper
from flows.monitor.tracking import Tracker
from flows.orchestrate.prefect_flows import continual_update
from flows.storage.database import Database
from flows.storage.models import BatchSummary, ModelState
from tests.flows.helpers import small_config, small_plant


def _driver_side(settings):
    database = Database(settings.database_url)
    database.migrate()
    return lambda: (database, Tracker(settings))


def test_the_helper_started_ahead_of_its_first_job_is_one_process_and_ends_cleanly(tmp_path):
    """The run starts the helper before its first file (its imports overlap the file): a
    second start keeps the same process, a run with no job for it waits for nothing, and
    closing ends it with exit status 0."""
    settings, _ = small_config(tmp_path)
    helper = MonitorHelper(settings, in_driver=_driver_side(settings))
    helper.start(files=3)
    process = helper._helper
    assert process is not None and process.poll() is None
    helper.start(files=3)
    assert helper._helper is process
    helper.wait()  # no job submitted: returns at once
    helper.close()
    assert process.returncode == 0 and helper._helper is None


@pytest.mark.parametrize("files", [1, 3])
def test_a_failed_job_fails_the_wait_in_the_helper_and_in_the_driver(tmp_path, files):
    """A run of one file does its jobs in the driver (no second interpreter to wait for), a
    run of more in the helper; either way a job that fails makes `wait` raise with its error,
    and no job file is left behind."""
    settings, _ = small_config(tmp_path)
    helper = MonitorHelper(settings, in_driver=_driver_side(settings))
    helper.start(files=files)
    assert (helper._helper is None) == (files == 1)
    helper.report("no-such-run", event_ids=[1], reference={})
    with pytest.raises(RuntimeError, match="monitoring helper"):
        helper.wait()
    helper.close()
    # The helper's job file went to the work folder and was removed once read.
    assert list((settings.workdir / "monitor-jobs").glob("*")) == []


def _logged_steps(settings) -> tuple[list[int], list[int]]:
    database = Database(settings.database_url)
    with database.session() as session:
        committed = sorted(set(session.scalars(select(BatchSummary.sequence))))
        run_id = session.get(ModelState, settings.pipeline).online_run_id
    database.dispose()
    logged = sorted(m.step for m in Tracker(settings).client.get_metric_history(run_id, "rows"))
    return committed, logged


def test_runs_of_one_file_log_its_metrics_from_the_driver(tmp_path: Path, prefect_api):
    """Runs of one file each (the driver does the tracking) leave MLflow holding every
    committed file's step once, as runs that went through the helper do."""
    settings, config = small_config(
        tmp_path, initial_training={"batches": 2, "epochs": 1}, drift={"on_detect": "record"}
    )
    small_plant(settings, entities=2, batches=4, rows_per_batch=120, broken_batches={})
    for expected_files in (1, 1, 1, 1):
        result = continual_update(config=config, max_batches=1)
        assert len(result["processed_files"]) == expected_files
        committed, logged = _logged_steps(settings)
        assert committed and logged == committed
