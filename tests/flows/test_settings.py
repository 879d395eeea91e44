from pathlib import Path

import pytest
import yaml

from flows.settings import ConfigError, Settings, load_settings

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_embedded_yaml_is_the_builtin_default(tmp_path):
    from_file = load_settings(CONFIGS / "embedded.yaml", workdir=tmp_path)
    builtin = load_settings(workdir=tmp_path)
    assert from_file == builtin


def test_relative_folders_and_urls_live_in_the_workdir(tmp_path):
    settings = load_settings(workdir=tmp_path)
    assert settings.paths.landing == tmp_path / "landing"
    assert settings.database_url == f"sqlite:///{tmp_path}/lru_online.db"
    assert settings.tracking.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"drift": {"psi_threshold": 0.7}, "update": {"window": 16}}))
    monkeypatch.setenv("LRU_ONLINE_DRIFT__PSI_THRESHOLD", "2.5")
    settings = load_settings(path, workdir=tmp_path)
    assert settings.drift.psi_threshold == 2.5
    assert settings.update.window == 16


@pytest.mark.parametrize(
    "content, field",
    [
        ({"drift": {"psi_threshold": -1}}, "drift.psi_threshold"),
        ({"update": {"windw": 3}}, "update.windw"),
        (
            {"log_schema": {"sensors": [{"name": "t", "unit": "C", "min": 5, "max": 1, "source": "s"}]}},
            "log_schema.sensors.0",
        ),
        ({"model": {"r_min": 0.9, "r_max": 0.5}}, "model"),
        ({"model": {"n_layers": 0}}, "model"),
        ({"retrain": {"recent_batches": 3, "holdout_batches": 3}}, "retrain"),
        ({"schedule": {"cron": "* * * * *", "interval_seconds": 60}}, "schedule"),
        ({"pipeline": "a b"}, "pipeline"),
    ],
)
def test_a_bad_field_fails_at_start_naming_it(tmp_path, content, field):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError) as error:
        load_settings(path, workdir=tmp_path)
    assert str(path) in str(error.value) and f"field '{field}" in str(error.value)


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("drift: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_settings(listed)


def test_schema_views():
    schema = Settings().log_schema
    assert schema.sensor_names[:2] == ["temperature", "vibration"]
    assert schema.sources["hydraulic"] == ["pressure", "flow"]


def _differences(left, right, prefix: str = "") -> set[str]:
    if isinstance(left, dict) and isinstance(right, dict):
        found = set()
        for key in left.keys() | right.keys():
            found |= _differences(left.get(key), right.get(key), f"{prefix}{key}.")
        return found
    return set() if left == right else {prefix.rstrip(".")}


def test_servers_profile_differs_only_in_where_the_services_are(tmp_path):
    embedded = load_settings(CONFIGS / "embedded.yaml", workdir=tmp_path).model_dump(mode="json")
    servers = load_settings(CONFIGS / "servers.yaml", workdir=tmp_path).model_dump(mode="json")
    assert _differences(embedded, servers) == {
        "database_url",
        "tracking.tracking_uri",
        "tracking.artifact_location",
        "prefect.api_url",
        "prefect.work_pool",
        "prefect.dask_address",
    }
