"""Carried state is real: batch after batch equals one pass over their concatenation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sqlalchemy import select

from features import build_features
from flows.ingest.landing import read_batch
from flows.ingest.validation import parse_timestamps
from flows.orchestrate.prefect_flows import continual_update
from flows.storage.database import Database
from flows.storage.models import Batch, BatchSummary, EntityState, ModelState
from flows.storage.work_folder import resolved_path
from lru_online import OnlineLearner, RecurrentState
from tests.flows.helpers import small_config, small_plant


def test_batches_one_by_one_equal_one_pass(tmp_path, prefect_api):
    settings, config = small_config(
        tmp_path,
        update={"learning_rate": 0.0, "replay_batch": 0},
        initial_training={"batches": 1, "epochs": 1},
        drift={"on_detect": "record"},
    )
    truth = small_plant(settings, entities=1, batches=6, rows_per_batch=90, broken_batches={})
    originals = {name: read_batch(settings.paths.landing / name, settings.log_schema) for name in truth.files}
    continual_update(config=config)

    db = Database(settings.database_url)
    with db.session() as session:
        summaries = list(session.scalars(select(BatchSummary).order_by(BatchSummary.sequence)))
        batches = [session.get(Batch, s.batch_id) for s in summaries]
        entity = session.get(EntityState, "line-1")
        checkpoint = session.get(ModelState, settings.pipeline).checkpoint_path
    assert len(batches) == 6 and all(b.status == "processed" for b in batches)
    outputs = [pd.read_parquet(resolved_path(settings.workdir, s.features_path)) for s in summaries]
    streamed_scores = np.concatenate([output["score"].to_numpy() for output in outputs])
    streamed_state = RecurrentState.from_bytes(entity.hidden_state)

    # One pass over the concatenated rows, from fresh feature and model states.
    spec = settings.feature_spec
    rows = pd.concat([originals[Path(b.source_file).name] for b in batches], ignore_index=True)
    rows[spec.timestamp_column] = parse_timestamps(rows[spec.timestamp_column])
    features, _ = build_features(rows, spec, {})
    learner = OnlineLearner.load_checkpoint(resolved_path(settings.workdir, checkpoint))
    u, y, dt, steps = features.tensors()
    whole = learner.score(u, y, None, dt, steps)

    np.testing.assert_allclose(streamed_scores, whole.scores[0].numpy(), rtol=1e-4, atol=1e-5, equal_nan=True)
    for carried, direct in zip(streamed_state.hidden, whole.state.hidden, strict=True):
        torch.testing.assert_close(carried, direct, rtol=1e-4, atol=1e-5)
