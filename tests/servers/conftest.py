"""The real services of the servers profile, started through infra/ for this test session.

If `lru-online infra up --dir DIR` already runs them (LRU_ONLINE_INFRA_DIR=DIR), they are used
and left running; otherwise they start in a temporary folder and stop at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest
import yaml

from infra import services

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="session")
def infra() -> Path:
    given = os.environ.get("LRU_ONLINE_INFRA_DIR")
    if given:
        root = Path(given)
    else:
        # Postgres runs as its own user when the tests run as root: the folder must be open to it.
        root = Path(tempfile.mkdtemp(prefix="lru-online-infra-"))
        root.chmod(0o755)
    services.up(root)
    yield root
    if not given:
        services.down(root)
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(name_prefix: str = "lru_test") -> str:
    """A new, empty Postgres database on the infra server; returns its SQLAlchemy URL."""
    name = f"{name_prefix}_{uuid.uuid4().hex[:10]}"
    admin = services.urls()["database_url"].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return services.urls()["database_url"].rsplit("/", 1)[0] + f"/{name}"


def profile_config(profile: str, workdir: Path, overrides: dict, **fields) -> Path:
    """configs/<profile>.yaml with the test's overrides merged in, written to workdir/config.yaml."""
    data = yaml.safe_load((CONFIGS / f"{profile}.yaml").read_text())
    for key, value in {**overrides, **fields}.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    data["workdir"] = str(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
