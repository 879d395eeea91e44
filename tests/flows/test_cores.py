"""How many threads the fleet step's torch kernels take: the configured number, or the usable
cores less one (the run's helper process and Prefect's API work beside the driver)."""

from __future__ import annotations

import pytest
import torch

from flows.cores import driver_threads
from flows.orchestrate.pipeline import Pipeline
from flows.settings import ConfigError, UpdateSettings
from tests.flows.helpers import small_config


def test_the_driver_leaves_one_core_to_the_processes_beside_it():
    assert driver_threads(None, cores=2) == 1
    assert driver_threads(None, cores=16) == 15
    assert driver_threads(None, cores=1) == 1  # never none
    assert driver_threads(3, cores=16) == 3  # configured wins


def test_a_run_sets_torchs_threads_from_the_setting(tmp_path):
    before = torch.get_num_threads()
    try:
        settings, _ = small_config(tmp_path, update={"torch_threads": 2})
        Pipeline(settings).close()
        assert torch.get_num_threads() == 2
        settings, _ = small_config(tmp_path / "other", update={"torch_threads": 1})
        Pipeline(settings).close()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_thread_count_below_one_is_refused_and_stays_out_of_the_learner():
    with pytest.raises((ValueError, ConfigError)):
        UpdateSettings(torch_threads=0)
    assert "torch_threads" not in UpdateSettings(torch_threads=2).learner_fields()
