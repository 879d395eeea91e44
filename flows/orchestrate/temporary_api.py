"""Prefect's temporary local API for one command, started before the command's own imports.

With no Prefect API configured (`prefect.api_url`, PREFECT_API_URL) and no `serve` running
for the work folder, Prefect starts a temporary API the first time a flow needs one: after the
command has imported torch, river, MLflow and the flows (~4 s on 2 cores), Prefect imports its
server module (~2.7 s) and boots it in a subprocess (~4 s), while the command waits. A command
that will run a flow starts the same server process itself (Prefect's own command line for its
temporary API, uvicorn over `prefect.server.api.server:create_app`, on the work folder's
Prefect database) before those imports, so the server boots on the other core while the command
imports, and reports to it through PREFECT_API_URL. It stops with the command, as Prefect's own
would.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import TracebackType

from flows.orchestrate.local_server import HOST, ServerUnavailable, api_answers, prefect_home

LOG = "temporary-api.log"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _profile_api_url(home: Path) -> str | None:
    """PREFECT_API_URL of the active Prefect profile in `home`, read without importing Prefect."""
    try:
        profiles = tomllib.loads((home / "profiles.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")


def _prefect_parent() -> str:
    """The folder holding the prefect package, found without importing it (~1 s)."""
    spec = importlib.util.find_spec("prefect")
    if spec is None or not spec.submodule_search_locations:
        raise ServerUnavailable("the prefect package is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))).parent)


class TemporaryApi:
    """A context manager: starts the server process on entry when the command has no API to
    report to (and sets PREFECT_API_URL for the command and what it starts), `ready` waits for
    its health check; it stops when the command exits (`stop`)."""

    def __init__(self, workdir: Path, startup_timeout: float | None = None) -> None:
        self.workdir = workdir
        self.startup_timeout = startup_timeout or float(
            os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        )
        self.process: subprocess.Popen | None = None
        self.api_url: str | None = None

    @property
    def home(self) -> Path:
        """Prefect's home for the command: PREFECT_HOME (the CLI sets the work folder's)."""
        return Path(os.environ.get("PREFECT_HOME") or prefect_home(self.workdir))

    @property
    def log_path(self) -> Path:
        return self.home / LOG

    def __enter__(self) -> TemporaryApi:
        if "PREFECT_API_URL" in os.environ or _profile_api_url(self.home):  # an API to report to already
            return self
        port = _free_port()
        self.api_url = f"http://{HOST}:{port}/api"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        environment = {
            **os.environ,  # PREFECT_HOME included: the work folder's (flows.orchestrate.cli)
            # As Prefect starts its own temporary API: no UI, marked ephemeral.
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            # No block types registered at boot: the pipeline uses no Prefect blocks, and
            # registering loads every installed collection (prefect-dask; 0.9 s of the boot's
            # 4.2 s, which the command's first file waits for). A `serve`d API registers them.
            "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
            "PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false",
        }
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "uvicorn", "--app-dir", _prefect_parent(), "--factory",
                    "prefect.server.api.server:create_app", "--host", HOST, "--port", str(port),
                    "--log-level", "error", "--lifespan", "on",
                ],
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        os.environ["PREFECT_API_URL"] = self.api_url
        return self

    def ready(self) -> None:
        """Waits until the server answers its health check (nothing to wait for without one)."""
        if self.process is None or self.api_url is None:
            return
        deadline = time.monotonic() + self.startup_timeout
        while not api_answers(self.api_url, timeout=1.0):
            if self.process.poll() is not None:
                raise ServerUnavailable(
                    f"Prefect's temporary API exited with code {self.process.returncode} before it answered "
                    f"(log: {self.log_path})"
                )
            if time.monotonic() > deadline:
                raise ServerUnavailable(
                    f"Prefect's temporary API did not answer within {self.startup_timeout:.0f} s (log: {self.log_path})"
                )
            time.sleep(0.05)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.process is None:
            return
        if "prefect" in sys.modules:
            # Prefect's workers (events, logs) send what they hold at interpreter exit, from
            # threading's exit hooks; the server must outlive them, as Prefect's own temporary
            # API does (stopped from atexit, which runs after those hooks). Stopped here, they
            # retried a closed port for over a minute.
            atexit.register(self.stop)
        else:
            self.stop()

    def stop(self) -> None:
        """Stops the server and takes its URL out of the environment."""
        if self.process is None:
            return
        if os.environ.get("PREFECT_API_URL") == self.api_url:
            del os.environ["PREFECT_API_URL"]
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
