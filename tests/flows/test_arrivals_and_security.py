"""Arrivals (files still being written, concurrent runs) and security (unsafe checkpoints,
masked passwords, loopback binding, refused starts)."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select
from typer.testing import CliRunner

from flows.ingest.landing import discover
from flows.model.initial_training import flat_settings
from flows.model.live import CheckpointRefused
from flows.monitor.status import balanced, pipeline_status
from flows.monitor.tracking import Tracker
from flows.orchestrate.cli import app
from flows.orchestrate.pipeline import Pipeline
from flows.orchestrate.prefect_flows import continual_update
from flows.secrets import install_log_masking, mask_secrets
from flows.settings import load_settings
from flows.storage.database import Database
from flows.storage.models import Batch, BatchSummary, ModelState
from flows.storage.work_folder import resolved_path
from tests.flows.helpers import small_config, small_plant

runner = CliRunner()


def test_a_file_still_being_written_waits_until_it_is_stable(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    growing = landing / "line-9_batch-0001.csv"
    growing.write_text("entity,timestamp\n")
    ready, _ = discover(landing, stable_seconds=2.0)
    assert ready == []  # modified just now
    old = time.time() - 10
    os.utime(growing, (old, old))
    ready, _ = discover(landing, stable_seconds=2.0)
    assert [f.path.name for f in ready] == ["line-9_batch-0001.csv"]


def _run(config: str, api_url: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows", "run", "--config", config],
        env={**os.environ, "PREFECT_API_URL": api_url},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.mark.slow
def test_two_concurrent_runs_on_one_work_folder(tmp_path, prefect_api):
    from prefect.settings import PREFECT_API_URL

    settings, config = small_config(
        tmp_path, initial_training={"batches": 2, "epochs": 1}, drift={"on_detect": "record"}
    )
    truth = small_plant(settings, entities=2, batches=4, rows_per_batch=120, broken_batches={})
    runs = [_run(config, PREFECT_API_URL.value(), tmp_path / f"run-{i}.log") for i in range(2)]
    codes = [run.wait(timeout=600) for run in runs]
    assert codes == [0, 0], [(tmp_path / f"run-{i}.log").read_text()[-2000:] for i in range(2)]
    continual_update(config=config)  # whatever a busy run left is done now

    db = Database(settings.database_url)
    with db.session() as session:
        batches = list(session.scalars(select(Batch)))
        summaries = list(session.scalars(select(BatchSummary)))
        run_id = session.get(ModelState, settings.pipeline).online_run_id
    assert len(batches) == len(truth.files) and all(b.status == "processed" for b in batches)
    assert sum(b.rows_scored for b in batches) == len(truth.files) * truth.rows_per_batch
    assert len({(s.batch_id, s.part, s.entity) for s in summaries}) == len(summaries) == len(truth.files)
    status = pipeline_status(settings)
    assert balanced(status) and status["batches"]["duplicate"] == 0
    assert [v["kind"] for v in Tracker(settings).versions()].count("initial") == 1  # trained once
    steps = [m.step for m in Tracker(settings).client.get_metric_history(run_id, "rows")]
    assert len(steps) == len(set(steps)) == len(summaries)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle payload executed"))


def test_a_tampered_checkpoint_is_refused_not_executed(tmp_path, prefect_api):
    settings, config = small_config(
        tmp_path, initial_training={"batches": 1, "epochs": 1}, drift={"on_detect": "record"}
    )
    small_plant(settings, entities=1, batches=2, rows_per_batch=60, broken_batches={})
    continual_update(config=config)
    db = Database(settings.database_url)
    with db.session() as session:
        checkpoint = resolved_path(settings.workdir, session.get(ModelState, settings.pipeline).checkpoint_path)
    marker = tmp_path / "pwned"
    import torch

    torch.save({"model": _Exploit(marker)}, checkpoint)
    pipeline = Pipeline(load_settings(config))
    with pytest.raises(CheckpointRefused, match=f"checkpoint {checkpoint} holds more than tensors"):
        pipeline.live.load()
    assert not marker.exists()
    pipeline.close()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(checkpoint, weights_only=True)


SECRET_URL = "postgresql+psycopg://lru:s3cr3t-pw@127.0.0.1:1/lru"


def test_passwords_are_masked_in_logs_params_and_cli_output(tmp_path, caplog):
    install_log_masking()
    with caplog.at_level(logging.INFO):
        logging.getLogger("flows.test").info("connecting to %s and %s", SECRET_URL, "http://u:pw@minio:9000/bucket")
    assert "s3cr3t-pw" not in caplog.text and "lru:***@127.0.0.1" in caplog.text and "u:***@minio" in caplog.text
    assert mask_secrets("no url here") == "no url here"

    settings = load_settings(workdir=tmp_path, database_url=SECRET_URL)
    params = flat_settings(settings)
    assert all("s3cr3t-pw" not in value for value in params.values()) and "***" in params["database_url"]

    config = tmp_path / "servers.yaml"
    config.write_text(yaml.safe_dump({"workdir": str(tmp_path), "database_url": SECRET_URL}))
    result = runner.invoke(app, ["status", "--config", str(config), "--json"])
    assert result.exit_code == 2
    assert "cannot be reached" in result.output and "s3cr3t-pw" not in result.output and "***" in result.output


def test_bad_config_and_unreachable_database_refuse_to_start(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"drift": {"psi_threshold": "high"}}))
    result = runner.invoke(app, ["run", "--config", str(bad)])
    assert result.exit_code == 2 and "field 'drift.psi_threshold'" in result.output
    unreachable = tmp_path / "db.yaml"
    unreachable.write_text(
        yaml.safe_dump({"workdir": str(tmp_path), "database_url": "postgresql+psycopg://u@127.0.0.1:1/x"})
    )
    result = runner.invoke(app, ["run", "--config", str(unreachable)])
    assert result.exit_code == 2 and "database_url" in result.output and "cannot be reached" in result.output


def test_the_ui_binds_to_loopback_by_default(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda command: calls.append(command) or 0)
    result = runner.invoke(app, ["ui", "--workdir", str(tmp_path)])
    assert result.exit_code == 0
    command = calls[0]
    assert command[command.index("--host") + 1] == "127.0.0.1"
    with contextlib.suppress(ValueError):
        assert command[command.index("--backend-store-uri") + 1].startswith("sqlite:///")
