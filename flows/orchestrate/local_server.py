"""A Prefect server of the work folder, for `lru-online serve` on embedded defaults.

Prefect's temporary local API has no scheduler and no automations, so deployments served against
it never run. `serve` therefore starts `prefect server start` on 127.0.0.1 with its SQLite
database in `<workdir>/.prefect` (the same one the temporary API of the other commands uses, so
the plant's flow-run history stays in one place) and stops it when it stops. While it runs,
`server.json` beside the database names it, so the other commands report their flow runs to it
instead of opening the database beside it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
RECORD = "server.json"


class ServerUnavailable(RuntimeError):
    """Scheduling cannot work: the one-line reason is the message."""


def prefect_home(workdir: Path) -> Path:
    return workdir / ".prefect"


def api_answers(api_url: str, timeout: float = 2.0) -> bool:
    """Whether a Prefect API answers its health check at `api_url` (".../api")."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def running_server_url(workdir: Path) -> str | None:
    """The API URL of the work folder's local server when one is running and answering."""
    record = prefect_home(workdir) / RECORD
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if not pid_alive(int(data.get("pid", 0))) or not api_answers(data["api_url"]):
        return None
    return data["api_url"]


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return True
    return False


@dataclass
class LocalPrefectServer:
    """`prefect server start` for one work folder; a context manager that starts it, waits
    until its API answers and stops it (and everything it started) on exit."""

    workdir: Path
    port: int
    startup_timeout: float = 120.0
    process: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def home(self) -> Path:
        return prefect_home(self.workdir)

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    def environment(self) -> dict[str, str]:
        environment = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
        environment.update(
            {
                "PREFECT_HOME": str(self.home),
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
                "PREFECT_SERVER_API_HOST": HOST,
                "PREFECT_SERVER_API_PORT": str(self.port),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                # What scheduling and the drift trigger need, whatever the user's profile says.
                "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "true",
                "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "true",
                "PREFECT_SERVER_UI_ENABLED": "true",
            }
        )
        return environment

    def start(self) -> None:
        other = running_server_url(self.workdir)
        if other:
            raise ServerUnavailable(f"a Prefect server of {self.workdir} is already running at {other}")
        if port_taken(self.port):
            raise ServerUnavailable(
                f"port {self.port} on {HOST} is taken, so no Prefect server can start there: "
                "stop what uses it or set prefect.local_port (LRU_ONLINE_PREFECT__LOCAL_PORT)"
            )
        self.home.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(self.port)],
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stopped as a whole, not by a terminal's ^C
            )
        deadline = time.monotonic() + self.startup_timeout
        while not api_answers(self.api_url):
            if self.process.poll() is not None:
                raise ServerUnavailable(
                    f"the Prefect server exited with code {self.process.returncode} before it answered: "
                    f"{self._log_tail()} (log: {self.log_path})"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ServerUnavailable(
                    f"the Prefect server did not answer within {self.startup_timeout:.0f} s (log: {self.log_path})"
                )
            time.sleep(0.5)
        (self.home / RECORD).write_text(json.dumps({"api_url": self.api_url, "pid": self.process.pid}))

    def stop(self, timeout: float = 30.0) -> None:
        (self.home / RECORD).unlink(missing_ok=True)
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass

    def _log_tail(self) -> str:
        try:
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return "no log"
        return lines[-1][:300] if lines else "no output"

    def __enter__(self) -> LocalPrefectServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
