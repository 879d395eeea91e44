"""The pipeline on real servers: Postgres, the MLflow server with S3 artifacts, the Prefect
server with its work pool and worker, Dask. The same batches run through the embedded and the
servers profile (only configuration differs) and must end in the same state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
import sqlalchemy as sa
import torch
from sqlalchemy import select

from flows.settings import derive_config, load_settings
from flows.storage.database import Database
from flows.storage.models import Base, DriftEvent, EntityState, RetrainDecision, SequenceMetrics
from infra import services
from lru_online import codec
from tests.flows.helpers import SMALL

pytestmark = [pytest.mark.servers, pytest.mark.slow]
CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# The demo's sequence scaled down: two lines, a gradual and an abrupt drift, four broken files.
# Plant files (every line's rows of a period in one file), as a fleet exports them.
BATCHES = 16
SIMULATION = ["--entities", "2", "--batches", str(BATCHES), "--rows", "120", "--seed", "11", "--plant-files"]


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process: subprocess.Popen, what: str) -> str:
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, f"{what} failed:\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def runs(infra, tmp_path_factory):
    """The same simulated plant through both profiles, side by side."""
    root = tmp_path_factory.mktemp("profiles")
    name = f"servers-{uuid.uuid4().hex[:8]}"
    # A plant file holds both lines: half as many files make the same 4 periods of each line.
    small = {**SMALL, "initial_training": {**SMALL["initial_training"], "batches": 4}}
    embedded = derive_config(CONFIGS / "embedded.yaml", root / "embedded", small)
    # A fresh database and experiment for this run; everything else is configs/servers.yaml.
    servers = derive_config(
        CONFIGS / "servers.yaml",
        root / "servers",
        {
            **small,
            "database_url": services.create_database("lru_test"),
            "pipeline": name,
            "tracking": {"experiment": name, "model_name": name},
            "prefect": {"deployment_prefix": name},
        },
    )
    for config in (embedded, servers):
        _finish(_cli("simulate", "-c", str(config), *SIMULATION), "simulate")
    # The embedded run must not find the server through the environment.
    clean = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API_URL")}
    started = [
        subprocess.Popen(
            [sys.executable, "-m", "flows", "run", "-c", str(config)],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for config, environment in ((embedded, clean), (servers, os.environ))
    ]
    logs = [_finish(process, "run") for process in started]
    return load_settings(embedded), load_settings(servers), logs


def _status(settings) -> dict:
    from flows.monitor.status import pipeline_status

    return pipeline_status(settings)


def _rows(settings, model, *columns):
    db = Database(settings.database_url)
    try:
        with db.session() as session:
            return [tuple(getattr(row, c) for c in columns) for row in session.scalars(select(model))]
    finally:
        db.dispose()


def test_servers_profile_ends_like_the_embedded_one(runs):
    embedded, servers, logs = runs
    left, right = _status(embedded), _status(servers)
    assert right["batches"] == left["batches"] and right["rows"] == left["rows"]
    # Of the simulator's four broken kinds, a line's rows out of order are put in order: three
    # files are quarantined whole, and both profiles take out the same rows of the same lines.
    assert left["batches"]["processed"] == BATCHES - 3 and left["batches"]["quarantined"] == 3
    assert [(q["file"], q["line"], q["rows"]) for q in right["quarantined_lines"]] == [
        (q["file"], q["line"], q["rows"]) for q in left["quarantined_lines"]
    ]
    assert [(q["file"], q["reasons"]) for q in right["quarantined_files"]] == [
        (q["file"], q["reasons"]) for q in left["quarantined_files"]
    ]
    drift = ("sequence", "entity", "detector", "feature", "action")
    assert sorted(_rows(servers, DriftEvent, *drift)) == sorted(_rows(embedded, DriftEvent, *drift))
    assert left["drift_events"] >= 2
    decisions = ("trigger", "champion_version", "challenger_version", "promoted")
    assert sorted(_rows(servers, RetrainDecision, *decisions)) == sorted(_rows(embedded, RetrainDecision, *decisions))
    for key in ("model_versions", "champion_version", "challenger_version"):
        assert right[key] == left[key], key
    assert [v["kind"] for v in right["versions"]] == [v["kind"] for v in left["versions"]]


def test_carried_state_is_the_same_on_both_profiles(runs):
    embedded, servers, _ = runs
    columns = ("entity", "hidden_state", "feature_state", "batches")
    left = {row[0]: row for row in _rows(embedded, EntityState, *columns)}
    right = {row[0]: row for row in _rows(servers, EntityState, *columns)}
    assert left.keys() == right.keys() and left
    for entity in left:
        assert right[entity][2] == left[entity][2] and right[entity][3] == left[entity][3]
        mine, _ = codec.decode(left[entity][1])
        theirs, _ = codec.decode(right[entity][1])
        for key in mine:
            torch.testing.assert_close(theirs[key], mine[key], rtol=1e-5, atol=1e-6)


def test_the_per_line_work_ran_on_the_dask_workers(runs):
    """Every file after initial training was read, validated, featurised, drift-checked and
    written out on the workers: its committed metrics name how many took part."""
    _, servers, _ = runs
    workers = _rows(servers, SequenceMetrics, "metrics")
    summary = _status(servers)["batches"]
    assert len(workers) == summary["processed"]
    assert all(metrics["dask_workers"] >= 1 for (metrics,) in workers), workers


def _rest(uri: str, path: str, **query) -> dict:
    url = f"{uri}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def test_mlflow_server_lists_the_runs_and_the_champion_alias(runs):
    _, servers, _ = runs
    uri = servers.tracking.tracking_uri
    experiment = _rest(uri, "experiments/get-by-name", experiment_name=servers.tracking.experiment)["experiment"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:")
    request = urllib.request.Request(
        f"{uri}/api/2.0/mlflow/runs/search",
        data=json.dumps({"experiment_ids": [experiment["experiment_id"]], "max_results": 500}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        found = json.loads(response.read()).get("runs", [])
    kinds = {tag["value"] for run in found for tag in run["data"].get("tags", []) if tag["key"] == "lru-online.kind"}
    assert {"online", "initial", "retrain"} <= kinds, kinds
    champion = _rest(uri, "registered-models/alias", name=servers.tracking.model_name, alias="champion")
    assert champion["model_version"]["version"] == _status(servers)["champion_version"]


def test_artifacts_land_in_the_s3_bucket(runs):
    _, servers, _ = runs
    uri, name = servers.tracking.tracking_uri, servers.tracking.experiment
    experiment = _rest(uri, "experiments/get-by-name", experiment_name=name)
    s3 = boto3.client(
        "s3",
        endpoint_url=services.S3_ENV["MLFLOW_S3_ENDPOINT_URL"],
        aws_access_key_id=services.S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=services.S3_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=services.S3_ENV["AWS_DEFAULT_REGION"],
    )
    prefix = f"mlflow/{experiment['experiment']['experiment_id']}/"
    keys = [
        obj["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=services.BUCKET, Prefix=prefix)
        for obj in page.get("Contents", [])
    ]
    assert any(key.endswith("/MLmodel") for key in keys), keys[:20]
    assert not (Path(servers.workdir) / "mlartifacts").exists()


def test_alembic_upgrade_and_downgrade_on_postgres(infra):
    db = Database(services.create_database("lru_test"))
    try:
        db.migrate()
        tables = set(sa.inspect(db.engine).get_table_names())
        assert set(Base.metadata.tables) <= tables
        db.downgrade("base")
        assert sa.inspect(db.engine).get_table_names() == ["alembic_version"]
        db.migrate()
        assert set(Base.metadata.tables) <= set(sa.inspect(db.engine).get_table_names())
    finally:
        db.dispose()


def test_drift_event_triggers_retrain_through_the_work_pool(runs):
    """Last: the retrain it starts changes the servers run's registry."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter

    _, servers, _ = runs
    config = str(Path(servers.workdir) / "config.yaml")
    deployed = _finish(_cli("serve", "-c", config), "serve")
    assert f"on work pool {servers.prefect.work_pool}" in deployed
    env = {"PREFECT_API_URL": servers.prefect.api_url}
    emit = [
        "-c",
        "from flows.orchestrate.prefect_flows import emit_drift_event; import sys; "
        "emit_drift_event(sys.argv[1], sys.argv[2], [int(sys.argv[3])], 0)",
        servers.pipeline,
        servers.drift.event_name,
    ]
    (event_id,) = [row[0] for row in _rows(servers, DriftEvent, "id")][:1]
    before = _rows(servers, RetrainDecision, "trigger", "drift_event_id").count(("drift", event_id))
    with SyncPrefectClient(servers.prefect.api_url) as client:
        deployment = client.read_deployment_by_name(f"retrain/{servers.prefect.deployment_prefix}-retrain")
        deadline, emitted_at, flow_runs = time.monotonic() + 300, -1e9, []
        while time.monotonic() < deadline:
            flow_runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [deployment.id]}))
            if any(run.state and run.state.is_final() for run in flow_runs):
                break
            # The server loads a new automation within seconds; an event sent before that is
            # not matched, so it is sent again while no run has appeared.
            if not flow_runs and time.monotonic() - emitted_at > 20:
                _finish(_cli_python(*emit, str(event_id), env=env), "emit")
                emitted_at = time.monotonic()
            time.sleep(3)
    (run,) = [run for run in flow_runs if run.state and run.state.is_final()][:1]
    assert run.state.is_completed(), run.state
    assert run.parameters["trigger"] == "drift"
    assert int(run.parameters["drift_event_id"]) == event_id
    decisions = _rows(servers, RetrainDecision, "trigger", "drift_event_id").count(("drift", event_id))
    # An event sent again before the automation was loaded can start a second run, queued
    # behind the first: one decision per run started for this event, read after the decisions.
    with SyncPrefectClient(servers.prefect.api_url) as client:
        started = [
            r
            for r in client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [deployment.id]}))
            if str(r.parameters.get("drift_event_id")) == str(event_id)
        ]
    assert before + 1 <= decisions <= before + len(started), (before, decisions, len(started))


def _cli_python(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args], env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
