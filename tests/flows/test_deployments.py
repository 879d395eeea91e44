from flows.orchestrate.deployments import build_deployments
from flows.orchestrate.prefect_flows import drift_resource
from flows.settings import load_settings


def test_deployments_schedule_updates_and_trigger_retraining_on_drift(tmp_path):
    settings = load_settings(workdir=tmp_path, schedule={"cron": "*/10 * * * *", "interval_seconds": None})
    update, retrain = build_deployments(settings, "/etc/lru/config.yaml")
    assert update.name.endswith("continual-update") and retrain.name.endswith("retrain")
    assert update.parameters == {"config": "/etc/lru/config.yaml", "workdir": str(settings.workdir)}
    assert update.schedules[0].schedule.cron == "*/10 * * * *"
    (trigger,) = retrain.triggers
    assert trigger.expect == {settings.drift.event_name}
    assert trigger.match.model_dump()["prefect.resource.id"] == drift_resource(settings.pipeline)
    assert trigger.parameters["trigger"] == "drift"
    assert "event.payload.drift_event_id" in trigger.parameters["drift_event_id"]["template"]


def test_one_update_and_one_retrain_at_a_time(tmp_path):
    """An update due while one runs is cancelled (the running one takes every pending file); a
    retrain waits for the one before it. The runner serving both sets no shared limit of its own,
    so late updates cannot hold a retrain back."""
    update, retrain = build_deployments(load_settings(workdir=tmp_path), None)
    assert (update.concurrency_limit, update.concurrency_options.collision_strategy.value) == (1, "CANCEL_NEW")
    assert (retrain.concurrency_limit, retrain.concurrency_options.collision_strategy.value) == (1, "ENQUEUE")
