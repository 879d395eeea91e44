"""The selection rules of bench/skab_pipeline_tune.py and bench/plant_alarm_tune.py."""

from __future__ import annotations

import math

from bench import plant_alarm_tune, skab_pipeline_tune
from bench.skab_pipeline import Counts, PipelineFigures


def _skab(tp: int, fp: int, fn: int, tn: int, caught: int, free: Counts | None = None) -> PipelineFigures:
    test_rows = {skab_pipeline_tune.TEST_ROWS: Counts(tp=tp, fp=fp, fn=fn, tn=tn)}
    return PipelineFigures(
        seconds=0.0,
        summary="",
        groups=test_rows,
        nab={},
        anomaly_free=free or Counts(),
        anomalies_caught=caught,
        anomalies=8,
        alarm_episodes=0,
        score_auc={},
    )


def test_skab_pipeline_rule_takes_the_best_f1_within_the_far_limit_and_caught_anomalies_break_ties():
    results = [
        ({"name": "noisy"}, _skab(tp=90, fp=50, fn=10, tn=50, caught=8)),  # F1 0.72, FAR 50 %
        ({"name": "fewer caught"}, _skab(tp=50, fp=10, fn=50, tn=90, caught=5)),  # F1 0.625, FAR 10 %
        ({"name": "more caught"}, _skab(tp=50, fp=10, fn=50, tn=90, caught=7)),
        ({"name": "quiet"}, _skab(tp=10, fp=0, fn=90, tn=100, caught=2)),
    ]
    def choose(rows, far_limit):
        return skab_pipeline_tune.choose(rows, far_limit, rate_multiple=math.inf, alpha=0.01)

    assert choose(results, far_limit=12.0)[0]["name"] == "more caught"
    assert choose(results, far_limit=5.0)[0]["name"] == "quiet"
    assert choose(results, far_limit=60.0)[0]["name"] == "noisy"
    assert choose(results[:1], far_limit=12.0) is None


def test_skab_pipeline_rule_counts_the_anomaly_free_files_false_alarms_with_the_test_rows():
    quiet_on_valve1 = _skab(tp=90, fp=5, fn=10, tn=95, caught=8, free=Counts(fp=300, tn=700))  # 305 / 1100
    quiet_everywhere = _skab(tp=60, fp=5, fn=40, tn=95, caught=6, free=Counts(fp=20, tn=980))  # 25 / 1100
    assert skab_pipeline_tune.normal_far_percent(quiet_on_valve1) == round(100 * 305 / 1100, 2)
    results = [({"name": "loud on anomaly-free"}, quiet_on_valve1), ({"name": "quiet"}, quiet_everywhere)]
    assert skab_pipeline_tune.choose(results, 12.0, rate_multiple=math.inf, alpha=0.01)[0]["name"] == "quiet"


def test_skab_pipeline_rule_holds_each_group_to_its_settings_alpha_not_their_sum():
    # anomaly-free.csv at 3 α (30 of 1,000 at α = 1 %): the pooled FAR (31 / 1,100 = 2.8 %) hides it.
    loud_free = _skab(tp=90, fp=1, fn=10, tn=99, caught=8, free=Counts(fp=30, tn=970))
    within = _skab(tp=60, fp=1, fn=40, tn=99, caught=6, free=Counts(fp=15, tn=985))  # 1 α on valve1, 1.5 α free
    results = [({"false_alarm_rate": 0.01}, loud_free), ({"false_alarm_rate": 0.01}, within)]
    assert skab_pipeline_tune.rate_multiples(*results[0], alpha=0.5) == (1 / 100 / 0.01, 30 / 1000 / 0.01)
    assert skab_pipeline_tune.choose(results, 12.0, rate_multiple=2.0, alpha=0.5)[1] is within
    assert skab_pipeline_tune.choose(results, 12.0, rate_multiple=3.5, alpha=0.5)[1] is loud_free
    # Without the setting's own rate, the config's α (the second argument) is the measure.
    assert skab_pipeline_tune.rate_multiples({}, within, alpha=0.02) == (0.5, 15 / 1000 / 0.02)
    assert skab_pipeline_tune.choose(results[1:], 12.0, rate_multiple=1.0, alpha=0.5) is None


def test_plant_rule_takes_the_best_f1_within_the_false_alarm_limit_and_caught_anomalies_break_ties():
    def scores(f1: float, false_alarms: float, caught: int) -> dict:
        return {"f1": f1, "false_alarms_per_1000_normal_rows": false_alarms, "anomalies_caught": caught}

    results = [
        ({"name": "noisy"}, scores(0.40, 45.0, 90)),
        ({"name": "fewer caught"}, scores(0.30, 5.0, 60)),
        ({"name": "more caught"}, scores(0.30, 9.0, 70)),
        ({"name": "quiet"}, scores(0.10, 1.0, 20)),
    ]
    assert plant_alarm_tune.choose(results, max_false_alarms=10.0)[0]["name"] == "more caught"
    assert plant_alarm_tune.choose(results, max_false_alarms=6.0)[0]["name"] == "fewer caught"
    assert plant_alarm_tune.choose(results, max_false_alarms=0.5) is None
