"""infra/compose.yaml, infra/services.py and configs/servers.yaml describe the same services."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from flows.settings import Settings, load_settings
from infra import services

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "infra" / "compose.yaml").read_text())["services"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Settings:
    return load_settings(ROOT / "configs" / "servers.yaml", workdir=tmp_path_factory.mktemp("servers"))


def _published(service: dict) -> dict[int, int]:
    """Host port -> container port, for ports published on 127.0.0.1."""
    ports = {}
    for entry in service.get("ports", []):
        host, host_port, container_port = entry.split(":")
        assert host == "127.0.0.1", f"{entry} is published beyond loopback"
        ports[int(host_port)] = int(container_port)
    return ports


def test_every_local_service_has_a_compose_service(compose):
    local = {service.name for service in services.services(Path("/nonexistent"))}
    assert local <= set(compose), local - set(compose)


def test_ports_match_the_servers_profile_and_infra(compose, servers):
    published = {name: _published(service) for name, service in compose.items()}
    database = urlsplit(servers.database_url)
    assert database.port == services.PORTS["postgres"] and database.port in published["postgres"]
    assert urlsplit(servers.tracking.tracking_uri).port == services.PORTS["mlflow"]
    assert services.PORTS["mlflow"] in published["mlflow"]
    assert urlsplit(servers.prefect.api_url).port == services.PORTS["prefect"]
    assert services.PORTS["prefect"] in published["prefect"]
    assert urlsplit(servers.prefect.dask_address).port == services.PORTS["dask"]
    assert services.PORTS["dask"] in published["dask-scheduler"]
    assert services.PORTS["s3"] in published["s3"]


def test_credentials_databases_and_bucket_match(compose, servers):
    database = urlsplit(servers.database_url)
    env = compose["postgres"]["environment"]
    assert (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"]) == (database.username, database.password)
    assert (database.username, database.password) == (services.DB_USER, services.DB_PASSWORD)
    created = {env["POSTGRES_DB"], *re.findall(r"CREATE DATABASE (\w+)", compose["postgres"]["command"])}
    assert created == set(services.DATABASES) and database.path.lstrip("/") in created
    assert f"s3://{services.BUCKET}/" in compose["mlflow"]["command"]
    assert services.BUCKET in compose["s3-bucket"]["entrypoint"]
    assert servers.prefect.work_pool == services.WORK_POOL
    assert f"--pool {services.WORK_POOL}" in compose["prefect-worker"]["command"]


def test_environment_variable_names_are_the_ones_the_services_read(compose):
    mlflow_env = set(compose["mlflow"]["environment"])
    assert set(services.S3_ENV) <= mlflow_env
    prefect_env = set(compose["prefect"]["environment"])
    local_prefect_env = set(services._prefect_env(Path("/nonexistent"))) - {"PREFECT_HOME"}
    assert local_prefect_env <= prefect_env
    for name in ("prefect-worker", "dask-workers"):
        assert "PREFECT_API_URL" in compose[name]["environment"]


def test_worker_overrides_are_real_settings_fields(compose, tmp_path, monkeypatch):
    overrides = {k: v for k, v in compose["prefect-worker"]["environment"].items() if k.startswith("LRU_ONLINE_")}
    assert overrides
    for name, value in overrides.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(ROOT / "configs" / "servers.yaml", workdir=tmp_path)
    assert settings.database_url == overrides["LRU_ONLINE_DATABASE_URL"]
    assert settings.tracking.tracking_uri == overrides["LRU_ONLINE_TRACKING__TRACKING_URI"]
    assert settings.prefect.dask_address == overrides["LRU_ONLINE_PREFECT__DASK_ADDRESS"]
