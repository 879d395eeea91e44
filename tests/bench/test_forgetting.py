"""bench/forgetting.py on a real flow run: with learning switched off the final model is the
model of every moment, so re-scoring the early rows must give back exactly the errors made while
streaming (the sequences, their order, the carried state through initial training and the
initial files left out are all rebuilt right), with the forecast mixture on (its state replayed
from each line's start as the pipeline carried it from file to file) and off; with learning on,
the two differ."""

from __future__ import annotations

import pytest

from bench.forgetting import measure
from flows.orchestrate.prefect_flows import continual_update
from tests.flows.helpers import small_config, small_plant


def _streamed(tmp_path, learning_rate: float, mixture: bool = True):
    settings, config = small_config(
        tmp_path,
        initial_training={"batches": 2, "epochs": 2},
        update={"learning_rate": learning_rate},
        drift={"on_detect": "record"},
        mixture={"enabled": mixture},
    )
    small_plant(settings, entities=3, batches=10, rows_per_batch=60, plant_files=True, broken_batches={})
    continual_update(config=config)
    return settings


@pytest.mark.parametrize("mixture", [True, False], ids=["mixture", "model-alone"])
def test_with_learning_off_the_frozen_model_repeats_the_streamed_errors(tmp_path, prefect_api, mixture):
    settings = _streamed(tmp_path, learning_rate=0.0, mixture=mixture)
    result = measure(settings, share=0.5)
    assert result.lines == 3
    assert result.rows == 3 * 4 * 60  # half of the 8 online files' 60 rows per line
    assert result.frozen_mse == pytest.approx(result.streaming_mse, rel=1e-5)


def test_with_learning_on_the_final_model_scores_the_early_rows_differently(tmp_path, prefect_api):
    settings = _streamed(tmp_path, learning_rate=0.01)
    result = measure(settings, share=0.5)
    assert result.rows == 3 * 4 * 60
    assert result.frozen_mse != pytest.approx(result.streaming_mse, rel=1e-3)
