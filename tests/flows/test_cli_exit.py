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
