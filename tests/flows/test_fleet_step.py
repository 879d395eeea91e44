"""A plant file of many lines goes through one fleet step: every line scored by the model as it
stood before the file, whatever the other lines of the file or their order; the update run
beside the lines' finish ends exactly where the steps run one after another end; short batches
still feed the replay reservoir."""

from __future__ import annotations

import shutil
from concurrent import futures
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sqlalchemy import select

from flows.ingest.landing import read_batch
from flows.orchestrate import pipeline
from flows.orchestrate.prefect_flows import continual_update
from flows.settings import load_settings
from flows.storage.database import Database
from flows.storage.models import Batch, BatchStatus, BatchSummary, EntityState, ModelState
from flows.storage.work_folder import resolved_path
from lru_online import OnlineLearner
from tests.flows.helpers import small_config, small_plant

PLANT = {"entities": 4, "batches": 6, "rows_per_batch": 30, "plant_files": True, "broken_batches": {}}


@pytest.fixture(scope="module")
def before_last_file(tmp_path_factory, prefect_api) -> tuple[Path, str, Path]:
    """A plant run up to its last file (held back): the work folder, its config and the file."""
    root = tmp_path_factory.mktemp("fleet")
    settings, config = small_config(
        root / "base", initial_training={"batches": 2, "epochs": 1}, drift={"on_detect": "record"}
    )
    truth = small_plant(settings, **PLANT)
    last = root / truth.files[-1]
    shutil.move(settings.paths.landing / truth.files[-1], last)
    continual_update(config=config)  # everything before the last file
    return settings.workdir, config, last


def _scores_of_last_file(before_last_file, root: Path, change) -> pd.DataFrame:
    """The scores the last file gets when changed by `change(frame)`, in a copy of the folder
    that processed everything before it (copied folders run on their own)."""
    base, config, last = before_last_file
    shutil.copytree(base, root)
    settings = load_settings(config, workdir=root)
    change(read_batch(last, settings.log_schema)).to_csv(settings.paths.landing / "last.csv", index=False)
    continual_update(config=config, workdir=str(root))
    db = Database(settings.database_url)
    with db.session() as session:
        path = session.scalars(select(BatchSummary.features_path).order_by(BatchSummary.sequence.desc())).first()
    db.dispose()
    output = pd.read_parquet(resolved_path(settings.workdir, path), columns=["entity", "timestamp", "score"])
    return output.set_index(["entity", "timestamp"])


def _lines_reordered(frame: pd.DataFrame) -> pd.DataFrame:
    """The file's lines in another order, each line's rows interleaved with the others'."""
    order = {"line-3": 0, "line-1": 1, "line-4": 2, "line-2": 3}
    position = frame.groupby("entity").cumcount()
    return frame.assign(_o=frame["entity"].map(order), _p=position).sort_values(["_p", "_o"]).drop(columns=["_o", "_p"])


@pytest.mark.slow
def test_a_lines_scores_do_not_depend_on_the_other_lines_of_its_file(tmp_path, before_last_file):
    original = _scores_of_last_file(before_last_file, tmp_path / "original", lambda f: f)
    shuffled = _scores_of_last_file(before_last_file, tmp_path / "shuffled", _lines_reordered)

    def with_a_new_line(frame: pd.DataFrame) -> pd.DataFrame:
        extra = frame[frame["entity"] == "line-2"].assign(entity="line-9")
        return pd.concat([extra, frame[frame["entity"] != "line-3"]])  # one line added, one left out

    grown = _scores_of_last_file(before_last_file, tmp_path / "grown", with_a_new_line)
    pd.testing.assert_frame_equal(shuffled.sort_index(), original.sort_index(), rtol=1e-5, atol=1e-6)
    kept = original.drop(index="line-3", level="entity").sort_index()
    pd.testing.assert_frame_equal(grown.drop(index="line-9", level="entity").sort_index(), kept, rtol=1e-5, atol=1e-6)
    assert np.isfinite(grown.loc["line-9", "score"].iloc[1:]).all()  # the new line is scored from its 2nd event


class _InOrder(futures.Executor):
    """Runs each call when it is submitted, in the caller's thread: the file's steps one after
    another as they are written (the linear member before the model's forward, the update
    before the lines' finish)."""

    def submit(self, fn, /, *args, **kwargs) -> futures.Future:
        future = futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # noqa: BLE001 - handed to the caller like a thread's
            future.set_exception(error)
        return future


def _last_file_run(before_last_file, root: Path) -> dict:
    """Every state the last file leaves behind, in a copy of the folder that ran the rest."""
    base, config, last = before_last_file
    shutil.copytree(base, root)
    settings = load_settings(config, workdir=root)
    shutil.copy(last, settings.paths.landing / last.name)
    continual_update(config=config, workdir=str(root))
    db = Database(settings.database_url)
    with db.session() as session:
        lines = {
            s.entity: (s.hidden_state, s.feature_state, s.drift_state, s.alarm_state)
            for s in session.scalars(select(EntityState))
        }
        summary = session.scalars(select(BatchSummary).order_by(BatchSummary.sequence.desc())).first()
        checkpoint = session.get(ModelState, settings.pipeline).checkpoint_path
    db.dispose()
    learner = OnlineLearner.load_checkpoint(resolved_path(settings.workdir, checkpoint))
    return {
        "lines": lines,
        "weights": {k: v.clone() for k, v in learner.model.state_dict().items()},
        "updates": learner.updates,
        "output": pd.read_parquet(resolved_path(settings.workdir, summary.features_path)),
    }


