"""Files read and validated ahead of processing on a Dask cluster, as continual_update does
when `prefect.dask_address` is set: same verdicts as checking in the driver, in ledger order."""

from __future__ import annotations

import pytest

from flows.file_checks import check_file, checked_ahead
from flows.prefect_flows import continual_update
from flows.status import pipeline_status
from tests.flows.helpers import small_config, small_plant


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as running:
        yield running.scheduler_address


def _landed(settings):
    files = sorted(settings.paths.landing.iterdir())
    return [(index, path) for index, path in enumerate(files)]


def test_checks_on_dask_match_checks_in_the_driver_and_keep_the_order(tmp_path, prefect_api, cluster):
    settings, _ = small_config(tmp_path, prefect={"dask_address": cluster})
    small_plant(settings, batches=6, broken_batches={"wrong_schema": 1, "nan_burst": 2, "out_of_range": 3})
    (settings.paths.landing / "junk.csv").write_bytes(b"\x00\x01\x02 not a log")
    files = _landed(settings)
    with checked_ahead(settings, files) as checked:
        remote = list(checked)
    assert [batch_id for batch_id, _ in remote] == [batch_id for batch_id, _ in files]
    for (_, path), (_, check) in zip(files, remote, strict=True):
        local = check_file(path, settings.log_schema, settings.ingest.chunk_rows)
        assert check.read_error == local.read_error, path.name
        assert check.rows == local.rows
        if local.outcome is not None:
            assert check.outcome.success == local.outcome.success, path.name
            assert check.outcome.reasons == local.outcome.reasons
            if local.outcome.success:
                assert check.outcome.frame.equals(local.outcome.frame)
    verdicts = [check.outcome.success if check.outcome else None for _, check in remote]
    assert False in verdicts and True in verdicts and any(c.read_error for _, c in remote)


def test_without_a_scheduler_the_driver_checks_each_file_itself(tmp_path):
    settings, _ = small_config(tmp_path)
    files = [(1, tmp_path / "a.csv"), (2, tmp_path / "b.csv")]
    with checked_ahead(settings, files) as checked:
        assert list(checked) == [(1, None), (2, None)]


def test_a_run_with_dask_ends_like_one_without(tmp_path, prefect_api, cluster):
    results = []
    for name, extra in (("local", {}), ("dask", {"prefect": {"dask_address": cluster}})):
        settings, config = small_config(tmp_path / name, initial_training={"batches": 3, "epochs": 1}, **extra)
        small_plant(settings, batches=6, broken_batches={"nan_burst": 4})
        continual_update(config=config)
        status = pipeline_status(settings)
        results.append((status["batches"], status["rows"], status["drift_events"]))
    assert results[0] == results[1]
    assert results[0][0]["quarantined"] >= 1 and results[0][0]["processed"] >= 10
