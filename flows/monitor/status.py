"""The accounting of a work folder: batches, rows, drift, registry, as one dictionary."""

from __future__ import annotations

from sqlalchemy import func, select

from flows.monitor.tracking import CHALLENGER, CHAMPION, Tracker
from flows.settings import Settings
from flows.storage.database import Database, masked
from flows.storage.ledger import Ledger
from flows.storage.models import AnomalyAlarm, ModelRecovery, PlantAlarm

LATEST_ALARMS = 10


def pipeline_status(settings: Settings) -> dict:
    db = Database(settings.database_url)
    try:
        db.migrate()
        accounting = Ledger(db, settings.workdir, settings.paths.archive, settings.paths.quarantine).accounting()
        tracker = Tracker(settings)
        versions = tracker.versions()
        with db.session() as session:
            recoveries = [
                {
                    "at": r.recovered_at.isoformat(timespec="seconds"),
                    "restored_version": r.restored_version,
                    "restored_kind": r.restored_kind,
                    "missing_checkpoint": r.missing_checkpoint,
                    "reason": r.reason,
                    "trigger": r.trigger,
                    "mlflow_run_id": r.mlflow_run_id,
                }
                for r in session.scalars(select(ModelRecovery).order_by(ModelRecovery.id))
            ]
            alarm_count, alarmed_rows, alarmed_lines = session.execute(
                select(
                    func.count(AnomalyAlarm.id), func.sum(AnomalyAlarm.rows), func.count(AnomalyAlarm.entity.distinct())
                )
            ).one()
            latest = [
                {
                    "entity": a.entity,
                    "start": a.start_ts.isoformat(),
                    "end": a.end_ts.isoformat(),
                    "rows": a.rows,
                    "peak_score": a.peak_score,
                    "threshold": a.threshold,
                    "model_version": a.model_version,
                    "plant_alarm_id": a.plant_alarm_id,
                }
                for a in session.scalars(select(AnomalyAlarm).order_by(AnomalyAlarm.id.desc()).limit(LATEST_ALARMS))
            ]
            plant_alarms = session.scalar(select(func.count(PlantAlarm.id)))
            latest_plant = [
                {
                    "id": a.id,
                    "start": a.start_ts.isoformat(),
                    "end": a.end_ts.isoformat(),
                    "lines": a.lines,
                    "share": a.share,
                    "rows": a.rows,
                    "entities": a.entities,
                }
                for a in session.scalars(select(PlantAlarm).order_by(PlantAlarm.id.desc()).limit(LATEST_ALARMS))
            ]
        return {
            "pipeline": settings.pipeline,
            **accounting,
            "model_versions": len(versions),
            "versions": versions,
            "champion_version": tracker.alias_version(CHAMPION),
            "challenger_version": tracker.alias_version(CHALLENGER),
            "recoveries": recoveries,
            "anomaly_alarms": {
                "alarms": alarm_count,
                "rows": int(alarmed_rows or 0),
                "lines": alarmed_lines,
                "latest": latest,
                # Alarms most of a file's lines started together (flows.monitor.plant_alarms);
                # their lines' own alarms are counted above too, each naming its plant_alarm_id.
                "plant_alarms": plant_alarms,
                "latest_plant": latest_plant,
            },
            "paths": {
                name: str(getattr(settings.paths, name)) for name in ("landing", "quarantine", "archive", "output")
            },
            "database_url": masked(settings.database_url),
            "tracking_uri": masked(settings.tracking.tracking_uri),
        }
    finally:
        db.dispose()


def balanced(status: dict) -> bool:
    """Every received row is somewhere: scored, quarantined, late or dropped as an exact duplicate."""
    rows = status["rows"]
    return rows["received"] == rows["scored"] + rows["quarantined"] + rows["late"] + rows["duplicate"]
