"""Drift statistics and the detectors' decisions, on hand-made inputs."""

from datetime import UTC, datetime

import numpy as np
import pytest
from scipy.stats import ks_2samp

from flows.drift_watch import adwin_fires, detect
from flows.settings import DriftSettings
from flows.storage.models import BatchSummary
from lru_online.drift import Reference, ks_statistic, psi, summarise


def test_ks_matches_scipy_and_psi_grows_with_shift():
    rng = np.random.default_rng(0)
    reference_values = rng.normal(0, 1, 1500)
    reference = summarise(reference_values, sample_size=5000)
    same, shifted = rng.normal(0, 1, 500), rng.normal(1.0, 1, 500)
    assert ks_statistic(reference, shifted) == pytest.approx(ks_2samp(reference_values, shifted).statistic)
    assert psi(reference, same) < 0.1 < 0.5 < psi(reference, shifted)
    # PSI by hand on two bins: sum (a - e) ln(a / e).
    two = Reference(edges=[0.0], fractions=[0.5, 0.5], sample=[-1.0, 1.0], mean=0.0, std=1.0)
    values = np.array([-1.0] * 30 + [1.0] * 70)
    assert psi(two, values) == pytest.approx((0.3 - 0.5) * np.log(0.3 / 0.5) + (0.7 - 0.5) * np.log(0.7 / 0.5))
    assert np.isnan(psi(two, np.array([np.nan])))


def _summaries(maes, psis=None):
    psis = psis or [0.1] * len(maes)
    stamp = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        BatchSummary(
            batch_id=i + 1,
            entity="line-1",
            sequence=i + 1,
            rows=100,
            first_ts=stamp,
            last_ts=stamp,
            metrics={"mae_before": mae},
            drift_stats={"psi": {"pressure": p}, "ks": {"pressure": 0.1}},
            features_path="",
        )
        for i, (mae, p) in enumerate(zip(maes, psis, strict=True))
    ]


SETTINGS = DriftSettings(cooldown_batches=3, consecutive=2, psi_threshold=1.0, error_ratio_threshold=1.5)


def test_error_jump_fires_on_the_jump_only():
    assert detect(_summaries([0.2, 0.21, 0.19, 0.2]), SETTINGS) == []
    fired = detect(_summaries([0.2, 0.21, 0.19, 0.2, 0.45]), SETTINGS)
    assert [d.detector for d in fired] == ["error_jump"] and fired[0].value == pytest.approx(0.45 / 0.2)


def test_psi_needs_consecutive_batches_over_the_limit():
    assert detect(_summaries([0.2] * 5, [0.1, 0.1, 0.1, 0.1, 3.0]), SETTINGS) == []
    fired = detect(_summaries([0.2] * 5, [0.1, 0.1, 0.1, 1.5, 3.0]), SETTINGS)
    assert [(d.detector, d.feature) for d in fired] == [("psi", "pressure")]


def test_cooldown_after_a_reset():
    assert detect(_summaries([0.2, 0.9], [5.0, 5.0]), SETTINGS) == []


def test_adwin_sees_a_change_in_the_per_event_errors():
    settings = DriftSettings(cooldown_batches=1, error_ratio_threshold=100.0)
    rng = np.random.default_rng(3)
    calm = [np.abs(rng.normal(0, 0.5, 200)) for _ in range(6)]
    assert detect(_summaries([0.4] * 6), settings, calm) == []
    changed = calm[:5] + [np.abs(rng.normal(0, 1.5, 200))]
    assert [d.detector for d in detect(_summaries([0.4] * 6), settings, changed)] == ["adwin_error"]
    # A change inside an older batch is not reported again at the newest one.
    assert not adwin_fires(calm[:3] + changed[-1:] + [np.abs(rng.normal(0, 1.5, 200))] * 2, settings.adwin_delta)
