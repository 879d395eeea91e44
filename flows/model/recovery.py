"""Restoring the live model from the registry when its checkpoint is missing or unreadable.

The live model is the newest registered version of its lineage: the initial version, the
snapshots registered every `tracking.snapshot_every` parts, and a promoted challenger (the
champion). What it learned after that version is lost; the lines' carried hidden states, the
ledger and the drift reference stay as committed, so the row accounting is untouched. Every
recovery is an MLflow run of its own and a row of `model_recoveries`, which `status` shows.

Crash safety: the restored checkpoint is written under a fresh name, then one transaction points
the live model at it, but only if the live model still points at the missing file (another
process may have recovered first). A process killed before that leaves the model as it was;
the next recovery clears the stray file and ends the killed one's MLflow run.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from flows import faults
from flows.model.fleet import load_learner
from flows.model.live import CheckpointMissing, LiveModel
from flows.monitor.tracking import CHAMPION, Tracker
from flows.storage.ledger import Ledger
from flows.storage.models import ModelRecovery, ModelState
from flows.storage.work_folder import remove_inside, stored_path

log = logging.getLogger(__name__)

# Registered versions that were the live model when registered (a challenger only once promoted).
LIVE_KINDS = ("initial", "snapshot")
RESTORED_PREFIX = "restored-"


class NothingToRecover(RuntimeError):
    """The live checkpoint loads, or there is no live model yet."""


class NoRegisteredVersion(RuntimeError):
    """The registry holds no version of the live lineage to restore."""


@dataclass
class Recovery:
    restored_version: str
    restored_kind: str | None
    missing_checkpoint: str
    checkpoint: Path
    reason: str
    run_id: str | None

    def describe(self) -> str:
        return (
            f"restored the live model from registry version {self.restored_version} ({self.restored_kind}) "
            f"into {self.checkpoint.name}: {self.reason}; what it learned after that version is lost, the "
            f"lines' carried states are kept"
        )


def newest_live_version(tracker: Tracker) -> dict | None:
    """The newest registered version that was once the live model."""
    champion = tracker.alias_version(CHAMPION)
    lineage = [v for v in tracker.versions() if v["kind"] in LIVE_KINDS or v["version"] == champion]
    return lineage[-1] if lineage else None


def restore_live_model(live: LiveModel, tracker: Tracker, ledger: Ledger, trigger: str) -> Recovery:
    """Restores the live model from the registry when its checkpoint is missing or unreadable.

    Raises NothingToRecover when the checkpoint loads, NoRegisteredVersion when the registry has
    nothing to restore, and RuntimeError while another process is recovering.
    """
    settings = live.settings
    lease = f"recover:{settings.pipeline}"
    if not ledger.acquire(lease):
        raise RuntimeError(f"another process is recovering the live model of pipeline {settings.pipeline!r}")
    try:
        state = live.state()
        if state is None:
            raise NothingToRecover("no live model yet: the first run trains one")
        live.drop()
        try:
            live.load()
        except CheckpointMissing as missing:
            reason = str(missing).split(";")[0]
        else:
            raise NothingToRecover(f"the live checkpoint {live.checkpoint(state)} loads; nothing to recover")
        _clear_interrupted(tracker, settings.paths.checkpoints, state.checkpoint_path)
        version = newest_live_version(tracker)
        if version is None:
            raise NoRegisteredVersion(f"{reason}, and the registry {tracker.model_name!r} holds no version to restore")
        run_id = tracker.start_run(
            "recover",
            "recovery",
            params={
                "missing_checkpoint": state.checkpoint_path,
                "restored_version": version["version"],
                "restored_kind": version["kind"],
                "trigger": trigger,
                "reason": reason,
            },  # fmt: skip
        )
        checkpoint = _download_checkpoint(tracker, version["version"], settings.paths.checkpoints)
        load_learner(checkpoint, settings)  # a registered checkpoint that does not load is no fix
        faults.checkpoint("restored")
        recovery = Recovery(version["version"], version["kind"], state.checkpoint_path, checkpoint, reason, run_id)
        if not _point_live_model_at(live, state.checkpoint_path, recovery, trigger):
            checkpoint.unlink(missing_ok=True)
            tracker.end_run(run_id, "KILLED")
            raise NothingToRecover("another process restored or replaced the live model meanwhile")
        tracker.end_run(run_id)
        live.drop()
        log.warning("%s", recovery.describe())
        return recovery
    finally:
        ledger.release(lease)


def _download_checkpoint(tracker: Tracker, version: str, folder: Path) -> Path:
    """The checkpoint file of a registered version, copied into `folder` under a new name."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{tracker.model_name}/{version}",
                dst_path=tmp,
                tracking_uri=tracker.uri,
                registry_uri=tracker.uri,
            )
        )
        found = sorted((model_dir / "artifacts").glob("*.pt"))
        if not found:
            raise NoRegisteredVersion(f"registry version {version} holds no checkpoint (artifacts/*.pt)")
        target = folder / f"{RESTORED_PREFIX}v{version}-{uuid.uuid4().hex[:12]}.pt"
        partial = target.with_suffix(".tmp")
        shutil.copyfile(found[0], partial)
        partial.replace(target)
    return target


def _point_live_model_at(live: LiveModel, missing: str, recovery: Recovery, trigger: str) -> bool:
    """One transaction: the live model points at the restored checkpoint, and the recovery is
    recorded; False (nothing changed) when the live model moved on meanwhile."""
    settings = live.settings
    with live.db.session() as session:
        model = session.get(ModelState, settings.pipeline)
        if model is None or model.checkpoint_path != missing:
            return False
        restored = stored_path(settings.workdir, recovery.checkpoint)
        model.checkpoint_path = restored  # a new model version: loaded learners reload
        session.add(
            ModelRecovery(
                pipeline=settings.pipeline,
                missing_checkpoint=missing,
                reason=recovery.reason,
                restored_version=recovery.restored_version,
                restored_kind=recovery.restored_kind,
                checkpoint_path=restored,
                mlflow_run_id=recovery.run_id,
                trigger=trigger,
            )
        )
    return True


def _clear_interrupted(tracker: Tracker, folder: Path, live_checkpoint: str) -> None:
    """What a recovery killed before its commit left: restored files nothing points at, and its
    MLflow run, still marked running."""
    for stray in [*folder.glob(f"{RESTORED_PREFIX}*.pt"), *folder.glob(f"{RESTORED_PREFIX}*.tmp")]:
        if not live_checkpoint.endswith(stray.name):
            remove_inside(folder, stray)
    runs = tracker.client.search_runs(
        [tracker.experiment_id], "tags.`lru-online.kind` = 'recovery' and attributes.status = 'RUNNING'"
    )
    for run in runs:
        tracker.end_run(run.info.run_id, "KILLED")
