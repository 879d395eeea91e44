"""Small simulated plants and their configuration files for the pipeline tests."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from sqlalchemy import select

from features import FeatureBatch, build_features
from flows.ingest.simulator import GroundTruth, SimulationConfig, simulate
from flows.settings import Settings, load_settings
from lru_online import OnlineLearner

SMALL = {
    "initial_training": {"batches": 8, "epochs": 3},
    "model": {"d_model": 16, "d_state": 16, "n_layers": 1},
    "update": {"window": 32, "replay_capacity": 64, "replay_batch": 2},
    "drift": {"window_batches": 4, "cooldown_batches": 2, "max_delay_batches": 5},
    "retrain": {"window_rows": 1200, "holdout_rows": 200, "epochs": 2},
}


@functools.cache
def _empty_mlflow_database() -> Path:
    """An MLflow SQLite database as MLflow creates it in a new work folder, made once per test
    session: running MLflow's schema migrations takes seconds, opening a migrated copy a tenth
    of one."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = Path(tempfile.mkdtemp(prefix="lru-online-mlflow-template-"))
    atexit.register(shutil.rmtree, folder, True)
    store = SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", str(folder / "mlartifacts"))
    store.engine.dispose()
    return folder / "mlflow.db"


def small_config(workdir: Path, **overrides) -> tuple[Settings, str]:
    """Writes `workdir/config.yaml` (small model, test overrides) and returns its settings and
    path; flows and the CLI read the same file. A new folder on the default SQLite tracking
    store starts from a copy of an empty, migrated MLflow database."""
    data: dict = {"workdir": str(workdir), **{k: dict(v) for k, v in SMALL.items()}}
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    settings = load_settings(path)
    settings.ensure_folders()
    tracking_database = settings.workdir / "mlflow.db"
    if settings.tracking.tracking_uri == f"sqlite:///{tracking_database}" and not tracking_database.exists():
        shutil.copyfile(_empty_mlflow_database(), tracking_database)
    return settings, str(path)


def assert_same_outcome(checked, local, name: str) -> None:
    """A file's validation outcome from elsewhere (Dask, the checking interpreter) agrees with
    the driver's own: the verdict, its reasons and the lines taken out of the file."""
    assert checked.success == local.success, name
    assert checked.reasons == local.reasons, name
    assert [(q.entity, q.rows, q.reasons) for q in checked.lines] == [
        (q.entity, q.rows, q.reasons) for q in local.lines
    ], name


def small_plant(settings: Settings, **overrides) -> GroundTruth:
    config = SimulationConfig(
        entities=2,
        batches=24,
        rows_per_batch=200,
        gradual_drift_start=9,
        gradual_drift_batches=4,
        abrupt_drift_batch=16,
        broken_batches={"wrong_schema": 5, "nan_burst": 8, "out_of_range": 12, "unsorted_timestamps": 20},
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return simulate(settings.paths.landing, settings.workdir / "ground_truth.json", config, settings.log_schema)


@dataclass
class OnePass:
    """What a run of the pipeline left, beside what one pass over all its rows gives: the
    processed files' summaries in order, their output figures, the line's stored forecaster
    record, and the final learner with the features of all the files' rows, from fresh states."""

    summaries: list
    outputs: pd.DataFrame
    record: bytes
    learner: OnlineLearner
    features: FeatureBatch


def one_pass(settings: Settings, originals: dict[str, pd.DataFrame], entity: str) -> OnePass:
    from flows.ingest.validation import parse_timestamps
    from flows.storage.database import Database
    from flows.storage.models import Batch, BatchSummary, EntityState, ModelState
    from flows.storage.work_folder import resolved_path

    with Database(settings.database_url).session() as session:
        summaries = list(session.scalars(select(BatchSummary).order_by(BatchSummary.sequence)))
        batches = [session.get(Batch, s.batch_id) for s in summaries]
        record = session.get(EntityState, entity).hidden_state
        checkpoint = session.get(ModelState, settings.pipeline).checkpoint_path
    assert all(b.status == "processed" for b in batches)
    outputs = pd.concat(
        [pd.read_parquet(resolved_path(settings.workdir, s.features_path)) for s in summaries], ignore_index=True
    )
    spec = settings.feature_spec
    rows = pd.concat([originals[Path(b.source_file).name] for b in batches], ignore_index=True)
    rows[spec.timestamp_column] = parse_timestamps(rows[spec.timestamp_column])
    features, _ = build_features(rows, spec, {})
    learner = OnlineLearner.load_checkpoint(resolved_path(settings.workdir, checkpoint))
    return OnePass(summaries, outputs, record, learner, features)
