"""The accounting of a work folder: batches, rows, drift, registry, as one dictionary."""

from __future__ import annotations

from flows.pipeline import Pipeline
from flows.settings import Settings
from flows.storage.database import masked
from flows.tracking import CHALLENGER, CHAMPION


def pipeline_status(settings: Settings) -> dict:
    pipeline = Pipeline(settings)
    try:
        accounting = pipeline.ledger.accounting()
        tracker = pipeline.tracker
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
        pipeline.close()


def balanced(status: dict) -> bool:
    rows = status["rows"]
    return rows["received"] == rows["scored"] + rows["quarantined"] + rows["late"]
