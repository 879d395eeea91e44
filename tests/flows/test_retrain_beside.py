"""Retraining beside ingestion: the update run commits its files while a retraining trains in a
process of its own, and a winning challenger catches up on those files before it is swapped in
between two of them. Real flow runs, SQLite, MLflow."""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import torch
from sqlalchemy import func, select

from features import FeatureBatch
from flows.model import retraining
from flows.model.fleet import load_learner
from flows.model.forecast_mixture import LINEAR_PREFIX
from flows.monitor.tracking import CHAMPION, Tracker
from flows.orchestrate.pipeline import Pipeline
from flows.orchestrate.prefect_flows import continual_update
from flows.storage.database import Database
from flows.storage.models import Batch, BatchStatus, BatchSummary, EntityState, ModelState, RetrainDecision
from flows.storage.work_folder import resolved_path
from lru_online import codec
from lru_online.state import RecurrentState
from tests.flows.helpers import small_config, small_plant

pytestmark = pytest.mark.slow


def test_a_challenger_trained_while_files_land_catches_up_on_them_and_is_swapped_in(tmp_path, prefect_api, monkeypatch):
    """Files committed while the challenger trained are scored and learned by it, in order and
    from its own states, before the swap: the stored line states and the live checkpoint equal
    an independent replay of those files by a copy of the challenger taken when it was judged."""
    settings, config = small_config(
        tmp_path,
        initial_training={"batches": 2, "epochs": 1},
        drift={"on_detect": "record"},
        retrain={"window_rows": 240, "holdout_rows": 80, "epochs": 1},
    )
    small_plant(settings, entities=3, batches=9, rows_per_batch=80, plant_files=True, broken_batches={})
    continual_update(config=config, max_batches=3)

    judged = {}
    evaluate = retraining._evaluate

    def files_land_while_it_trains(learner, window, mixture):
        mse, states = evaluate(learner, window, mixture)
        judged["learner"], judged["states"] = copy.deepcopy(learner), dict(states)
        continual_update(config=config)  # the files behind the retraining go on meanwhile
        with Database(settings.database_url).session() as session:  # no file lands after these
            judged["records"] = {line.entity: line.hidden_state for line in session.scalars(select(EntityState))}
        return mse, states

    monkeypatch.setattr(retraining, "_evaluate", files_land_while_it_trains)
    # Injected: a champion whose held-out error blew up, so the challenger surely wins.
    monkeypatch.setattr(retraining, "_champion_mse", lambda window, mixture: float("inf"))
    pipeline = Pipeline(settings)
    try:
        outcome = retraining.retrain(pipeline.live, pipeline.tracker)
    finally:
        pipeline.close()

    db = Database(settings.database_url)
    with db.session() as session:
        later = pd.DataFrame(
            session.execute(
                select(BatchSummary.sequence, BatchSummary.entity, BatchSummary.features_path).where(
                    BatchSummary.sequence > outcome.window_sequence
                )
            ).all(),
            columns=["sequence", "entity", "features_path"],
        )
        stored = {line.entity: line.hidden_state for line in session.scalars(select(EntityState))}
        model = session.get(ModelState, settings.pipeline)
        newest = session.scalar(select(func.max(BatchSummary.sequence)))
        decision = session.get(RetrainDecision, outcome.decision_id)
    assert len(later["sequence"].unique()) >= 3, "files should have been committed while it trained"
    assert outcome.promoted and outcome.swapped_at_sequence == newest
    assert (decision.window_sequence, decision.swapped_at_sequence) == (outcome.window_sequence, newest)
    assert model.champion_version == outcome.challenger_version
    assert Tracker(settings).alias_version(CHAMPION) == outcome.challenger_version

    reference, states = judged["learner"], judged["states"]
    for _, part in later.groupby("sequence", sort=True):
        frame = pd.read_parquet(resolved_path(settings.workdir, part["features_path"].iloc[0]))
        frame = frame[frame["entity"].isin(part["entity"])].sort_values(["entity", "timestamp"], kind="stable")
        lines = FeatureBatch.from_frame(frame, settings.feature_spec)
        u, y, dt, steps = lines.tensors()
        start = RecurrentState.cat([RecurrentState.from_bytes(states[e]) for e in lines.entities])
        scored = reference.score(u, y, start, dt, steps)
        reference.update(u, y, start, dt, steps)
        states.update({e: end.to_bytes() for e, end in zip(lines.entities, scored.state.unbind(), strict=True)})
    assert set(states) == set(stored)
    for entity, data in states.items():
        # The promoted model's state, bit for bit; beside it the line's linear mixture member as
        # it stood before the swap (it learns from the readings, not from the model); nothing
        # of the old mixture's combination (a new model starts it afresh).
        tensors, meta = codec.decode(stored[entity])
        replayed, _ = codec.decode(data)
        before, _ = codec.decode(judged["records"][entity])
        linear = {name: t for name, t in before.items() if name.startswith(LINEAR_PREFIX)}
        assert linear and set(tensors) == set(replayed) | set(linear), entity
        for name, tensor in (replayed | linear).items():
            assert torch.equal(tensors[name], tensor), (entity, name)
    live = load_learner(resolved_path(settings.workdir, model.checkpoint_path), settings)
    for ours, theirs in zip(live.model.parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_the_update_run_commits_its_files_while_its_retraining_trains_in_a_process_of_its_own(
    tmp_path, prefect_api, monkeypatch
):
    """A drift detection starts `lru-online retrain` beside the update run; held (injected) after
    training, it is let go only once every landed file is processed. Were the files waiting for
    the retraining, that would never happen."""
    settings, config = small_config(tmp_path)
    small_plant(settings)  # drift is detected mid-stream (as in test_pipeline_e2e)
    hold = tmp_path / "hold"
    hold.write_text("")
    monkeypatch.setenv("LRU_ONLINE_PAUSE_AT", "retrain_trained")
    monkeypatch.setenv("LRU_ONLINE_PAUSE_FILE", str(hold))
    db = Database(settings.database_url)
    db.migrate()  # the ledger the releaser reads exists before the run starts

    released = {}

    def release_when_every_file_is_done() -> None:
        ledger = Database(settings.database_url)
        deadline = time.monotonic() + 300
        try:
            while time.monotonic() < deadline:
                with ledger.session() as session:
                    statuses = list(session.scalars(select(Batch.status)))
                if statuses and BatchStatus.PENDING not in statuses and not any(settings.paths.landing.iterdir()):
                    released["all_done"] = True
                    return
                time.sleep(0.2)
        except Exception as error:  # reported by the test, not lost in the thread
            released["error"] = error
        finally:
            ledger.dispose()
            hold.unlink()

    releaser = threading.Thread(target=release_when_every_file_is_done, daemon=True)
    releaser.start()
    summary = continual_update(config=config)
    releaser.join(timeout=5)
    assert released == {"all_done": True}
    assert summary["run"]["retrains"] >= 1
    with db.session() as session:
        decisions = list(session.scalars(select(RetrainDecision)))
        finished = session.scalar(select(func.max(Batch.processed_at)))
        newest = session.scalar(select(func.max(BatchSummary.sequence)))
    assert len(decisions) == summary["run"]["retrains"]
    outputs = sorted((settings.workdir / "logs").glob("retrain-*.log"))  # not the run's own output
    assert len(outputs) == len(decisions)
    assert all("challenger held-out MSE" in path.read_text() for path in outputs)
    for decision in decisions:
        assert decision.trigger == "drift" and decision.drift_event_id is not None
        assert decision.decided_at > finished  # decided after the last file was committed
        assert decision.window_sequence <= newest
        if decision.promoted:
            assert decision.swapped_at_sequence == newest


def test_a_deployments_run_leaves_its_retraining_going_and_a_direct_run_waits(prefect_api, monkeypatch):
    """A run started by a deployment returns while its retraining goes on (its server stays up,
    and the deployment's concurrency limit would hold the next run back); a run called directly
    waits for it (it reports to that run's temporary API). The retraining here is a stand-in
    process; the deployment is injected through Prefect's runtime field."""
    from prefect import flow
    from prefect.runtime import deployment

    from flows.orchestrate.prefect_flows import _end_with
    from flows.orchestrate.retrain_beside import RetrainBeside

    def ending(deployment_id: str | None) -> RetrainBeside:
        beside = RetrainBeside(None, ".")
        beside._process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
        monkeypatch.setitem(deployment.FIELDS, "id", lambda: deployment_id)
        flow(name="ending")(lambda: _end_with(beside))()
        return beside

    left = ending("a-deployment")
    assert left.running()
    assert left.wait() == 0
    waited = ending(None)
    assert not waited.running() and waited._process.returncode == 0
