"""bench/alarm_tune.py's rule: which streams are tuning streams, what a setting scores, and that
it refuses a setting with any tuning stream over 2α rather than picking the best of the rest."""

import pytest

from bench.alarm_tune import FOLDERS, choose, reaching, score, tuning_rates
from bench.common import ROOT
from flows.settings import load_settings


def _figures(tuning_nab: float = 50.0, plant_f1: float = 0.6, worst: dict[str, float] | None = None) -> dict:
    """Figures of every folder as the replay reports them, every tuning stream at 0.5α unless
    `worst` names another rate; the report figures at a rate no rule may read (9α)."""
    worst = worst or {}
    figures = {}
    for folder in FOLDERS:
        rate = worst.get(folder.name, 0.5)
        if folder.labels == "nab":
            part = {"standard": 40.0, "normal_rate_x_alpha": 9.0}
            figures[folder.name] = {
                "tuning": {"standard": tuning_nab if folder.name == "nab-given" else 10.0},
                "report": part,
                "tuning_worst_x_alpha": rate,
                "worst_stream_x_alpha": 9.0,
            }
        elif folder.labels == "simulator":
            figures[folder.name] = {"f1": plant_f1 if folder.name != "demo" else 0.1, "normal_rate_x_alpha": rate}
        else:
            figures[folder.name] = {"anomaly-free x alpha": rate, "valve test rows": {"f1": 0.1}}
    if "demo" in worst:
        figures["demo"]["normal_rate_x_alpha"] = worst["demo"]
    return figures


def test_the_tuning_streams_are_every_folder_but_the_demo():
    rates = tuning_rates(_figures(worst={"nab-long": 3.0, "plant-12": 1.5, "skab-seed2": 4.3}))
    assert set(rates) == {f.name for f in FOLDERS} - {"demo"}
    assert rates["nab-long"] == 3.0 and rates["plant-12"] == 1.5 and rates["skab-seed2"] == 4.3


def test_the_score_is_the_mean_of_the_plants_f1_and_the_given_tuning_nab():
    assert score(_figures(tuning_nab=60.0, plant_f1=0.7)) == pytest.approx((0.7 + 0.6) / 2)


def test_the_rule_takes_the_best_score_among_settings_within_two_alpha_everywhere():
    results = [
        ({"rate_control_step": 0.5}, _figures(tuning_nab=70.0, worst={"nab-volatility": 2.1})),  # best score, over
        ({"rate_control_step": 1.0}, _figures(tuning_nab=55.0)),
        ({"rate_control_step": 2.0}, _figures(tuning_nab=60.0, worst={"demo": 30.0})),  # the demo does not count
    ]
    assert choose(results)[0] == {"rate_control_step": 2.0}
    assert choose(results[:2])[0] == {"rate_control_step": 1.0}


def test_no_setting_within_two_alpha_is_no_choice():
    results = [({}, _figures(worst={"skab-seed2": 4.34})), ({"tail_rows": 512}, _figures(worst={"nab-long60": 2.5}))]
    assert choose(results) is None


def test_a_setting_does_not_override_what_a_folders_own_config_sets():
    skab = load_settings(ROOT / "configs/skab_backfill.yaml")
    nab = load_settings(ROOT / "configs/nab.yaml")
    grid = {"continuation_step": 0.1, "rate_control_step": 2.0}
    assert reaching(grid, skab) == {"rate_control_step": 2.0}  # SKAB's config sets continuation_step 0
    assert reaching(grid, nab) == grid


def test_a_stream_the_setting_does_not_reach_does_not_decide():
    untouched = _figures(tuning_nab=60.0, worst={"skab-seed2": 4.34})
    untouched["skab-seed2"]["untouched"] = True
    assert "skab-seed2" not in tuning_rates(untouched)
    assert choose([({"continuation_step": 0.1}, untouched)])[0] == {"continuation_step": 0.1}
