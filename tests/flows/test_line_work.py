"""Per-line work on Dask workers, as continual_update does when `prefect.dask_address` is set:
files checked ahead in ledger order with the driver's verdicts, line groups prepared and
finished on the workers, and a run that ends exactly like one without Dask."""

from __future__ import annotations

import pandas as pd
import pytest
from sqlalchemy import select

from flows.ingest.checks import check_file
from flows.ingest.expectations import ensure_suite, suite_path
from flows.monitor.status import pipeline_status
from flows.orchestrate.line_work import DaskLineWork
from flows.orchestrate.prefect_flows import continual_update
from flows.storage.database import Database
from flows.storage.models import DriftEvent, EntityState, SequenceMetrics
from tests.flows.helpers import assert_same_outcome, small_config, small_plant


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as running:
        yield running.scheduler_address


def test_checks_on_dask_match_checks_in_the_driver_and_keep_the_order(tmp_path, cluster):
    settings, _ = small_config(tmp_path, prefect={"dask_address": cluster})
    small_plant(
        settings, entities=3, batches=5, plant_files=True, broken_batches={"wrong_schema": 1, "out_of_range": 3}
    )
    (settings.paths.landing / "junk.csv").write_bytes(b"\x00\x01\x02 not a log")
    files = list(enumerate(sorted(settings.paths.landing.iterdir())))
    ensure_suite(settings.workdir, settings.log_schema)  # a pipeline's first run writes it
    work = DaskLineWork(cluster)
    try:
        remote = list(work.checked_ahead(settings, files))
        assert [batch_id for batch_id, _ in remote] == [batch_id for batch_id, _ in files]
        for (_, path), (_, check) in zip(files, remote, strict=True):
            local = check_file(
                path, settings.log_schema, suite_path(settings.workdir), settings.ingest.chunk_rows, work.groups
            )
            assert check.read_error == local.read_error, path.name
            assert check.rows == local.rows and check.groups == local.groups
            if local.outcome is None:
                continue
            assert_same_outcome(check.outcome, local.outcome, path.name)
            if local.outcome.success:  # the rows stayed on the workers, split by line group
                kept = sorted({"line-1", "line-2", "line-3"} - {q.entity for q in local.outcome.lines})
                assert len(check.groups) == min(2, len(kept)) and sorted(sum(check.groups, [])) == kept
                pd.testing.assert_frame_equal(
                    pd.concat(work.client.gather(check.parts)), pd.concat(local.parts), check_index_type=False
                )
        verdicts = [check.outcome.success if check.outcome else None for _, check in remote]
        assert False in verdicts and True in verdicts and any(c.read_error for _, c in remote)
        assert any(c.outcome.lines for _, c in remote if c.outcome)  # the out-of-range lines went alone
    finally:
        work.close()


def _state(settings):
    db = Database(settings.database_url)
    try:
        with db.session() as session:
            lines = {
                s.entity: (s.hidden_state, s.feature_state, s.drift_state, s.watermark, s.batches)
                for s in session.scalars(select(EntityState))
            }
            drift = sorted(
                session.execute(select(DriftEvent.sequence, DriftEvent.entity, DriftEvent.detector)).tuples().all()
            )
            workers = [m.metrics.get("dask_workers") for m in session.scalars(select(SequenceMetrics))]
        return lines, drift, workers
    finally:
        db.dispose()


@pytest.mark.slow
def test_a_run_with_dask_ends_exactly_like_one_without(tmp_path, prefect_api, cluster):
    """Plant files of five lines, so each file's lines split over both workers."""
    runs = {}
    for name, extra in (("local", {}), ("dask", {"prefect": {"dask_address": cluster}})):
        settings, config = small_config(tmp_path / name, initial_training={"batches": 3, "epochs": 1}, **extra)
        small_plant(
            settings,
            entities=5,
            batches=14,
            rows_per_batch=60,
            plant_files=True,
            gradual_drift_start=4,
            abrupt_drift_batch=8,
            broken_batches={"nan_burst": 6},
        )
        continual_update(config=config)
        runs[name] = (pipeline_status(settings), *_state(settings))
    (local, local_lines, local_drift, local_workers), (dask, dask_lines, dask_drift, dask_workers) = runs.values()
    assert (dask["batches"], dask["rows"]) == (local["batches"], local["rows"])
    assert local["batches"]["quarantined"] == 1 and local["batches"]["processed"] == 13
    assert dask_lines == local_lines  # hidden, feature and drift states byte for byte
    assert dask_drift == local_drift
    # Every file's line groups ran on the workers, spread over both; the scheduler may still
    # steal a group onto the other worker now and then (allow_other_workers), so not every file.
    assert set(local_workers) == {0.0} and set(dask_workers) <= {1.0, 2.0} and 2.0 in dask_workers


def test_the_driver_of_an_embedded_run_never_imports_dask():
    """Asking whether a line group ran on a Dask worker must not import `distributed` in a
    driver that has no scheduler (about half a second of a run's first file)."""
    import subprocess
    import sys

    code = (
        "import sys; from flows.orchestrate.line_work import _worker_address; "
        "print(_worker_address(), 'distributed' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["None", "False"]
