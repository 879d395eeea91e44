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
