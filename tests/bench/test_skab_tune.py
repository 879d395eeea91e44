"""bench/skab_tune.py: the grid it walks, the rule that picks from it and the check of how far
the rule's figures carry from one half of the tuning files to the other."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

from bench.skab_tune import _figures, choose, grid, mean_figures, portability, settings_with_refits

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "skab"


def test_the_grid_varies_the_short_charts_rate_only_where_it_is_used_and_keeps_it_shorter():
    args = argparse.Namespace(
        smoothing_rows="10,40",
        false_alarm_rates="0.01",
        recent_rows="0,10,20",
        recent_rates="0.5,0.85",
        bias_rows="0",
        threshold_fits="conformal,gamma",
    )
    settings = grid(args)
    plain = {"smoothing_rows": 10, "false_alarm_rate": 0.01, "recent_rows": 0, "bias_rows": 0}
    assert plain | {"threshold_fit": "conformal"} in settings and plain | {"threshold_fit": "gamma"} in settings
    assert all(s["recent_rows"] < s["smoothing_rows"] for s in settings)
    assert all(("recent_false_alarm_rate" in s) == (s["recent_rows"] > 0) for s in settings)
    # smoothing 10: m 0 only; smoothing 40: m 0, then m 10 and 20 at each of the two rates; each
    # with both threshold fits.
    assert len(settings) == 2 * (1 + 1 + 2 * 2)


def test_every_alarm_setting_is_tried_at_every_refit_length():
    args = argparse.Namespace(
        smoothing_rows="40",
        false_alarm_rates="0.005,0.01",
        recent_rows="0",
        recent_rates="0.7",
        bias_rows="0",
        threshold_fits="conformal",
        tail_rows="0",
        refit_epochs="0,10",
    )
    settings = settings_with_refits(args)
    assert len(settings) == 2 * 2
    assert {refit for _, refit in settings} == {0, 10}
    for alarm in grid(args):
        assert [refit for a, refit in settings if a == alarm] == [0, 10]


def test_each_rule_takes_its_best_within_the_far_limit():
    results = [
        ({"name": "noisy"}, {"f1": 0.9, "far_percent": 20.0, "nab_standard": 50.0}),
        ({"name": "low nab"}, {"f1": 0.8, "far_percent": 11.0, "nab_standard": 30.0}),
        ({"name": "high nab"}, {"f1": 0.8, "far_percent": 12.0, "nab_standard": 35.0}),
        ({"name": "weak"}, {"f1": 0.7, "far_percent": 5.0, "nab_standard": 40.0}),
    ]
    assert choose(results, far_limit=12.0, rank_by="f1")[0]["name"] == "high nab"
    assert choose(results, far_limit=11.5, rank_by="f1")[0]["name"] == "low nab"
    assert choose(results, far_limit=1.0, rank_by="f1") is None
    # Ranked by NAB, F1 does not count: the weak detector's NAB wins under any limit it meets.
    assert choose(results, far_limit=12.0)[0]["name"] == "weak"
    assert choose(results, far_limit=4.0) is None


def test_ranked_by_nab_equal_scores_go_to_the_lower_far():
    results = [
        ({"name": "noisy"}, {"f1": 0.8, "far_percent": 5.5, "nab_standard": 30.0}),
        ({"name": "quiet"}, {"f1": 0.7, "far_percent": 2.0, "nab_standard": 30.0}),
        ({"name": "over"}, {"f1": 0.9, "far_percent": 6.5, "nab_standard": 40.0}),
    ]
    assert choose(results, far_limit=6.0)[0]["name"] == "quiet"


def _seed(f1: float, far: float) -> dict:
    return {"f1": f1, "far_percent": far, "mar_percent": 30.0, "nab_standard": 25.0, "false_positives": 10}


def test_a_setting_lucky_at_one_seed_loses_to_one_that_holds_over_the_seeds():
    lucky = [_seed(0.80, 4.0), _seed(0.78, 15.0), _seed(0.76, 17.0)]
    steady = [_seed(0.77, 8.0), _seed(0.77, 9.0), _seed(0.76, 10.0)]
    # Read at the first seed alone, the rule would take the lucky setting.
    assert choose([("lucky", lucky[0]), ("steady", steady[0])], far_limit=12.0, rank_by="f1")[0] == "lucky"
    means = [("lucky", mean_figures(lucky)), ("steady", mean_figures(steady))]
    assert means[0][1]["far_percent"] == 12.0 and means[0][1]["f1"] == 0.78
    assert (means[0][1]["far_min"], means[0][1]["far_max"], means[0][1]["seeds"]) == (4.0, 17.0, 3)
    assert choose(means, far_limit=11.9, rank_by="f1")[0] == "steady"


def test_portability_ranks_each_figure_between_the_halves():
    # F1 reverses its order between the halves, FAR keeps it (on another scale), NAB is flat.
    halves = [
        ({"f1": 0.9, "far_percent": 1.0, "nab_standard": 30.0}, {"f1": 0.5, "far_percent": 10.0, "nab_standard": 20.0}),
        ({"f1": 0.7, "far_percent": 2.0, "nab_standard": 30.0}, {"f1": 0.6, "far_percent": 30.0, "nab_standard": 25.0}),
        ({"f1": 0.5, "far_percent": 3.0, "nab_standard": 30.0}, {"f1": 0.8, "far_percent": 40.0, "nab_standard": 21.0}),
    ]
    correlations = portability(halves)
    assert correlations["f1"] == pytest.approx(-1.0)
    assert correlations["far_percent"] == pytest.approx(1.0)
    assert math.isnan(correlations["nab_standard"])  # one half ranks nothing
    assert all(math.isnan(v) for v in portability(halves[:2]).values())


@pytest.mark.skipif(not (DATA / "valve1").is_dir(), reason=f"SKAB data not at {DATA}")
def test_each_halfs_figures_are_those_of_its_files_run_alone():
    from bench.skab import load_folder

    files, _ = load_folder(DATA)
    picked = [f for f in files if f.relative in ("valve1/0.csv", "valve1/1.csv")]
    setting = ({"smoothing_rows": 40, "false_alarm_rate": 0.01, "recent_rows": 0, "bias_rows": 200}, 0)
    whole, first, second, pooled = _figures(setting, 0, picked)
    alone_first, _, _, _ = _figures(setting, 0, picked[:1])
    alone_second, _, _, _ = _figures(setting, 0, picked[1:])
    timing = {"rows_per_second"}  # the run's speed, not a figure of its files
    assert {k: v for k, v in first.items() if k not in timing} == {
        k: v for k, v in alone_first.items() if k not in timing
    }
    assert {k: v for k, v in second.items() if k not in timing} == {
        k: v for k, v in alone_second.items() if k not in timing
    }
    assert whole["false_positives"] == first["false_positives"] + second["false_positives"]
    assert whole["files"] == 2 and first["files"] == second["files"] == 1
    assert math.isnan(pooled["normal_far_percent"]) and pooled["false_positives"] == whole["false_positives"]


@pytest.mark.skipif(not (DATA / "valve1").is_dir(), reason=f"SKAB data not at {DATA}")
def test_the_rule_reads_the_valve_files_and_the_normal_runs_pooled():
    from bench.skab import experiment_rows, load_folder, normal_pieces

    files, normal = load_folder(DATA)
    picked = [f for f in files if f.relative in ("valve1/0.csv", "valve1/1.csv")]
    pieces = normal_pieces(normal, experiment_rows(files))[6:8]  # the wandering end of the run
    setting = ({"smoothing_rows": 20, "false_alarm_rate": 0.005, "recent_rows": 0, "bias_rows": 200}, 0)
    valve, first, second, pooled = _figures(setting, 0, picked, pieces)
    assert (valve["files"], first["files"], second["files"], pooled["files"]) == (2, 1, 1, 4)
    # The pooled FAR is over every normal test row: the valve files' and the pieces'.
    valve_normal = sum(int((f.anomaly[400:] == 0).sum()) for f in picked)
    piece_rows = sum(len(p.frame) - 400 for p in pieces)
    alone = _figures(setting, 0, pieces)[0]  # the pieces run as the only files
    assert pooled["normal_far_percent"] == alone["far_percent"] > 0
    false_alarms = valve["far_percent"] / 100 * valve_normal + alone["far_percent"] / 100 * piece_rows
    assert pooled["far_percent"] == pytest.approx(100 * false_alarms / (valve_normal + piece_rows), abs=0.02)
    assert pooled["false_positives"] == valve["false_positives"] + alone["false_positives"]
