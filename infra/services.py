"""Start, stop and check the real services of the `servers` profile on this machine.

    python -m infra.services up|down|status [--dir .infra]      (also: lru-online infra ...)

Every service binds to 127.0.0.1 and keeps its data, logs and pid under --dir; `up` is
idempotent (a running service is left alone) and waits until each service answers:

- postgres: PostgreSQL (initdb/pg_ctl into DIR/postgres) with the databases lru_online,
  mlflow and prefect;
- s3: moto's server mode, an S3-compatible store, with the artifact bucket;
- mlflow: the MLflow tracking server on Postgres, artifacts proxied to the S3 bucket;
- prefect: the Prefect server on Postgres, a process work pool and one worker;
- dask: a Dask scheduler with two single-threaded workers.

The ports and credentials below are the ones configs/servers.yaml and infra/compose.yaml use.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
PORTS = {"postgres": 5433, "s3": 5100, "mlflow": 5001, "prefect": 4200, "dask": 8786, "dask-dashboard": 8787}
DB_USER, DB_PASSWORD = "lru", "lru-local-only"
DATABASES = ("lru_online", "mlflow", "prefect")
BUCKET = "lru-online-artifacts"
WORK_POOL = "lru-online"
# moto accepts any credentials; these only have to be present.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "lru-online",
    "AWS_SECRET_ACCESS_KEY": "lru-online",
    "AWS_DEFAULT_REGION": "us-east-1",
    "MLFLOW_S3_ENDPOINT_URL": f"http://{HOST}:{PORTS['s3']}",
}


def urls() -> dict[str, str]:
    """Where each service answers; configs/servers.yaml holds the same."""
    pg = f"{DB_USER}:{DB_PASSWORD}@{HOST}:{PORTS['postgres']}"
    return {
        "database_url": f"postgresql+psycopg://{pg}/lru_online",
        "mlflow_backend": f"postgresql+psycopg://{pg}/mlflow",
        "prefect_database": f"postgresql+asyncpg://{pg}/prefect",
        "tracking_uri": f"http://{HOST}:{PORTS['mlflow']}",
        "s3_endpoint": S3_ENV["MLFLOW_S3_ENDPOINT_URL"],
        "artifacts_destination": f"s3://{BUCKET}/mlflow",
        "prefect_api_url": f"http://{HOST}:{PORTS['prefect']}/api",
        "dask_address": f"tcp://{HOST}:{PORTS['dask']}",
    }


class ServiceError(RuntimeError):
    pass


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status < 500
    except (urllib.error.URLError, OSError):
        return False


def _wait(what: str, check: Callable[[], bool], seconds: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tail = log.read_text()[-2000:] if log and log.exists() else ""
    raise ServiceError(f"{what} did not become ready within {seconds:.0f} s\n{tail}")


@dataclass
class Process:
    """A service run as a detached process with a pid file and a log."""

    name: str
    command: Callable[[Path], list[str]]
    ready: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = 120.0

    def pid_file(self, root: Path) -> Path:
        return root / "run" / f"{self.name}.pid"

    def pid(self, root: Path) -> int | None:
        try:
            pid = int(self.pid_file(root).read_text())
            os.kill(pid, 0)
            # An exited service nobody reaped (no init in a container) is a zombie: not running.
            stat = Path(f"/proc/{pid}/stat")
            if stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z":
                return None
            return pid
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return None

    def up(self, root: Path) -> None:
        if self.pid(root) and self.ready():
            return
        (root / "run").mkdir(parents=True, exist_ok=True)
        log = root / "logs" / f"{self.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            self.command(root),
            env={**os.environ, **self.env},
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid_file(root).write_text(str(process.pid))
        _wait(self.name, lambda: process.poll() is None and self.ready(), self.timeout, log)

    def down(self, root: Path) -> None:
        pid = self.pid(root)
        if pid:
            try:
                os.killpg(pid, signal.SIGTERM)
                for _ in range(40):
                    if self.pid(root) is None:
                        break
                    time.sleep(0.25)
                else:
                    os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:  # the whole group is already gone
                pass
        self.pid_file(root).unlink(missing_ok=True)

    def status(self, root: Path) -> str:
        return "up" if self.pid(root) and self.ready() else "down"


class Postgres:
    name = "postgres"

    def _as_owner(self, command: list[str]) -> list[str]:
        # PostgreSQL refuses to run as root; the Debian package's postgres user runs it then.
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command

    def _bin(self, tool: str) -> str:
        for candidate in [shutil.which(tool), *sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"))]:
            if candidate:
                return str(candidate)
        raise ServiceError(f"{tool} not found: install PostgreSQL (Debian: apt-get install postgresql)")

    def _data(self, root: Path) -> Path:
        return root / "postgres"

    def up(self, root: Path) -> None:
        data = self._data(root)
        if not (data / "PG_VERSION").exists():
            data.mkdir(parents=True, exist_ok=True)
            (root / "logs").mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(data, "postgres", "postgres")
                shutil.chown(root / "logs", "postgres", "postgres")
            password_file = root / "run" / "pgpass"
            password_file.parent.mkdir(parents=True, exist_ok=True)
            password_file.write_text(DB_PASSWORD + "\n")
            if os.geteuid() == 0:
                shutil.chown(password_file, "postgres", "postgres")
            subprocess.run(
                self._as_owner(
                    [
                        self._bin("initdb"),
                        "-D",
                        str(data),
                        "-U",
                        DB_USER,
                        "--pwfile",
                        str(password_file),
                        "-A",
                        "scram-sha-256",
                        "-E",
                        "UTF8",
                    ]
                ),
                check=True,
                capture_output=True,
            )
        if not self.ready():
            subprocess.run(
                self._as_owner(
                    [
                        self._bin("pg_ctl"),
                        "-D",
                        str(data),
                        "-l",
                        str(root / "logs" / "postgres.log"),
                        "-w",
                        "-t",
                        "60",
                        "-o",
                        f"-h {HOST} -p {PORTS['postgres']} -k {data}",
                        "start",
                    ]
                ),
                check=True,
                capture_output=True,
            )
        _wait("postgres", self.ready, 60)
        self._create_databases()

    def _psql(self, sql: str, database: str = "postgres") -> str:
        env = {**os.environ, "PGPASSWORD": DB_PASSWORD}
        done = subprocess.run(
            ["psql", "-h", HOST, "-p", str(PORTS["postgres"]), "-U", DB_USER, "-d", database, "-tAc", sql],
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise ServiceError(f"psql failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def _create_databases(self) -> None:
        for database in DATABASES:
            if self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}'") != "1":
                self._psql(f'CREATE DATABASE "{database}"')

    def ready(self) -> bool:
        return _port_open(PORTS["postgres"])

    def down(self, root: Path) -> None:
        data = self._data(root)
        if (data / "postmaster.pid").exists():
            subprocess.run(
                self._as_owner([self._bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                capture_output=True,
            )

    def status(self, root: Path) -> str:
        return "up" if self.ready() else "down"


def _create_bucket() -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=S3_ENV["MLFLOW_S3_ENDPOINT_URL"],
        **{
            "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_ENV["AWS_DEFAULT_REGION"],
        },
    )
    if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=BUCKET)


class S3(Process):
    def up(self, root: Path) -> None:
        super().up(root)
        _create_bucket()


class PrefectServer(Process):
    def up(self, root: Path) -> None:
        super().up(root)
        subprocess.run(
            [sys.executable, "-m", "prefect", "work-pool", "create", WORK_POOL, "--type", "process", "--overwrite"],
            env={**os.environ, **self.env, "PREFECT_API_URL": urls()["prefect_api_url"]},
            check=True,
            capture_output=True,
        )


def _prefect_env(root: Path) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": urls()["prefect_database"],
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(PORTS["prefect"]),
    }


def services(root: Path) -> list:
    python = sys.executable
    prefect_env = _prefect_env(root)
    u = urls()
    return [
        Postgres(),
        S3(
            "s3",
            lambda r: [python, "-m", "moto.server", "-H", HOST, "-p", str(PORTS["s3"])],
            lambda: _http_ok(f"http://{HOST}:{PORTS['s3']}/moto-api/"),
            env=S3_ENV,
        ),
        Process(
            "mlflow",
            lambda r: [
                python,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                u["mlflow_backend"],
                "--artifacts-destination",
                u["artifacts_destination"],
                "--serve-artifacts",
                "--host",
                HOST,
                "--port",
                str(PORTS["mlflow"]),
                "--workers",
                "1",
            ],
            lambda: _http_ok(f"{u['tracking_uri']}/health"),
            env={**S3_ENV, "MLFLOW_SERVER_ALLOWED_HOSTS": f"{HOST}:*,localhost:*"},
            timeout=240,
        ),
        PrefectServer(
            "prefect",
            lambda r: [python, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(PORTS["prefect"])],
            lambda: _http_ok(f"{u['prefect_api_url']}/health"),
            env=prefect_env,
            timeout=240,
        ),
        Process(
            "prefect-worker",
            lambda r: [python, "-m", "prefect", "worker", "start", "--pool", WORK_POOL, "--type", "process"],
            lambda: True,
            env={**prefect_env, "PREFECT_API_URL": u["prefect_api_url"]},
        ),
        Process(
            "dask-scheduler",
            lambda r: [
                python,
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                HOST,
                "--port",
                str(PORTS["dask"]),
                "--dashboard-address",
                f"{HOST}:{PORTS['dask-dashboard']}",
            ],
            lambda: _port_open(PORTS["dask"]),
        ),
        Process(
            "dask-workers",
            lambda r: [
                python,
                "-m",
                "distributed.cli.dask_worker",
                u["dask_address"],
                "--nworkers",
                "2",
                "--nthreads",
                "1",
                "--host",
                HOST,
                "--no-dashboard",
                "--memory-limit",
                "4GiB",
            ],
            lambda: _dask_workers() >= 2,
            # Prefect tasks running on the workers report their runs to the Prefect server.
            env={**prefect_env, "PREFECT_API_URL": u["prefect_api_url"]},
        ),
    ]


def create_database(prefix: str) -> str:
    """A new, empty database on the local Postgres (fresh state for a test or bench run); its URL."""
    import uuid

    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = urls()["database_url"].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return urls()["database_url"].rsplit("/", 1)[0] + f"/{name}"


def _dask_workers() -> int:
    try:
        from distributed import Client

        with Client(urls()["dask_address"], timeout=2) as client:
            return len(client.scheduler_info()["workers"])
    except OSError:
        return 0


def up(root: Path, only: list[str] | None = None) -> dict[str, str]:
    root = root.resolve()
    for service in services(root):
        if only is None or service.name in only:
            service.up(root)
    state = {"dir": str(root), **urls()}
    (root / "services.json").write_text(json.dumps(state, indent=2))
    return state


def down(root: Path) -> None:
    root = root.resolve()
    for service in reversed(services(root)):
        service.down(root)


def status(root: Path) -> dict[str, str]:
    root = root.resolve()
    return {service.name: service.status(root) for service in services(root)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--dir", type=Path, default=Path(".infra"))
    parser.add_argument("--only", nargs="*", default=None, help="start only these services")
    args = parser.parse_args(argv)
    if args.action == "up":
        print(json.dumps(up(args.dir, args.only), indent=2))
    elif args.action == "down":
        down(args.dir)
    else:
        report = status(args.dir)
        print(json.dumps(report, indent=2))
        return 0 if all(v == "up" for v in report.values()) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
