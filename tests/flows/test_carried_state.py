"""Carried state is real: batch after batch equals one pass over their concatenation."""

from __future__ import annotations

import numpy as np
import torch

from flows.ingest.landing import read_batch
from flows.orchestrate.prefect_flows import continual_update
from lru_online import RecurrentState
from tests.flows.helpers import one_pass, small_config, small_plant


def test_batches_one_by_one_equal_one_pass(tmp_path, prefect_api):
    settings, config = small_config(
        tmp_path,
        update={"learning_rate": 0.0, "replay_batch": 0},
        initial_training={"batches": 1, "epochs": 1},
        drift={"on_detect": "record"},
        mixture={"enabled": False},  # the model's own scores (with the mixture: test_forecast_mixture)
    )
    truth = small_plant(settings, entities=1, batches=6, rows_per_batch=90, broken_batches={})
    originals = {name: read_batch(settings.paths.landing / name, settings.log_schema) for name in truth.files}
    continual_update(config=config)

    run = one_pass(settings, originals, "line-1")
    assert len(run.summaries) == 6
    streamed_scores = run.outputs["score"].to_numpy()
    streamed_state = RecurrentState.from_bytes(run.record)

    # One pass over the concatenated rows, from fresh feature and model states.
    u, y, dt, steps = run.features.tensors()
    whole = run.learner.score(u, y, None, dt, steps)

    np.testing.assert_allclose(streamed_scores, whole.scores[0].numpy(), rtol=1e-4, atol=1e-5, equal_nan=True)
    for carried, direct in zip(streamed_state.hidden, whole.state.hidden, strict=True):
        torch.testing.assert_close(carried, direct, rtol=1e-4, atol=1e-5)
