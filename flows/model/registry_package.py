"""What a registry version carries besides its weights, so that the registered model scores raw
log rows as the pipeline would: how rows become features (the log's columns, the time scale),
the anomaly detector's settings, and each line's carried states at the moment of registration
(hidden state, feature scaling, alarm calibration, watermark).

The states are a Parquet file of bytes columns, written by each state's own codec: nothing is
pickled into the registry.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
from sqlalchemy import update

from features import FeatureSpec
from flows.model.forecast_mixture import MixtureSetup
from flows.model.raw_scoring import output_columns
from flows.monitor.tracking import Tracker
from flows.settings import Settings
from flows.storage.database import Database
from flows.storage.line_states import CarriedLines, carried_by_every_line
from flows.storage.models import ModelState
from flows.storage.work_folder import resolved_path
from lru_online.alarms import AlarmConfig
from lru_online.mixture import MixtureConfig
from lru_online.online_linear import OnlineLinearConfig

SCORING_FILE = "scoring.json"
LINES_FILE = "lines.parquet"
# The pyfunc wrapper, stored with each version as code ("models from code").
REGISTRY_MODEL_CODE = Path(__file__).resolve().parent / "registry_model.py"


@dataclass(frozen=True)
class ScoringSetup:
    """How the pipeline turns a log's rows into scores and alarms."""

    spec: FeatureSpec
    alarms: AlarmConfig
    # Each file one run of its lines (log_schema.file_is_run): a request then starts its lines
    # afresh unless the caller asks for the stored states.
    file_is_run: bool = False
    # The forecast mixture the pipeline runs (`mixture:`), None without one.
    mixture: MixtureSetup | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ScoringSetup:
        # Labels are the pipeline's evaluation aid, not inputs: raw rows need not carry them.
        spec = replace(settings.feature_spec, label_columns=())
        return cls(spec, settings.alarms.config(), settings.log_schema.file_is_run, settings.mixture.setup())

    def starts_from_stored_states(self, params: dict | None) -> bool:
        """Whether a request's known lines start where the pipeline left them (param
        `carried_states`; by default yes, unless each file is a run)."""
        return bool((params or {}).get("carried_states", not self.file_is_run))

    def to_json(self) -> str:
        mixture = None
        if self.mixture is not None:
            mixture = {
                "members": list(self.mixture.members),
                **asdict(self.mixture.config),
                "linear": asdict(self.mixture.linear),
            }
        data = {
            "features": asdict(self.spec),
            "alarms": asdict(self.alarms),
            "file_is_run": self.file_is_run,
            "mixture": mixture,
        }
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ScoringSetup:
        data = json.loads(text)
        features = data["features"]
        lists = ("sensors", "label_columns", "change_sensors", "clock_periods")  # JSON gives lists back
        spec = FeatureSpec(**{**features, **{name: tuple(features[name]) for name in lists if name in features}})
        mixture = data.get("mixture")  # absent from versions registered before the mixture
        if mixture is not None:
            members = tuple(mixture.pop("members"))
            linear = OnlineLinearConfig(**mixture.pop("linear", {}))  # absent before the linear member
            mixture = MixtureSetup(members, MixtureConfig(**mixture), linear)
        return cls(spec, AlarmConfig(**data["alarms"]), bool(data.get("file_is_run", False)), mixture)


def register_version(
    tracker: Tracker,
    settings: Settings,
    run_id: str,
    checkpoint: Path,
    kind: str,
    description: str = "",
    lines: CarriedLines | None = None,
) -> str:
    """Registers the checkpoint as a new version that scores raw log rows, with the lines'
    carried states when given; returns the version."""
    setup = ScoringSetup.from_settings(settings)
    with tempfile.TemporaryDirectory(prefix="lru-online-version-") as folder:
        artifacts = {"checkpoint": str(checkpoint), **write_package(Path(folder), setup, lines)}
        return tracker.register(
            run_id,
            REGISTRY_MODEL_CODE,
            artifacts,
            kind,
            description,
            signature=signature(setup, settings.model.horizon),
            input_example=input_example(setup),
        )


