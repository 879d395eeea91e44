"""MLflow adapter: the experiment, the online run, metrics, registry versions and aliases; and
the logging of committed parts' metrics (one step per part)."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime
from pathlib import Path

from sqlalchemy import select, update

from flows.settings import Settings
from flows.storage.database import Database, masked
from flows.storage.models import ModelState, SequenceMetrics

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    # Registering prints progress bars and "Successfully registered" lines on every version.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)


class Tracker:
    def __init__(self, settings: Settings) -> None:
        _quiet_mlflow()
        import mlflow
        from mlflow import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self._mlflow = mlflow
        self.settings = settings
        self.uri = settings.tracking.tracking_uri
        self.model_name = settings.tracking.model_name
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.experiment_id = self._experiment(settings)

    def _experiment(self, settings: Settings) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(settings.tracking.experiment)
        if experiment is not None:
            relocate_copied_store(settings, experiment.artifact_location)
            return experiment.experiment_id
        location = settings.tracking.artifact_location
        try:
            return self.client.create_experiment(
                settings.tracking.experiment,
                artifact_location=_artifact_uri(location) if location else None,
                tags={"lru-online.pipeline": settings.pipeline},
            )
        except MlflowException:  # a concurrent run created it first
            return self.client.get_experiment_by_name(settings.tracking.experiment).experiment_id

    # --- runs -----------------------------------------------------------------------------
    def start_run(self, name: str, kind: str, params: dict | None = None) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={"lru-online.kind": kind, "lru-online.pipeline": self.settings.pipeline},
        )
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        rows = [
            Metric(key, float(value), stamp, step)
            for key, value in metrics.items()
            if value is not None and value == value
        ]
        for start in range(0, len(rows), 500):
            self.client.log_batch(run_id, metrics=rows[start : start + 500])

    def logged_steps(self, run_id: str, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(run_id, key)}

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str) -> str:
        self.client.log_artifacts(run_id, str(folder), artifact_path)
        return f"runs:/{run_id}/{artifact_path}"

    # --- registry -------------------------------------------------------------------------
    def register(
        self,
        run_id: str,
        code: Path,
        artifacts: dict[str, str],
        kind: str,
        description: str = "",
        signature=None,
        input_example=None,
    ) -> str:
        """Logs a pyfunc model (MLflow's "models from code": `code` is stored, nothing is
        pickled) with its artifacts in `run_id` and registers it as a new version."""
        with self._mlflow.start_run(run_id=run_id):
            info = self._mlflow.pyfunc.log_model(
                name="model",
                python_model=str(code),
                artifacts=artifacts,
                pip_requirements=["lru-online", "torch==2.13.0", "pandas"],
                registered_model_name=self.model_name,
                signature=signature,
                input_example=input_example,
                await_registration_for=60,
            )
        version = str(info.registered_model_version)
        self.client.set_model_version_tag(self.model_name, version, "lru-online.kind", kind)
        if description:
            self.client.update_model_version(self.model_name, version, description=description)
        return version

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.model_name, alias, version)

    def alias_version(self, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.model_name, alias).version)
        except MlflowException:
            return None

    def versions(self) -> list[dict]:
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.search_model_versions(f"name = '{self.model_name}'")
        except MlflowException:
            return []
        return sorted(
            ({"version": str(v.version), "kind": v.tags.get("lru-online.kind"), "run_id": v.run_id} for v in found),
            key=lambda v: int(v["version"]),
        )


# MLflow's own records of where artifacts lie, by (table, column).
ARTIFACT_LOCATIONS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
    ("logged_models", "artifact_location"),
)


def relocate_copied_store(settings: Settings, recorded: str) -> bool:
    """Points the embedded MLflow store of a copied (or moved) work folder at its own artifacts.

    MLflow records artifact locations as absolute URIs, so in a copy they still name the
    original's folder: the copy's runs would write into it and its registry would read from it
    (and break once the original is gone). When both the tracking database and the artifact
    folder belong to this work folder, the artifacts were copied along and the recorded prefix
    is rewritten in MLflow's tables. True when something was rewritten."""
    location = settings.tracking.artifact_location
    uri = settings.tracking.tracking_uri
    if not location or "://" in location or not uri.startswith("sqlite:///"):
        return False
    database = Path(uri.removeprefix("sqlite:///"))
    folder = Path(location).expanduser().resolve()
    if not (database.is_relative_to(settings.workdir) and folder.is_relative_to(settings.workdir)):
        return False
    wanted = folder.as_uri()
    if recorded.rstrip("/") == wanted or not recorded.startswith("file://") or not folder.is_dir():
        return False
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(uri)
    try:
        tables = inspect(engine)
        with engine.begin() as connection:
            for table, column in ARTIFACT_LOCATIONS:
                if table not in tables.get_table_names():
                    continue
                if column not in {c["name"] for c in tables.get_columns(table)}:
                    continue
                connection.execute(
                    text(
                        f"UPDATE {table} SET {column} = :new || substr({column}, :cut) "
                        f"WHERE substr({column}, 1, :length) = :old"
                    ),
                    {
                        "new": wanted,
                        "old": recorded.rstrip("/"),
                        "cut": len(recorded.rstrip("/")) + 1,
                        "length": len(recorded.rstrip("/")),
                    },  # fmt: skip
                )
    finally:
        engine.dispose()
    log.warning("MLflow artifacts recorded under %s now point at this work folder's %s", recorded, wanted)
    return True


def _artifact_uri(location: str) -> str:
    if "://" in location:
        return location
    path = Path(location).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def track_pending(db: Database, tracker: Tracker, pipeline: str, started_at: datetime) -> int:
    """Logs the metrics of committed parts not yet in MLflow, each at its sequence as step.

    A part committed before this process started may have been logged by a run that died
    before marking it; its step is looked up first so no step is logged twice.
    """
    with db.session() as session:
        state = session.get(ModelState, pipeline)
        if state is None or state.online_run_id is None:
            return 0
        untracked = list(
            session.scalars(
                select(SequenceMetrics).where(SequenceMetrics.tracked.is_(False)).order_by(SequenceMetrics.sequence)
            )
        )
    logged_before: set[int] | None = None
    done = []
    for row in untracked:
        if row.committed_at < started_at:
            if logged_before is None:
                logged_before = tracker.logged_steps(state.online_run_id, "rows")
            if row.sequence in logged_before:
                done.append(row.sequence)
                continue
        tracker.log_metrics(state.online_run_id, row.metrics, step=row.sequence)
        done.append(row.sequence)
    if done:
        with db.session() as session:
            session.execute(update(SequenceMetrics).where(SequenceMetrics.sequence.in_(done)).values(tracked=True))
    return len(done)


def flat_settings(settings) -> dict:
    """The settings as flat MLflow params; URLs with their passwords masked."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        elif isinstance(value, list):
            flat[prefix] = str(value)[:500]
        else:
            flat[prefix] = str(value)

    walk("", settings.model_dump(mode="json", exclude={"log_schema"}))
    flat["database_url"] = masked(settings.database_url)
    flat["tracking.tracking_uri"] = masked(settings.tracking.tracking_uri)
    flat["log_schema.sensors"] = ",".join(settings.log_schema.sensor_names)
    return flat
