"""Shared fixtures: one Prefect test API per session, quiet analytics, temporary homes."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

_HOME = tempfile.mkdtemp(prefix="lru-online-tests-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)  # each test process's own home, gone with it
os.environ.setdefault("PREFECT_HOME", os.path.join(_HOME, "prefect"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with slow or servers tests first, each file's tests kept together: when `make test`
    spreads files over workers, a long file taken last would run while the others stand idle."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("servers")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: collection order otherwise


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (a local server) shared by the whole session: flows run for real."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