def signature(setup: ScoringSetup, horizon: int):
    """Raw log rows in; per row the forecasts, the score and the alarm out. The parameter
    `carried_states` (default true, false when each file is a run) starts each known line
    where the pipeline left it."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import AnyType

    spec = setup.spec
    inputs = Schema(
        [
            ColSpec("string", spec.entity_column),
            # Any type: logs land with text timestamps (and JSON has no other), a frame may hold parsed ones.
            ColSpec(AnyType(), spec.timestamp_column),
            *(ColSpec("double", sensor) for sensor in spec.sensors),
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", spec.entity_column),
            ColSpec("datetime", spec.timestamp_column),
            *(ColSpec(kind, name) for name, kind in output_columns(spec, horizon).items()),
        ]
    )
    params = ParamSchema([ParamSpec("carried_states", "boolean", not setup.file_is_run)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def input_example(setup: ScoringSetup) -> pd.DataFrame:
    spec = setup.spec
    example = pd.DataFrame(
        {
            spec.entity_column: ["line-1"] * 3,
            spec.timestamp_column: pd.date_range("2026-01-01", periods=3, freq=f"{spec.time_scale_seconds}s"),
        }
    )
    for sensor in spec.sensors:
        example[sensor] = [1.0, 1.0, 1.0]
    return example


def write_package(folder: Path, setup: ScoringSetup, lines: CarriedLines | None) -> dict[str, str]:
    """Writes the scoring setup (and the lines' states, when given) into `folder`; returns them
    as pyfunc artifacts (name → path)."""
    folder.mkdir(parents=True, exist_ok=True)
    scoring = folder / SCORING_FILE
    scoring.write_text(setup.to_json())
    artifacts = {"scoring": str(scoring)}
    if lines is not None and lines.versions:
        path = folder / LINES_FILE
        lines_frame(lines).to_parquet(path, index=False)
        artifacts["lines"] = str(path)
    return artifacts


def lines_frame(lines: CarriedLines) -> pd.DataFrame:
    entities = sorted(lines.versions)
    return pd.DataFrame(
        {
            "entity": entities,
            "hidden_state": [lines.hidden.get(e) for e in entities],
            "feature_state": [lines.features.get(e) for e in entities],
            "alarm_state": [lines.alarm.get(e) for e in entities],
            "watermark": pd.to_datetime([lines.watermarks.get(e) for e in entities], utc=True),
        }
    )


def read_lines(path: Path) -> CarriedLines:
    frame = pd.read_parquet(path)
    carried = CarriedLines()
    for entity, hidden, features, alarm, watermark in frame[
        ["entity", "hidden_state", "feature_state", "alarm_state", "watermark"]
    ].itertuples(index=False):
        carried.versions[entity] = 0
        carried.hidden[entity] = hidden
        carried.features[entity] = features
        carried.alarm[entity] = alarm
        carried.watermarks[entity] = None if pd.isna(watermark) else watermark.to_pydatetime()
    return carried


def snapshot_if_due(db: Database, tracker: Tracker, settings: Settings) -> str | None:
    """Registers the live model with every line's carried states as a new version every
    `snapshot_every` processed parts; the weights and the states are read in one transaction,
    so they belong together."""
    every = settings.tracking.snapshot_every
    with db.session() as session:
        state = session.get(ModelState, settings.pipeline)
        if not every or state is None or state.batches_since_snapshot < every:
            return None
        run_id, checkpoint = state.online_run_id, resolved_path(settings.workdir, state.checkpoint_path)
        lines = carried_by_every_line(session)
    version = register_version(tracker, settings, run_id, checkpoint, "snapshot", lines=lines)
    with db.session() as session:
        # Not a new model: the version lock stays, so the loaded learner stays current.
        session.execute(
            update(ModelState)
            .where(ModelState.pipeline == settings.pipeline)
            .values(batches_since_snapshot=0)
            .execution_options(synchronize_session=False)
        )
    return version