@pytest.mark.slow
def test_the_update_beside_the_finish_ends_where_the_steps_in_order_end(tmp_path, before_last_file, monkeypatch):
    beside = _last_file_run(before_last_file, tmp_path / "beside")
    monkeypatch.setattr(pipeline, "beside_executor", _InOrder)
    in_order = _last_file_run(before_last_file, tmp_path / "in-order")

    assert beside["lines"] == in_order["lines"]  # hidden, feature, drift and alarm states, byte for byte
    assert beside["updates"] == in_order["updates"]
    assert beside["weights"].keys() == in_order["weights"].keys()
    for name, weight in in_order["weights"].items():
        assert torch.equal(beside["weights"][name], weight), name
    pd.testing.assert_frame_equal(beside["output"], in_order["output"])
    assert beside["output"]["anomaly_score"].notna().any()  # the lines were judged


@pytest.mark.slow
def test_the_update_learning_from_the_scoring_forward_ends_where_one_running_it_again_ends(
    tmp_path, before_last_file, monkeypatch
):
    """The plant's 30-row lines fit one update window: the update takes the scoring forward's
    graph (OnlineLearner.score_for_update) instead of running that forward again, and the file
    ends exactly where an update that runs it ends."""
    given = []
    update = OnlineLearner.update

    def recording(self, *args, scoring=None, **kwargs):
        given.append(scoring is not None)
        return update(self, *args, scoring=scoring, **kwargs)

    monkeypatch.setattr(OnlineLearner, "update", recording)
    reused = _last_file_run(before_last_file, tmp_path / "reused")
    assert given == [True]
    monkeypatch.setattr(OnlineLearner, "score_for_update", lambda self, *a: (self.score(*a), None))
    again = _last_file_run(before_last_file, tmp_path / "again")
    assert given == [True, False]

    assert reused["lines"] == again["lines"]
    for name, weight in again["weights"].items():
        assert torch.equal(reused["weights"][name], weight), name
    pd.testing.assert_frame_equal(reused["output"], again["output"])


def test_an_update_that_fails_beside_the_finish_commits_nothing_of_its_file(tmp_path, before_last_file, monkeypatch):
    base, config, last = before_last_file
    root = tmp_path / "failing"
    shutil.copytree(base, root)
    settings = load_settings(config, workdir=root)
    shutil.copy(last, settings.paths.landing / last.name)

    def failing_update(*args):
        raise RuntimeError("update failed on its thread")

    monkeypatch.setattr(pipeline, "learn_lines", failing_update)
    with pytest.raises(Exception, match="update failed on its thread"):
        continual_update(config=config, workdir=str(root))
    db = Database(settings.database_url)
    with db.session() as session:
        batch = session.scalars(select(Batch).order_by(Batch.id.desc())).first()
        assert batch.status == BatchStatus.PENDING
        assert session.scalar(select(BatchSummary).where(BatchSummary.batch_id == batch.id)) is None
    monkeypatch.undo()
    continual_update(config=config, workdir=str(root))  # the next run processes it
    with db.session() as session:
        assert session.get(Batch, batch.id).status == BatchStatus.PROCESSED
    db.dispose()


def test_short_batches_keep_refreshing_the_replay_reservoir(tmp_path, prefect_api):
    """Batches of 20 events per line, shorter than the training window of 32."""
    settings, config = small_config(
        tmp_path,
        initial_training={"batches": 2, "epochs": 2},
        update={"window": 32, "replay_capacity": 64, "replay_batch": 2},
        drift={"on_detect": "record"},
    )
    small_plant(settings, entities=3, batches=10, rows_per_batch=20, plant_files=True, broken_batches={})
    continual_update(config=config)
    db = Database(settings.database_url)
    with db.session() as session:
        checkpoint = session.get(ModelState, settings.pipeline).checkpoint_path
    learner = OnlineLearner.load_checkpoint(resolved_path(settings.workdir, checkpoint))
    seen_at = sorted(int(w["update_index"]) for w in learner.replay.windows)
    initial_updates = 2  # the initial training's epochs
    live = [index for index in seen_at if index >= initial_updates]
    assert learner.updates == initial_updates + 10  # one update per file
    assert len(live) >= 10, seen_at  # windows of the live files, not only of the initial training
    # Every update offered each line's windows: 2 epochs over 2 files of 20 events (windows of
    # 32 and 8 events) in the initial training, then one 20-event window per live file.
    assert learner.replay.seen == 3 * (2 * 2 + 10)


@pytest.mark.parametrize("lines_per_step, steps", [(None, 1), (2, 2)])
def test_lines_per_step_sets_a_files_optimizer_steps(tmp_path, prefect_api, lines_per_step, steps):
    settings, config = small_config(
        tmp_path,
        initial_training={"batches": 2, "epochs": 1},
        update={"window": 64, "lines_per_step": lines_per_step},
        drift={"on_detect": "record"},
    )
    small_plant(settings, **{**PLANT, "batches": 3})
    continual_update(config=config)
    db = Database(settings.database_url)
    with db.session() as session:
        from flows.storage.models import SequenceMetrics

        windows = [m.metrics["windows"] for m in session.scalars(select(SequenceMetrics))]
    assert windows == [float(steps)] * 3  # 4 lines of 30 events: one window, in 1 or 2 groups
