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
        ({"retrain": {"window_rows": 300, "holdout_rows": 300}}, "retrain"),
        ({"schedule": {"cron": "* * * * *", "interval_seconds": 60}}, "schedule"),
        ({"pipeline": "a b"}, "pipeline"),
        ({"features": {"clock_periods": ["hour"]}}, "features.clock_periods.0"),
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


MODEL_FIELDS = {
    "d_model": 8,
    "d_state": 6,
    "n_layers": 1,
    "horizon": 2,
    "dropout": 0.1,
    "r_min": 0.3,
    "r_max": 0.9,
    "max_phase": 1.0,
    "scan_backend": "chunked",
    "linear_state": 3,
    "linear_inputs": [0, 2],
}
UPDATE_FIELDS = {
    "learning_rate": 0.01,
    "weight_decay": 0.05,
    "window": 16,
    "epochs": 2,
    "grad_clip": 0.5,
    "replay_capacity": 32,
    "replay_batch": 3,
    "replay_weight": 0.5,
    "ewc_weight": 0.2,
    "ewc_decay": 0.7,
    "lines_per_step": 16,
    "seed": 5,
}


def test_every_core_field_set_in_yaml_reaches_the_learner(tmp_path):
    from dataclasses import fields

    from flows.model.fleet import load_learner, new_learner, save_checkpoint
    from lru_online import LearnerConfig, ModelConfig

    # Every field of the core's configs can be set; none is left behind by a hand-made copy.
    assert set(MODEL_FIELDS) == {f.name for f in fields(ModelConfig)} - {"n_inputs", "n_targets"}
    assert set(UPDATE_FIELDS) == {f.name for f in fields(LearnerConfig)}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL_FIELDS, "update": UPDATE_FIELDS}))
    settings = load_settings(path, workdir=tmp_path)
    learner = new_learner(settings, settings.feature_spec)
    expected_model = {**MODEL_FIELDS, "linear_inputs": (0, 2)}
    assert {k: getattr(learner.model.config, k) for k in MODEL_FIELDS} == expected_model
    assert {k: getattr(learner.config, k) for k in UPDATE_FIELDS} == UPDATE_FIELDS
    assert learner.optimizer.param_groups[0]["weight_decay"] == 0.05
    assert learner.replay.capacity == 32 and learner.ewc.weight == 0.2 and learner.ewc.decay == 0.7

    # A live checkpoint made under other settings learns by the current ones when loaded.
    defaults = load_settings(workdir=tmp_path)
    checkpoint = save_checkpoint(new_learner(defaults, defaults.feature_spec), tmp_path, "live")
    loaded = load_learner(checkpoint, settings)
    assert {k: getattr(loaded.config, k) for k in UPDATE_FIELDS} == UPDATE_FIELDS
    assert loaded.model.config.scan_backend == "chunked" and loaded.model.config.dropout == 0.1
    assert loaded.optimizer.param_groups[0]["lr"] == 0.01 and loaded.replay.capacity == 32


@pytest.mark.parametrize(
    "content, phrase",
    [
        ({"update": {"lines_per_step": 0}}, "lines_per_step"),
        ({"update": {"replay_weight": -1}}, "replay_weight"),
        ({"model": {"linear_state": 2, "linear_inputs": [11]}}, "linear_inputs"),
    ],
)
def test_core_fields_are_checked_at_start(tmp_path, content, phrase):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError, match=phrase):
        load_settings(path, workdir=tmp_path)
