"""Deployments: continual_update on its schedule, retrain on the drift event."""

from __future__ import annotations

from flows.settings import Settings


def build_deployments(settings: Settings, config: str | None) -> list:
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from flows.prefect_flows import continual_update, drift_resource, retrain_flow

    prefix = settings.prefect.deployment_prefix
    base = {"config": config, "workdir": str(settings.workdir)}
    schedule = (
        {"cron": settings.schedule.cron} if settings.schedule.cron else {"interval": settings.schedule.interval_seconds}
    )
    update = continual_update.to_deployment(
        name=f"{prefix}-continual-update",
        parameters=base,
        tags=["lru-online", settings.pipeline],
        description="Validate, score and learn from new landing files.",
        **schedule,
    )
    trigger = DeploymentEventTrigger(
        name=f"{prefix}-drift",
        expect={settings.drift.event_name},
        match={"prefect.resource.id": drift_resource(settings.pipeline)},
        parameters={
            **base,
            "trigger": "drift",
            "drift_event_id": {"__prefect_kind": "jinja", "template": "{{ event.payload.drift_event_id }}"},
        },
    )
    retrain = retrain_flow.to_deployment(
        name=f"{prefix}-retrain",
        parameters={**base, "trigger": "manual"},
        triggers=[trigger],
        tags=["lru-online", settings.pipeline],
        description="Train a challenger on the recent window; promote it if it wins.",
    )
    return [update, retrain]


def serve_deployments(settings: Settings, config: str | None) -> None:
    from prefect import serve

    serve(*build_deployments(settings, config))
