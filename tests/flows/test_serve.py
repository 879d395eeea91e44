"""`lru-online serve` on embedded defaults: it starts the work folder's Prefect server, whose
scheduler runs continual_update on its interval and whose automation starts retrain on the drift
event; SIGTERM stops serving and the server. Real processes, a real Prefect server."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import pytest
from sqlalchemy import select

from flows.orchestrate.local_server import api_answers, pid_alive, port_taken, prefect_home
from flows.storage.database import Database
from flows.storage.ledger import Ledger
from flows.storage.models import DriftEvent, RetrainDecision
from tests.flows.helpers import small_config, small_plant

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment(**extra: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    return {**environment, "PREFECT_LOGGING_LEVEL": "INFO", **extra}


def _cli(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _land(files: list[Path], landing: Path) -> None:
    for path in files:
        shutil.move(path, landing / path.name)


def _accounting(settings) -> dict:
    db = Database(settings.database_url)
    try:
        return Ledger(db, settings.workdir, settings.paths.archive, settings.paths.quarantine).accounting()
    finally:
        db.dispose()


def _wait(condition, seconds: float, what: str, serving: subprocess.Popen):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if serving.poll() is not None:
            pytest.fail(f"serve exited with {serving.returncode} while waiting for {what}:\n{serving.stdout.read()}")
        if found := condition():
            return found
        time.sleep(1)
    serving.send_signal(signal.SIGTERM)
    pytest.fail(f"no {what} within {seconds} s:\n{serving.communicate(timeout=60)[0][-5000:]}")


def test_serve_schedules_updates_triggers_retrain_and_stops_cleanly(tmp_path):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter

    port = _free_port()
    settings, config = small_config(
        tmp_path / "plant",
        schedule={"cron": None, "interval_seconds": 4},
        prefect={"local_port": port},
        # The drift event, not the update run itself, starts retrain: through the deployment trigger.
        drift={"on_detect": "event"},
        initial_training={"batches": 4, "epochs": 2},
    )
    # 16 batches, the drifts early enough that the second wave holds the abrupt one.
    small_plant(settings, batches=16, rows_per_batch=80, gradual_drift_start=6, abrupt_drift_batch=11)
    staged = tmp_path / "staged"
    shutil.move(settings.paths.landing, staged)
    settings.paths.landing.mkdir()
    files = sorted(staged.iterdir())
    batch_of = {path: int(path.stem.split("batch-")[1]) for path in files}
    waves = [[p for p in files if lo <= batch_of[p] < hi] for lo, hi in ((0, 8), (8, 16))]
    _land(waves[0], settings.paths.landing)

    serving = _cli("serve", "-c", config, env=_environment(PREFECT_RUNNER_POLL_FREQUENCY="1"))
    record = prefect_home(settings.workdir) / "server.json"
    server = _wait(lambda: record.exists() and json.loads(record.read_text()), 180, "Prefect server", serving)
    api_url = server["api_url"]
    assert api_url == f"http://127.0.0.1:{port}/api" and api_answers(api_url)
    assert (settings.workdir / ".prefect" / "prefect.db").exists()  # the server's database is the work folder's

    with SyncPrefectClient(api_url) as client:
        prefix = settings.prefect.deployment_prefix
        update = _wait(
            lambda: _deployment(client, f"continual-update/{prefix}-continual-update"), 120, "deployment", serving
        )
        # serve creates the two deployments one after the other: wait for the second too.
        retrain = _wait(lambda: _deployment(client, f"retrain/{prefix}-retrain"), 120, "deployment", serving)

        def completed_runs(deployment) -> list:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [deployment.id]}))
            return [run for run in runs if run.state and run.state.is_completed()]

        def wave_done(count: int, runs_before: int):
            """The completed update runs once `count` files are settled and a run newer than
            `runs_before` has finished (the run that settled them may still be closing)."""
            accounting = _accounting(settings)
            settled = sum(accounting["batches"][k] for k in ("processed", "quarantined"))
            runs = completed_runs(update)
            return settled == count and accounting["batches"]["pending"] == 0 and len(runs) > runs_before and runs

        first_runs = _wait(lambda: wave_done(len(waves[0]), 0), 300, "first wave processed", serving)
        _land(waves[1], settings.paths.landing)  # files land between scheduled runs
        runs = _wait(lambda: wave_done(len(files), len(first_runs)), 300, "second wave processed", serving)
        assert all(run.parameters["workdir"] == str(settings.workdir) for run in runs)
        assert {run.auto_scheduled for run in runs} == {True}

        retrains = _wait(lambda: completed_runs(retrain), 240, "retrain started by the drift trigger", serving)
        # Update runs due while one ran were cancelled by the deployment's limit, not run beside it.
        spans = sorted((run.start_time, run.end_time) for run in completed_runs(update))
        assert all(end <= next_start for (_, end), (next_start, _) in pairwise(spans)), spans

    (run,) = retrains[:1]
    assert run.parameters["trigger"] == "drift"
    db = Database(settings.database_url)
    try:
        with db.session() as session:
            drift_ids = set(session.scalars(select(DriftEvent.id)))
            decisions = session.execute(select(RetrainDecision.trigger, RetrainDecision.drift_event_id)).all()
    finally:
        db.dispose()
    assert int(run.parameters["drift_event_id"]) in drift_ids
    assert ("drift", int(run.parameters["drift_event_id"])) in decisions

    serving.send_signal(signal.SIGTERM)
    output = serving.communicate(timeout=120)[0]
    assert serving.returncode == 0, output[-3000:]
    assert f"Prefect UI: http://127.0.0.1:{port}/deployments" in output
    assert "lru-online ui --workdir" in output
    output = _without_stopped_flow_run_reports(output)
    for trouble in ("never awaited", "Traceback", "Error logging to API"):
        assert trouble not in output, output[-3000:]
    assert not record.exists()
    assert not pid_alive(server["pid"]) and not api_answers(api_url)
    assert not port_taken(port)  # a new server could start there


# A flow run starting as SIGTERM arrives can get Prefect's own SIGTERM handler raising where it
# cannot be caught: inside a garbage-collection callback (Python prints "Exception ignored in: ..."
# and goes on), inside a call from C++ (the flow-run process aborts with "terminate called ...
# what(): Traceback ..."), or while a task run is being created (Prefect's crash handling then
# fails itself, "ValueError: Task run is not set", and logs the chain). Either way the run is
# cancelled and the server stops cleanly, as asserted; only those reports are dropped.
_STOPPED_FLOW_RUN = re.compile(
    r"(?:Exception ignored in: [^\n]*\n|(?:terminate called [^\n]*\n)?[ \t]*what\(\):[ \t]+)"
    r"Traceback \(most recent call last\):\n(?:[ \t][^\n]*\n)*"
    r"(?:prefect\.exceptions\.)?TerminationSignal[^\n]*"
    # The interrupted task run's chain: every line up to Prefect's own error, no log line between.
    r"|Traceback \(most recent call last\):\n(?:(?!\d\d:\d\d:\d\d\.\d+ \|)[^\n]*\n)*?"
    r"ValueError: Task run is not set[^\n]*"
)


def _without_stopped_flow_run_reports(output: str) -> str:
    return _STOPPED_FLOW_RUN.sub("", output)


def _deployment(client, name: str):
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(name)
    except ObjectNotFound:
        return None


def test_serve_refuses_with_one_line_when_scheduling_cannot_work(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with taken:
        _, config = small_config(tmp_path / "port", prefect={"local_port": port})
        refused = _cli("serve", "-c", config, env=_environment())
        output = refused.communicate(timeout=120)[0]
    assert refused.returncode == 2
    assert output.strip().splitlines()[-1].startswith(f"error: cannot schedule: port {port} on 127.0.0.1 is taken")

    _, config = small_config(tmp_path / "api", prefect={"api_url": f"http://127.0.0.1:{_free_port()}/api"})
    refused = _cli("serve", "-c", config, env=_environment())
    output = refused.communicate(timeout=120)[0]
    assert refused.returncode == 2
    assert "error: cannot schedule: the Prefect API at" in output and "does not answer" in output

    _, config = small_config(tmp_path / "pool", prefect={"work_pool": "somewhere"})
    refused = _cli("serve", "-c", config, env=_environment())
    output = refused.communicate(timeout=120)[0]
    assert refused.returncode == 2
    assert "no Prefect server is set: set prefect.api_url" in output
