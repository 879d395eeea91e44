"""Prefect's temporary API started by a command before its imports: a real server process that
answers and takes a real flow run, stopped when the command exits; none when the command already has
an API to report to; a server that cannot start is a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from flows.orchestrate.local_server import ServerUnavailable, api_answers
from flows.orchestrate.temporary_api import TemporaryApi

COMMAND = """
import os, sys, time
from pathlib import Path
from flows.orchestrate.temporary_api import TemporaryApi

with TemporaryApi(Path(sys.argv[1])) as api:
    from prefect import flow, get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event

    @flow
    def hello() -> int:
        get_run_logger().info("a log line the API receives at exit")
        emit_event("test.temporary-api", resource={"prefect.resource.id": "test"})
        return 7

    api.ready()
    assert hello() == 7
    with get_client(sync_client=True) as client:
        print(api.api_url, api.process.pid, len(client.read_flow_runs()), flush=True)
"""


@pytest.fixture
def no_api(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))
    return tmp_path


def test_the_server_takes_a_flow_run_and_is_gone_once_the_command_exits(no_api):
    """A command that runs a flow (a log line, an event) against the server it started: the run
    is in the work folder's Prefect database, and the server stops when the command exits."""
    started = time.monotonic()
    ran = subprocess.run([sys.executable, "-c", COMMAND, str(no_api)], capture_output=True, text=True, timeout=180)
    assert ran.returncode == 0, ran.stderr[-3000:]
    api_url, pid, runs = ran.stdout.split()
    assert int(runs) == 1
    assert time.monotonic() - started < 60  # stopped too early, Prefect's workers retried for > 60 s
    assert "connection attempts failed" not in ran.stderr.lower()
    assert not api_answers(api_url, timeout=0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid), 0)
    assert (no_api / ".prefect" / "prefect.db").exists()  # the work folder's own Prefect database


def test_a_command_with_an_api_to_report_to_starts_none(no_api, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    with TemporaryApi(no_api) as api:
        api.ready()
        assert api.process is None
    assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:9/api"
    monkeypatch.delenv("PREFECT_API_URL")
    (no_api / ".prefect").mkdir()
    (no_api / ".prefect" / "profiles.toml").write_text(
        'active = "plant"\n[profiles.plant]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n'
    )
    with TemporaryApi(no_api) as api:
        assert api.process is None and "PREFECT_API_URL" not in os.environ


def test_a_server_that_dies_before_it_answers_is_a_clear_error(no_api):
    with TemporaryApi(no_api, startup_timeout=60) as api:
        api.process.kill()  # the injected fault
        api.process.wait()
        expected = r"exited with code -9 before it answered \(log: .*temporary-api.log\)"
        with pytest.raises(ServerUnavailable, match=expected):
            api.ready()


def test_lru_online_run_exits_promptly_with_every_log_line_sent(tmp_path):
    """`lru-online run` on a work folder with a file landed runs its flow against the server it
    started and exits without a log line lost: stopped at the end of the command's block instead
    of at exit, Prefect's log worker found the port closed ("Error logging to API") and retried
    for over a minute."""
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "broken.csv").write_text("no,header,here\n1,2\n")
    os.utime(landing / "broken.csv", (time.time() - 3600, time.time() - 3600))  # landed and settled
    environment = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    environment["PREFECT_LOGGING_LEVEL"] = "INFO"  # log lines for the API to receive
    started = time.monotonic()
    ran = subprocess.run(
        [sys.executable, "-m", "flows", "run", "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=environment,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "Beginning flow run" in ran.stderr and "Finished in state Completed" in ran.stderr
    assert "Error logging to API" not in ran.stderr
    assert time.monotonic() - started < 60
    assert (tmp_path / ".prefect" / "temporary-api.log").exists()  # the command's own server ran
