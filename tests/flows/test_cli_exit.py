"""The command line ends without the interpreter's teardown (`flows.orchestrate.cli.main`):
what it printed is all there and its exit status is the command's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _lru_online(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(cwd / ".prefect")}
    return subprocess.run(
        [sys.executable, "-m", "flows", *arguments], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_a_command_that_succeeds_exits_0_with_its_whole_answer(tmp_path):
    done = _lru_online("run", "-w", str(tmp_path / "work"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["idle"] == 1


@pytest.mark.parametrize(
    ("arguments", "status", "message"),
    [
        (("run", "-c", "missing.yaml"), 2, "missing.yaml"),  # typer's own usage error
        (("backfill", "no-such-folder"), 2, "is not a folder"),  # the command's typer.Exit(2)
        (("no-such-command",), 2, "No such command"),
    ],
)
def test_a_command_that_fails_exits_with_its_status_and_its_message(tmp_path, arguments, status, message):
    done = _lru_online(*arguments, "-w", str(tmp_path / "work"), cwd=tmp_path)
    assert done.returncode == status
    assert message in done.stderr


_HEARTBEATS = """
from prefect.settings import get_current_settings
from flows.orchestrate.cli import _flows_without_heartbeats

with _flows_without_heartbeats():
    inside = get_current_settings().flows.heartbeat_frequency
print(inside, get_current_settings().flows.heartbeat_frequency)
"""


@pytest.mark.parametrize(
    ("environment", "inside", "after"),
    [
        ({}, "None", "180"),  # Prefect's default: off for the command's own flows, restored after
        ({"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "45"}, "45", "45"),  # set by the user: kept
        ({"PREFECT_RUNNER_HEARTBEAT_FREQUENCY": "60"}, "60", "60"),  # Prefect's legacy name too
    ],
)
def test_a_commands_own_flows_run_without_heartbeats_unless_configured(tmp_path, environment, inside, after):
    """The flow engine reads the frequency from the current settings when a run starts; with
    none it starts no heartbeat thread, whose whole-second sleep the run's end would wait for."""
    env = {k: v for k, v in os.environ.items() if "HEARTBEAT" not in k}
    env.update(environment, PREFECT_HOME=str(tmp_path / ".prefect"))
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _HEARTBEATS], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [inside, after]
