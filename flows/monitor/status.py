"""The accounting of a work folder: batches, rows, drift, registry, as one dictionary."""

from __future__ import annotations

from flows.monitor.tracking import CHALLENGER, CHAMPION, Tracker
from flows.settings import Settings
from flows.storage.database import Database, masked
from flows.storage.ledger import Ledger


def pipeline_status(settings: Settings) -> dict:
    db = Database(settings.database_url)
    try:
        db.migrate()
        accounting = Ledger(db, settings.paths.archive, settings.paths.quarantine).accounting()
        tracker = Tracker(settings)
        versions = tracker.versions()
        return {
            "pipeline": settings.pipeline,
            **accounting,
            "model_versions": len(versions),
            "versions": versions,
            "champion_version": tracker.alias_version(CHAMPION),
            "challenger_version": tracker.alias_version(CHALLENGER),
            "paths": {
                name: str(getattr(settings.paths, name)) for name in ("landing", "quarantine", "archive", "output")
            },
            "database_url": masked(settings.database_url),
            "tracking_uri": masked(settings.tracking.tracking_uri),
        }
    finally:
        db.dispose()


def balanced(status: dict) -> bool:
    rows = status["rows"]
    return rows["received"] == rows["scored"] + rows["quarantined"] + rows["late"]
