"""Deployments: continual_update on its schedule, retrain on the drift event.

Without a work pool, `lru-online serve` runs them itself (`prefect.serve`). With
`prefect.work_pool` set they register on the server's pool instead, loaded from this source tree,
and the pool's workers run them; the drift trigger is then an automation on the server.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from uuid import UUID

from flows.settings import Settings

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the repository: entrypoints are relative to it
ENTRYPOINTS = {
    "continual-update": "flows/orchestrate/prefect_flows.py:continual_update",
    "retrain": "flows/orchestrate/prefect_flows.py:retrain_flow",
}


def deployment_specs(settings: Settings, config: str | None) -> dict[str, dict]:
    """Keyword arguments of `to_deployment` / `deploy` for each flow, by flow name."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from flows.orchestrate.prefect_flows import drift_resource

    prefix = settings.prefect.deployment_prefix
    base = {"config": config, "workdir": str(settings.workdir)}
    schedule = (
        {"cron": settings.schedule.cron} if settings.schedule.cron else {"interval": settings.schedule.interval_seconds}
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
    tags = ["lru-online", settings.pipeline]
    return {
        "continual-update": {
            "name": f"{prefix}-continual-update",
            "parameters": base,
            "tags": tags,
            "description": "Validate, score and learn from new landing files.",
            # One run takes every pending file, so a run due while another is running has nothing
            # to add: the server cancels it instead of letting late runs pile up.
            "concurrency_limit": ConcurrencyLimitConfig(
                limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
            ),
            **schedule,
        },
        "retrain": {
            "name": f"{prefix}-retrain",
            "parameters": {**base, "trigger": "manual"},
            "triggers": [trigger],
            # The trigger's template renders drift_event_id as text; the flow's own parameter
            # validation turns it back into an int, so the server must not refuse it first.
            "enforce_parameter_schema": False,
            # Drift events during a retrain wait their turn rather than train side by side.
            "concurrency_limit": ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
            "tags": tags,
            "description": "Train a challenger on the recent window; promote it if it wins.",
        },
    }


def build_deployments(settings: Settings, config: str | None) -> list:
    """The deployments that `prefect.serve` runs in this process."""
    from flows.orchestrate.prefect_flows import continual_update, retrain_flow

    specs = deployment_specs(settings, config)
    return [
        continual_update.to_deployment(**specs["continual-update"]),
        retrain_flow.to_deployment(**specs["retrain"]),
    ]


def serve_deployments(settings: Settings, config: str | None) -> None:
    """Serves both deployments from this process until SIGINT or SIGTERM. Either stops it
    cleanly: runs in progress are cancelled (a file's work is committed whole or not at all) and
    the schedules paused, so no runs pile up while nothing serves them.

    The runner itself sets no limit: the deployments' own concurrency limits (one update, one
    retrain) do. A limit here would be shared, and the runner fills it in schedule order, so a
    backlog of late update runs would keep a drift-triggered retrain from ever starting."""
    import asyncio

    runner = _runner_stopped_by_sigterm()(limit=None, pause_on_shutdown=True)
    for deployment in build_deployments(settings, config):
        runner.add_deployment(deployment)
    try:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C: the runner has stopped on its way out
            asyncio.run(runner.start())
    finally:
        _send_queued_logs_and_events()


def _send_queued_logs_and_events() -> None:
    """Prefect sends run logs and events from background queues; they go out now, while the
    API (perhaps this command's own server) still answers."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=5)


def _runner_stopped_by_sigterm() -> type:
    """Prefect's Runner, with a SIGTERM handler that really stops it. Prefect 3.8's own handler
    calls the async `stop` from inside the event loop, where it only makes a coroutine: the runner
    never stops its runs, Python warns that the coroutine was never awaited, and `sys.exit`
    cuts the loop short."""
    import asyncio

    from prefect.runner import Runner

    class SigtermStoppableRunner(Runner):
        def handle_sigterm(self, *args, **kwargs) -> None:
            self._logger.info("SIGTERM received, stopping")
            loop = asyncio.get_running_loop()
            loop.call_soon_threadsafe(lambda: setattr(self, "_stopping_task", loop.create_task(self.astop())))

    return SigtermStoppableRunner


def deploy_to_work_pool(settings: Settings, config: str | None) -> dict[str, UUID]:
    """Registers both deployments on `prefect.work_pool`; returns their ids by flow name."""
    from prefect import Flow

    if not settings.prefect.work_pool:
        raise ValueError("prefect.work_pool is not set: no work pool to deploy to")
    ids = {}
    for flow_name, spec in deployment_specs(settings, config).items():
        flow = Flow.from_source(source=str(SOURCE_ROOT), entrypoint=ENTRYPOINTS[flow_name])
        ids[flow_name] = flow.deploy(
            work_pool_name=settings.prefect.work_pool, build=False, push=False, print_next_steps=False, **spec
        )
    return ids
