"""The anomaly detector of lru_online.alarms: its mean chart against hand-computed values, the
conformal threshold against its definition and its false-alarm guarantee on fresh normal rows,
a fleet batch against each line run alone, and a line's stored state."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from lru_online import codec
from lru_online.alarms import COMMON_MODE_ROWS, AlarmConfig, AlarmResult, AlarmState, AnomalyDetector, gamma_quantile


def _unit_scaled(lines: int, sensors: int, config: AlarmConfig) -> AlarmState:
    state = AlarmState.fresh(lines, sensors, config)
    state.square_mean.fill_(1.0)
    state.scale_rows.fill_(10**6)  # a settled scale that a few rows barely move
    return state


def _calibrated(detector: AnomalyDetector, rows: np.ndarray | torch.Tensor) -> AlarmState:
    """The state after `rows` (B, T, S) were taken as normal."""
    rows = torch.as_tensor(rows)
    fresh = AlarmState.fresh(rows.shape[0], rows.shape[2], detector.config)
    return detector.detect(rows, fresh, calibrate_only=True).state


def _judged_in_chunks(
    detector: AnomalyDetector, state: AlarmState, rows: np.ndarray, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """One line's rows (1, T, S) judged `chunk` rows at a time, as its files are: the alarm of
    every row and the line's bias after each chunk."""
    alarms, biases = [], []
    for lo in range(0, rows.shape[1], chunk):
        judged = detector.detect(torch.tensor(rows[:, lo : lo + chunk]), state)
        alarms.append(judged.alarms[0].numpy())
        biases.append(judged.state.bias[0].numpy().copy())
        state = judged.state
    return np.concatenate(alarms), np.stack(biases)


def test_mean_chart_by_hand():
    config = AlarmConfig(smoothing_rows=3, calibration_rows=10, warmup_rows=5, false_alarm_rate=0.5)
    state = _unit_scaled(1, 2, config)
    state.history[0] = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    state.history_rows[0] = 2
    residuals = torch.tensor([[[1.0, -2.0], [-3.0, 0.0]]])
    scores = AnomalyDetector(config).detect(residuals, state, calibrate_only=True).scores[0]
    # Row 1: the last three rows are [1,1,1] and [0,2,-2]: means 1 and 0 → (3·1 + 3·0) / 2.
    # Row 2: [1,1,-3] and [2,-2,0]: means -1/3 and 0 → (3·1/9 + 0) / 2.
    assert scores.tolist() == pytest.approx([1.5, 1.0 / 6.0])
    # Without history the window holds only the rows so far: n = 1, then 2.
    alone = AnomalyDetector(config).detect(residuals, _unit_scaled(1, 2, config), calibrate_only=True).scores[0]
    assert alone.tolist() == pytest.approx([(1 + 4) / 2, (2 * 1.0 + 2 * 1.0) / 2])


def test_threshold_is_the_conformal_rank_of_the_held_scores():
    config = AlarmConfig(false_alarm_rate=0.1, calibration_rows=50, warmup_rows=20)
    state = AlarmState.fresh(3, 1, config)
    rng = np.random.default_rng(0)
    held = rng.exponential(size=(3, 30))
    state.calibration[:, :30] = torch.tensor(held)
    state.calibration[2, 15:] = math.nan  # 15 held: below warm-up
    thresholds = AnomalyDetector(config).thresholds(state)
    rank = math.ceil(31 * 0.9)  # ⌈(n+1)(1−α)⌉ = 28th smallest of 30
    assert thresholds[:2].tolist() == pytest.approx(np.sort(held[:2], axis=1)[:, rank - 1].tolist())
    assert thresholds[2] == math.inf


def test_without_a_short_chart_its_thresholds_veto_nothing():
    config = AlarmConfig(recent_rows=0)
    thresholds = AnomalyDetector(config).recent_thresholds(AlarmState.fresh(2, 3, config))
    assert thresholds.tolist() == [-math.inf, -math.inf]


def test_false_alarm_rate_on_fresh_normal_rows_stays_near_the_target():
    """Independent normal residuals, scored in chunks of 20 rows: the share of rows that alarm
    stays at or below α (plus sampling slack), and a 3σ shift in one sensor alarms at once."""
    config = AlarmConfig(false_alarm_rate=0.02, smoothing_rows=1, calibration_rows=1000, warmup_rows=200)
    detector = AnomalyDetector(config)
    rng = np.random.default_rng(1)
    state = _calibrated(detector, rng.normal(size=(1, 400, 4)))
    alarms = []
    for _ in range(1000):
        judged = detector.detect(torch.tensor(rng.normal(size=(1, 20, 4))), state)
        alarms.append(judged.alarms[0].numpy())
        state = judged.state
    rate = np.concatenate(alarms).mean()
    assert 0.01 < rate < 0.025
    shifted = rng.normal(size=(1, 20, 4))
    shifted[..., 0] += 6.0
    assert detector.detect(torch.tensor(shifted), state).alarms.float().mean() > 0.9


def test_a_sustained_small_shift_is_caught_by_the_mean_chart_only():
    """A one-σ shift in one sensor of four is lost in a squared residual but adds up in the mean."""
    config = AlarmConfig(false_alarm_rate=0.01, smoothing_rows=30, calibration_rows=2000, warmup_rows=1000)
    detector = AnomalyDetector(config)
    rng = np.random.default_rng(2)
    calibrated = _calibrated(detector, rng.normal(size=(1, 3000, 4)))
    shifted = rng.normal(size=(1, 600, 4))
    shifted[..., 0] += 1.0
    caught = detector.detect(torch.tensor(shifted), calibrated).alarms[0, 30:].float().mean()
    squared = (rng.normal(size=(3000, 4)) ** 2).mean(axis=1)
    caught_squared = ((shifted[0] ** 2).mean(axis=1) > np.quantile(squared, 0.99)).mean()
    assert caught > 0.8 and caught_squared < 0.1


def test_warm_up_holds_alarms_back():
    config = AlarmConfig(false_alarm_rate=0.05, smoothing_rows=1, calibration_rows=100, warmup_rows=50)
    detector = AnomalyDetector(config)
    state = AlarmState.fresh(1, 2, config)
    huge = torch.full((1, 40, 2), 100.0)
    judged = detector.detect(torch.randn(1, 40, 2, dtype=torch.float64), state)
    assert not judged.alarms.any() and judged.thresholds[0] == math.inf
    judged = detector.detect(huge, judged.state)  # 40 held: still warming up
    assert not judged.alarms.any()


@pytest.mark.parametrize(
    ("bias_rows", "gap", "step", "tail_rows"), [(0, 0, 0.0, 0), (50, 0, 0.0, 0), (0, 3, 2.0, 0), (50, 3, 1.0, 20)]
)
def test_a_fleet_batch_equals_each_line_alone(bias_rows, gap, step, tail_rows):
    """Three ragged lines, right-padded with a step mask, over three chunks: scores, thresholds,
    alarms and episodes equal those of each line run on its own (an independent loop)."""
    config = AlarmConfig(
        false_alarm_rate=0.05,
        smoothing_rows=5,
        calibration_rows=60,
        warmup_rows=20,
        recent_rows=2,
        bias_rows=bias_rows,
        episode_gap_rows=gap,
        rate_control_step=step,
        tail_rows=tail_rows,
    )
    detector = AnomalyDetector(config)
    rng = np.random.default_rng(3)
    lengths = [[30, 12, 25], [7, 30, 0], [18, 4, 30]]  # per chunk, per line
    chunks = []
    for number, row in enumerate(lengths):
        values = rng.normal(size=(3, max(row), 2))
        if number:
            values[2, 5:9] += 8.0  # an alarm on line 2 once it is warm
        values[0, :, 1] = np.nan if row[0] == 7 else values[0, :, 1]  # a sensor without readings
        chunks.append((values, row))
    fleet = AlarmState.fresh(3, 2, config)
    alone = [AlarmState.fresh(1, 2, config) for _ in range(3)]
    alarmed_lines = set()
    for number, (values, row) in enumerate(chunks):
        steps = torch.tensor([[t < n for t in range(values.shape[1])] for n in row])
        padded = torch.tensor(values).masked_fill(~steps[..., None], 0.0)
        judged = detector.detect(padded, fleet, steps, calibrate_only=number == 0)
        fleet = judged.state
        alarmed_lines |= {e.line for e in judged.episodes}
        for line, n in enumerate(row):
            one = detector.detect(torch.tensor(values[line : line + 1, :n]), alone[line], calibrate_only=number == 0)
            alone[line] = one.state
            assert judged.scores[line, :n].tolist() == pytest.approx(one.scores[0].tolist(), nan_ok=True)
            assert judged.recent_scores[line, :n].tolist() == pytest.approx(one.recent_scores[0].tolist())
            assert judged.alarms[line, :n].tolist() == one.alarms[0].tolist()
            assert float(judged.thresholds[line]) == pytest.approx(float(one.thresholds[0]))
            assert [(e.start, e.end, e.continues, e.rows) for e in judged.episodes if e.line == line] == [
                (e.start, e.end, e.continues, e.rows) for e in one.episodes
            ]
            assert float(judged.recent_thresholds[line]) == pytest.approx(float(one.recent_thresholds[0]))
            assert judged.row_thresholds[line, :n].tolist() == pytest.approx(one.row_thresholds[0].tolist())
    assert 2 in alarmed_lines
    for line in range(3):
        for name in ("calibration", "recent_calibration", "bias", "quiet_rows", "excess", "tail_level"):
            held, expected = getattr(fleet, name)[line], getattr(alone[line], name)[0]
            assert held.tolist() == pytest.approx(expected.tolist(), nan_ok=True)


@pytest.mark.parametrize("consistency_rows", [0, 10])
def test_stored_state_judges_the_next_rows_as_the_live_one(consistency_rows):
    config = AlarmConfig(
        false_alarm_rate=0.05,
        smoothing_rows=4,
        calibration_rows=80,
        warmup_rows=20,
        bias_rows=30,
        consistency_rows=consistency_rows,
    )
    detector = AnomalyDetector(config)
    rng = np.random.default_rng(4)
    rows = torch.tensor(rng.normal(size=(2, 50, 3)))
    fresh = AlarmState.fresh(2, 3, config)
    state = detector.detect(rows, fresh, calibrate_only=True, readings=rows.cumsum(1)).state
    restored = AlarmState.cat([AlarmState.from_bytes(state.select(i).to_bytes(), config) for i in range(2)])
    after = torch.tensor(rng.normal(size=(2, 10, 3)))
    after[0, 3:] += 5.0
    readings = rows.cumsum(1)[:, -1:] + after.cumsum(1)
    assert torch.equal(restored.bias, state.bias) and state.bias.abs().sum() > 0
    if consistency_rows:  # stored as float32
        assert torch.allclose(restored.consistency.gram, state.consistency.gram, rtol=1e-6)
    live = detector.detect(after, state, readings=readings)
    again = detector.detect(after, restored, readings=readings)
    assert torch.allclose(live.thresholds, again.thresholds, rtol=1e-6)  # stored as float32
    assert torch.equal(live.alarms, again.alarms) and live.alarms[0].any()


def test_a_warm_up_in_small_files_is_held_as_it_is_and_only_then_capped():
    """A line whose first 100 rows come as ten 10-row files holds all of their scores: the cap
    (the largest held) comes from the whole warm-up, not the first file. After it, a huge
    score is held at the cap."""
    config = AlarmConfig(false_alarm_rate=0.05, smoothing_rows=1, calibration_rows=200, warmup_rows=100)
    detector = AnomalyDetector(config)
    rng = np.random.default_rng(9)
    state, scores = AlarmState.fresh(1, 2, config), []
    for _ in range(10):
        judged = detector.detect(torch.tensor(rng.normal(size=(1, 10, 2))), state)
        state = judged.state
        scores.append(judged.scores[0])
    scores = torch.cat(scores)
    held = state.calibration[0][torch.isfinite(state.calibration[0])]
    assert scores[10:].max() > scores[:10].max()  # a cap from the first file would have bitten
    assert torch.sort(held).values.tolist() == pytest.approx(torch.sort(scores).values.tolist())
    huge = torch.tensor([[[30.0, 30.0]]], dtype=torch.float64)
    after = detector.detect(huge, state).state.calibration[0]
    assert float(after[torch.isfinite(after)].max()) == pytest.approx(float(scores.max()))


def _busy_after_a_quiet_file(keep_peak: bool, seed: int = 3) -> list[float]:
    """A line whose first file (80 rows) starts with five large residuals and then reads almost
    nothing (as a series that reads zero until it starts), then a busy file of 40 rows, a quiet
    one of 45 that pushes the first file's large scores out of the 80-score buffer, and four
    busy ones. Returns the share of rows alarmed in each busy file after the quiet one;
    `keep_peak` False wipes the held peak before each file, as if the cap were the buffer's
    own largest."""
    config = AlarmConfig(false_alarm_rate=0.05, smoothing_rows=1, calibration_rows=80, warmup_rows=10)
    detector = AnomalyDetector(config)
    rng = np.random.default_rng(seed)
    first = np.concatenate([rng.normal(size=5), 0.05 * rng.normal(size=75)])
    busy = [0.3 * rng.normal(size=40) for _ in range(5)]
    files = [first, busy[0], 0.05 * rng.normal(size=45), *busy[1:]]
    state, shares = AlarmState.fresh(1, 1, config), []
    for number, rows in enumerate(files):
        if not keep_peak:
            state.held_peak = torch.full_like(state.held_peak, math.nan)
        judged = detector.detect(torch.tensor(rows, dtype=torch.float64)[None, :, None], state)
        state = judged.state
        if number >= 3:
            shares.append(float(judged.alarms.double().mean()))
    return shares


def test_a_quiet_file_does_not_lock_a_line_s_threshold_low():
    """The cap on held scores is the largest score the line ever held, not the buffer's own
    largest: after a quiet file evicted the busy scores, the first busy file alarms (its
    threshold came from quiet rows), but its scores are held as they are and the next busy
    files alarm at about α. Capped at the buffer's largest, every later busy file alarms on
    nearly every row (the lock seen on a nab-aws series whose first days read zero)."""
    kept = _busy_after_a_quiet_file(keep_peak=True)
    assert kept[0] > 0.5
    assert np.mean(kept[1:]) <= 0.15
    assert min(_busy_after_a_quiet_file(keep_peak=False)[1:]) > 0.5


def test_the_cap_on_held_scores_stays_the_largest_of_the_warm_up():
    """What the module docstring says of the cap: once a line is warm every score is held
    capped at it, so wider rows later (alarmed or not) never raise it; only the tail level
    lifts the threshold past it."""
    config = AlarmConfig(false_alarm_rate=0.05, smoothing_rows=1, calibration_rows=200, warmup_rows=100)
    detector = AnomalyDetector(config)
    generator = torch.Generator().manual_seed(3)
    first = detector.detect(
        torch.randn(1, 150, 1, generator=generator, dtype=torch.float64), AlarmState.fresh(1, 1, config)
    )
    warm_peak = float(first.scores.max())
    assert float(first.state.held_peak[0]) == pytest.approx(warm_peak)
    state = first.state
    for _ in range(5):
        state = detector.detect(3.0 * torch.randn(1, 60, 1, generator=generator, dtype=torch.float64), state).state
    assert float(state.held_peak[0]) == pytest.approx(warm_peak)
    assert float(torch.nan_to_num(state.calibration, nan=-1.0).max()) <= warm_peak


def test_an_alarm_running_on_into_the_next_chunk_is_one_episode_continued():
    config = AlarmConfig(false_alarm_rate=0.05, smoothing_rows=1, calibration_rows=100, warmup_rows=50)
    detector = AnomalyDetector(config)
    state = _calibrated(detector, torch.randn(1, 100, 1, dtype=torch.float64))
    first = detector.detect(torch.tensor([[[0.0], [0.0], [9.0], [9.5]]]), state)
    second = detector.detect(torch.tensor([[[9.0], [0.0], [7.0]]]), first.state)
    assert [(e.start, e.end, e.continues) for e in first.episodes] == [(2, 3, False)]
    assert [(e.start, e.end, e.continues) for e in second.episodes] == [(0, 0, True), (2, 2, False)]
    assert first.episodes[0].peak_score == pytest.approx(9.5**2 / float(state.square_mean[0, 0]))
    assert bool(second.state.in_alarm[0])


def _fault_after_calibration(rng: np.random.Generator, detector: AnomalyDetector, shift: float):
    """3,000 calibration rows, then 400 normal rows, 100 with one sensor shifted, 300 normal."""
    state = _calibrated(detector, rng.normal(size=(1, 3000, 4)))
    rows = rng.normal(size=(1, 800, 4))
    rows[0, 400:500, 0] += shift
    return _judged_in_chunks(detector, state, rows, 20)[0]


def test_the_short_chart_ends_an_alarm_within_a_few_rows_of_the_fault():
    """The same rows judged by the long chart alone and with the short chart: a fault alarms in
    both, but after it ends the long chart alone runs on for most of its window, the pair stops
    within about the short window, and normal rows alarm no more often."""
    long_only = AlarmConfig(false_alarm_rate=0.01, smoothing_rows=40, calibration_rows=2000, warmup_rows=1000)
    paired = replace(long_only, recent_rows=5, recent_false_alarm_rate=0.1)
    runs = {
        name: _fault_after_calibration(np.random.default_rng(6), AnomalyDetector(config), shift=3.0)
        for name, config in (("long", long_only), ("paired", paired))
    }
    for alarms in runs.values():
        assert alarms[410:500].mean() > 0.9
    assert runs["long"][500:525].all()  # its 40-row window still holds fault rows
    assert not runs["paired"][500:506].all()  # the fault's alarm ended within 5 rows
    assert runs["paired"][500:].sum() <= runs["long"][500:].sum() / 3
    normal = np.r_[0:400, 540:800]
    assert runs["paired"][normal].sum() <= runs["long"][normal].sum()


def test_a_state_stored_before_the_short_chart_warms_it_up_without_vetoing():
    config = AlarmConfig(false_alarm_rate=0.05, smoothing_rows=4, calibration_rows=80, warmup_rows=20, recent_rows=2)
    detector = AnomalyDetector(config)
    state = _calibrated(detector, torch.randn(1, 60, 2, dtype=torch.float64))
    tensors = {k: v for k, v in state._tensors().items() if k != "recent_calibration"}
    tensors["calibration"] = state.calibration[torch.isfinite(state.calibration)].float()
    tensors.pop("bias")  # stored before the bias existed too
    restored = AlarmState.from_bytes(codec.encode(tensors, {"kind": "AlarmState"}), config)
    assert restored.recent_calibration.isnan().all() and not restored.bias.any()
    assert detector.recent_thresholds(restored)[0] == -math.inf
    judged = detector.detect(torch.full((1, 3, 2), 50.0, dtype=torch.float64), restored)
    assert judged.alarms.all()  # the long chart alone decides until the short one is warm


def test_recent_rows_must_be_shorter_than_the_window():
    with pytest.raises(ValueError, match="recent_rows"):
        AlarmConfig(smoothing_rows=10, recent_rows=10)
    with pytest.raises(ValueError, match="recent_false_alarm_rate"):
        AlarmConfig(smoothing_rows=10, recent_rows=3, recent_false_alarm_rate=0.001, calibration_rows=100)


def test_the_bias_takes_a_new_steady_level_off_but_not_a_fault():
    """After calibration, a sensor settles 0.6σ higher for good, between two 60-row faults of
    +4σ. A 40-row mean chart alone alarms on most of the new level's normal rows; with the
    running mean residual taken off (span 100), the level is learned within a few hundred rows
    and stops alarming, while both faults still alarm and leave the bias where it was."""
    base = AlarmConfig(false_alarm_rate=0.01, smoothing_rows=40, calibration_rows=2000, warmup_rows=1000)
    rng = np.random.default_rng(8)
    calibration, rows = rng.normal(size=(1, 3000, 3)), rng.normal(size=(1, 1600, 3))
    rows[0, 100:, 1] += 0.6
    faults = [(300, 360), (1400, 1460)]
    for lo, hi in faults:
        rows[0, lo:hi, 2] += 4.0
    runs = {}
    for name, config in (("plain", base), ("bias", replace(base, bias_rows=100))):
        detector = AnomalyDetector(config)
        runs[name] = _judged_in_chunks(detector, _calibrated(detector, calibration), rows, 20)
    for alarms, _ in runs.values():
        for lo, hi in faults:
            assert alarms[lo + 20 : hi].mean() > 0.9
    settled = np.r_[900:1400, 1520:1600]  # normal rows on the new level, well after it began
    assert runs["plain"][0][settled].mean() > 0.5
    assert runs["bias"][0][settled].mean() < 0.05
    bias = runs["bias"][1]
    assert abs(bias[-1, 1] - 0.6) < 0.15  # the new level, learned
    assert abs(bias[1460 // 20, 2] - bias[1400 // 20 - 1, 2]) < 0.1  # the second fault left it alone
    assert not runs["plain"][1].any()  # no bias without bias_rows


def test_a_bias_learned_while_the_forecaster_was_off_shrinks_back_instead_of_locking_the_line_in_alarm():
    """A line whose bias was learned while its forecaster was off by +3 on one sensor, and the
    forecaster is right from now on: every chunk alarms at first, as the stale bias is an offset
    of its own. The alarmed chunks shrink it toward 0, so within a few bias spans the line is
    quiet again; a fault afterwards still alarms, and its offset (away from 0) is not learned."""
    config = AlarmConfig(false_alarm_rate=0.01, smoothing_rows=5, calibration_rows=500, warmup_rows=400, bias_rows=50)
    detector = AnomalyDetector(config)
    rng = np.random.default_rng(3)
    state = _calibrated(detector, rng.normal(size=(1, 400, 3)))
    state.bias[0, 0] = 3.0
    rows = rng.normal(size=(1, 1500, 3))
    rows[0, 1200:1260, 1] += 4.0
    alarms, biases = _judged_in_chunks(detector, state, rows, 10)
    assert alarms[:50].mean() > 0.7  # the stale bias at first
    assert alarms[600:1200].mean() < 0.03 and abs(biases[1190 // 10, 0]) < 0.3
    assert alarms[1205:1260].mean() > 0.9  # a fault still alarms
    assert abs(biases[1260 // 10, 1] - biases[1190 // 10, 1]) < 0.1  # and teaches the bias nothing


def test_the_gamma_threshold_is_the_quantile_of_the_law_fitted_to_the_held_scores():
    from scipy import stats

    config = AlarmConfig(false_alarm_rate=0.02, calibration_rows=60, warmup_rows=20, threshold_fit="gamma")
    state = AlarmState.fresh(4, 1, config)
    rng = np.random.default_rng(4)
    held = rng.gamma(shape=[[0.6], [2.0], [5.0], [1.0]], scale=1.5, size=(4, 50))
    state.calibration[:, :50] = torch.tensor(held)
    state.calibration[3, 10:] = math.nan  # 10 held: below warm-up
    thresholds = AnomalyDetector(config).thresholds(state)
    for line in range(3):
        mean, variance = held[line].mean(), held[line].var(ddof=1)
        expected = stats.gamma.ppf(0.98, mean**2 / variance, scale=variance / mean)
        assert float(thresholds[line]) == pytest.approx(expected, rel=1e-9)
    assert thresholds[3] == math.inf
    # Scores that do not vary give no law to fit: their value is the threshold.
    assert gamma_quantile(torch.full((1, 30), 2.5, dtype=torch.float64), 0.99).tolist() == [2.5]
    with pytest.raises(ValueError, match="threshold_fit"):
        AlarmConfig(threshold_fit="normal")


def test_on_a_long_chart_the_gamma_fit_alarms_on_normal_rows_less_often_than_the_order_statistic():
    """200 held rows of a 40-row mean chart are few independent values: the order statistic at
    1−α sits low in the tail and fresh normal rows alarm well above α; the fitted law uses all
    of them. Independent normal residuals, 200 lines each calibrated on its own 200 rows, then
    judged on 400 more in chunks of 10 (as the SKAB bench does)."""
    rng = np.random.default_rng(3)
    held_rows, fresh_rows = torch.tensor(rng.normal(size=(200, 200, 4))), torch.tensor(rng.normal(size=(200, 400, 4)))
    rates = {}
    for fit in ("conformal", "gamma"):
        config = AlarmConfig(false_alarm_rate=0.01, smoothing_rows=40, warmup_rows=100, threshold_fit=fit)
        detector = AnomalyDetector(config)
        state = detector.detect(held_rows, _unit_scaled(200, 4, config), calibrate_only=True).state
        alarms = []
        for start in range(0, 400, 10):
            judged = detector.detect(fresh_rows[:, start : start + 10], state)
            alarms.append(judged.alarms)
            state = judged.state
        rates[fit] = float(torch.cat(alarms, 1).double().mean())
    assert rates["conformal"] > 0.02  # the dependence at work: twice α and more
    assert rates["gamma"] < 0.7 * rates["conformal"]


def _wandering_stream(rng: np.random.Generator, lines: int, rows: int) -> np.ndarray:
    """Residuals of a forecaster on a stream that does not stand still: heavy-tailed noise (t, 3
    dof) whose scale steps up eightfold for good at row 1,500, a slow bias that wanders and a
    burst that repeats every 288 rows (a daily pattern at 5-minute readings)."""
    t = np.arange(rows)
    scale = np.where(t >= 1500, 8.0, 1.0)[None, :] * rng.uniform(0.5, 2.0, (lines, 1))
    wander = np.cumsum(rng.normal(0, 0.03, (lines, rows)), axis=1)
    burst = np.where(t % 288 < 3, 4.0, 0.0)[None, :]
    return (scale * rng.standard_t(3, (lines, rows)) + wander + burst)[..., None]


def test_rate_control_holds_the_rate_of_episodes_on_a_stream_that_wanders():
    """Calibrated on its first 500 rows, a wandering stream alarms on more than 3α of its rows
    with the plain threshold. With rate control a line opens at most α·T + x_T/η episodes, x_T
    stays below the log of its largest score over its threshold plus η (the module's argument),
    and the alarmed rows come within 2α."""
    rng = np.random.default_rng(11)
    lines, rows, alpha = 20, 6000, 0.005
    stream = torch.tensor(_wandering_stream(rng, lines, rows))
    outcome = {}
    for step in (0.0, 2.0):
        config = AlarmConfig(
            false_alarm_rate=alpha,
            smoothing_rows=1,
            calibration_rows=512,
            warmup_rows=200,
            episode_gap_rows=24,
            rate_control_step=step,
        )
        detector = AnomalyDetector(config)
        state = detector.detect(stream[:, :500], AlarmState.fresh(lines, 1, config), calibrate_only=True).state
        onsets, alarmed, ratio = np.zeros(lines), np.zeros(lines), np.zeros(lines)
        for lo in range(500, rows, 100):
            judged = detector.detect(stream[:, lo : lo + 100], state)
            state = judged.state
            for episode in judged.episodes:
                onsets[episode.line] += not episode.continues
            alarmed += judged.alarms.sum(1).numpy()
            ratio = np.maximum(ratio, (judged.scores.max(1).values / judged.thresholds).numpy())
        outcome[step] = (onsets, alarmed, state.excess.numpy(), ratio)
    judged_rows = rows - 500
    plain_onsets, plain_alarmed, _, _ = outcome[0.0]
    onsets, alarmed, excess, ratio = outcome[2.0]
    assert plain_alarmed.sum() / (lines * judged_rows) > 3 * alpha  # the plain threshold's promise fails
    assert np.all(onsets <= alpha * judged_rows + excess / 2.0 + 1e-9)
    assert np.all(excess <= np.log(ratio) + 2.0)
    assert alarmed.sum() / (lines * judged_rows) <= 2 * alpha
    assert onsets.sum() < plain_onsets.sum() / 1.5


def test_a_fault_alarms_for_as_long_as_it_lasts_however_raised_the_threshold():
    """With the threshold for opening an episode raised e^x-fold, a fault has to pass it on its
    first row only: its later rows are held against the plain threshold. A new episode at the
    same height after a quiet spell is refused."""
    config = AlarmConfig(
        false_alarm_rate=0.01,
        smoothing_rows=1,
        calibration_rows=400,
        warmup_rows=200,
        episode_gap_rows=5,
        rate_control_step=1.0,
    )
    detector = AnomalyDetector(config)
    rng = np.random.default_rng(12)
    state = _calibrated(detector, rng.normal(size=(1, 400, 1)))
    threshold = float(detector.thresholds(state)[0])
    state.excess.fill_(math.log(4.0))  # opening an episode takes 4x the threshold
    height = math.sqrt(2.0 * threshold)  # a squared residual of 2x the threshold
    fault = torch.zeros(1, 40, 1, dtype=torch.float64)
    fault[0, 0] = math.sqrt(5.0 * threshold)  # the first row passes 4x
    fault[0, 1:20] = height
    fault[0, 30:] = height  # 10 quiet rows, then the same height again
    judged = detector.detect(fault, state)
    assert judged.alarms[0, :20].all() and not judged.alarms[0, 20:].any()
    assert [(e.start, e.end, e.continues, e.rows) for e in judged.episodes] == [(0, 19, False, 20)]
    assert judged.row_thresholds[0, 1] == pytest.approx(threshold)
    assert judged.row_thresholds[0, 30] == pytest.approx(threshold * 4.0 * math.exp(1.0 - 0.01 * 30), rel=1e-6)


def test_alarms_closer_than_the_gap_are_one_episode_across_chunks():
    config = AlarmConfig(
        false_alarm_rate=0.05, smoothing_rows=1, calibration_rows=100, warmup_rows=50, episode_gap_rows=4
    )
    detector = AnomalyDetector(config)
    state = _calibrated(detector, torch.randn(1, 100, 1, dtype=torch.float64))
    first = detector.detect(torch.tensor([[[0.0], [9.0], [0.0], [0.0], [9.0], [0.0]]]), state)
    # 3 quiet rows (the last of the first chunk, two here): still the same episode; then 4 and a new one.
    second = detector.detect(torch.tensor([[[0.0], [0.0], [9.0], [0.0], [0.0], [0.0], [0.0], [9.0]]]), first.state)
    assert [(e.start, e.end, e.continues, e.rows) for e in first.episodes] == [(1, 4, False, 2)]
    assert [(e.start, e.end, e.continues, e.rows) for e in second.episodes] == [(2, 2, True, 1), (7, 7, False, 1)]
    assert second.state.in_alarm.tolist() == [True] and int(second.state.quiet_rows[0]) == 0


def test_a_state_stored_before_episodes_and_rate_control_continues_its_alarm():
    config = AlarmConfig(smoothing_rows=1, calibration_rows=100, warmup_rows=50, rate_control_step=2.0)
    state = AlarmState.fresh(1, 2, config)
    old = {k: v for k, v in state._tensors().items() if k not in ("quiet_rows", "excess")}
    old["in_alarm"] = torch.tensor([True])
    old["calibration"] = old["calibration"][torch.isfinite(old["calibration"])].float()
    old["recent_calibration"] = torch.empty(0)
    restored = AlarmState.from_bytes(codec.encode(old, {"kind": "AlarmState"}), config)
    assert restored.in_alarm.tolist() == [True] and restored.excess.tolist() == [0.0]


def _every_part(consistency_rows: int, recurring_events: int = 0) -> AlarmConfig:
    """A small detector with every part of its state in use: both charts, bias, both rate
    controls, tail level, and the consistency columns and recurring-events bar as asked."""
    return AlarmConfig(
        false_alarm_rate=0.05,
        calibration_rows=80,
        warmup_rows=20,
        recent_rows=2,
        smoothing_rows=4,
        bias_rows=30,
        rate_control_step=1.0,
        episode_gap_rows=3,
        continuation_step=0.3,
        continuation_rate=0.1,
        consistency_rows=consistency_rows,
        recurring_events=recurring_events,
        tail_rows=40,
    )


@pytest.mark.parametrize(("consistency_rows", "recurring_events"), [(0, 0), (10, 0), (10, 8)])
def test_many_stored_states_read_at_once_equal_each_read_alone(consistency_rows, recurring_events):
    """A fleet's stored states, one missing and one stored in the older one-tensor-a-field
    format, read as one batch: the same tensors as reading each alone (a fresh one for None)."""
    config = _every_part(consistency_rows, recurring_events)
    detector = AnomalyDetector(config)
    rng = np.random.default_rng(6)
    rows = torch.tensor(rng.normal(size=(4, 60, 3)))
    rows[:, 30:] *= 2.0  # wider than the calibration: every line alarms in the second half
    hourly = torch.arange(60, dtype=torch.float64).expand(4, 60) * 3600.0 + 1.7e9  # 2.5 days
    state = AlarmState.fresh(4, 3, config)
    for half in (slice(0, 30), slice(30, 60)):  # the second half is judged against a threshold
        state = detector.detect(rows[:, half], state, readings=rows.cumsum(1)[:, half], times=hourly[:, half]).state
    assert bool(torch.isfinite(state.tail_level).all())  # every line follows its scores' level
    assert bool((state.continuation_excess > 0).any())  # episodes ran on: the rows' control moved
    if recurring_events:  # each line knows its spacing and holds potential onsets
        assert state.row_seconds.tolist() == [3600.0] * 4 and bool(torch.isfinite(state.recurring_time).any(1).all())
    stored = [state.select(i).to_bytes() for i in range(4)]
    old = state.select(3)._tensors() | {"in_alarm": state.select(3).in_alarm}
    old = {k: v for k, v in old.items() if k not in ("quiet_rows", "excess", "tail_level")}
    for name in ("calibration", "recent_calibration"):
        old[name] = old[name][torch.isfinite(old[name])].float()
    if consistency_rows:
        old["consistency"] = state.select(3).consistency.flat()
    stored[3] = codec.encode(old, {"kind": "AlarmState", "consistency_sensors": 3})
    stored.insert(1, None)
    batch = AlarmState.from_many(stored, 3, config)
    alone = AlarmState.cat([AlarmState.from_bytes(s, config) if s else AlarmState.fresh(1, 3, config) for s in stored])
    for name, value in alone._tensors().items():
        assert torch.allclose(getattr(batch, name).double(), value.double(), equal_nan=True), name
    if consistency_rows:
        for name, value in alone.consistency.tensors().items():
            assert torch.allclose(getattr(batch.consistency, name), value, equal_nan=True), name


def _daily_spikes(days: int, spikes: dict[tuple[int, float], float]) -> tuple[torch.Tensor, torch.Tensor]:
    """One line of 5-minute rows over `days` days from midnight UTC: N(0, 1) residuals, and a
    one-row residual of the given height at each (day, hour of the day) of `spikes`."""
    per_day = 288
    rng = np.random.default_rng(21)
    residuals = rng.normal(size=(1, days * per_day, 1))
    for (day, hour), height in spikes.items():
        residuals[0, day * per_day + round(hour * 12), 0] = height
    times = 1.7e9 - 1.7e9 % 86_400 + 300.0 * torch.arange(days * per_day, dtype=torch.float64)[None, :]
    return torch.tensor(residuals), times


def test_a_burst_at_the_same_time_every_day_opens_an_episode_on_its_first_day_only():
    """A nightly burst (03:00, one day at 03:15: within 6 rows) opens an episode on its first
    day, not on the days after; a burst at a new time of day does, and so does one at the usual
    time that is more than `recurring_factor` times as big. Without the bar every burst does."""
    spikes = {(1, 3.0): 8.0, (2, 3.0): 8.0, (3, 3.25): 8.0, (3, 15.0): 8.0, (4, 3.0): 16.0, (5, 3.0): 8.0}
    residuals, times = _daily_spikes(6, spikes)
    opened = {}
    for events in (0, 32):
        config = AlarmConfig(
            false_alarm_rate=0.005,
            smoothing_rows=1,
            calibration_rows=512,
            warmup_rows=100,
            episode_gap_rows=0,
            recurring_events=events,
            recurring_factor=3.0,
            recurring_tolerance_rows=6.0,
        )
        detector = AnomalyDetector(config)
        state = detector.detect(
            residuals[:, :288], AlarmState.fresh(1, 1, config), calibrate_only=True, times=times[:, :288]
        ).state
        onsets = []
        for lo in range(288, residuals.shape[1], 100):  # files of 100 rows: the reference crosses them
            judged = detector.detect(residuals[:, lo : lo + 100], state, times=times[:, lo : lo + 100])
            state = judged.state
            onsets += [lo + e.start for e in judged.episodes if not e.continues]
        opened[events] = {(row // 288, (row % 288) / 12) for row in onsets}
    spike_rows = set(spikes)
    assert spike_rows <= opened[0]
    assert spike_rows & opened[32] == {(1, 3.0), (3, 15.0), (4, 3.0)}
    # Normal rows open no more episodes with it than without: the bar only holds rows back.
    assert len(opened[0] - spike_rows) >= len(opened[32] - spike_rows)


def test_the_recurring_events_bar_needs_the_rows_times():
    detector = AnomalyDetector(AlarmConfig(recurring_events=8))
    with pytest.raises(ValueError, match="times"):
        detector.detect(torch.zeros(1, 3, 1, dtype=torch.float64), AlarmState.fresh(1, 1, detector.config))
    with pytest.raises(ValueError, match="recurring_factor"):
        AlarmConfig(recurring_events=8, recurring_factor=0.5)


class _RowByRow(AnomalyDetector):
    """The decision walk as it was before it skipped rows: every row of the chunk in turn. The
    reference the skipping walk must match (lru_online.alarms._decide)."""

    def _decide(self, scores, thresholds, candidates, steps, state, times):
        from lru_online.alarms import NEVER, _Decision, _RecurringEvents

        gap = max(self.config.episode_gap_rows, 1)
        step, rate = self.config.rate_control_step, self.config.false_alarm_rate
        recurring = (state.recurring_time, state.recurring_score, state.recurring_next, state.row_seconds)
        quiet, excess = state.quiet_rows.clone(), state.excess.clone()
        continuing = state.continuation_excess.clone()
        continuation_step, continuation_rate = self.config.continuation_step, self.config.continuation_rate
        alarms, onsets = torch.zeros_like(steps), torch.zeros_like(steps)
        row_thresholds = torch.full_like(scores, math.nan)
        events = _RecurringEvents(*recurring, self.config) if self.config.recurring_events else None
        if events is not None:
            times = times.to(torch.float64)
            events.measure_spacing(times, steps)
        for t in range(scores.shape[1]):
            present = steps[:, t]
            within = torch.where(quiet < gap, torch.maximum(excess, continuing), excess)
            held_to = thresholds * torch.exp(torch.where(quiet == 0, continuing, within))
            opens_above = held_to
            if events is not None:
                before = events.same_time_before(times[:, t])
                opens_above = torch.maximum(held_to, self.config.recurring_factor * before)
            alarm = candidates[:, t] & (scores[:, t] > torch.where(quiet == 0, held_to, opens_above))
            onset = alarm & (quiet >= gap)
            if step:
                excess = torch.where(present, torch.clamp(excess + step * (onset.double() - rate), min=0.0), excess)
            if continuation_step:
                moved = continuing + continuation_step * ((alarm & ~onset).double() - continuation_rate)
                continuing = torch.where(present, torch.clamp(moved, min=0.0), continuing)
            if events is not None:
                potential = present & candidates[:, t] & (quiet != 0) & (scores[:, t] > held_to)
                events.add(times[:, t], scores[:, t], potential)
            quiet = torch.where(present, torch.where(alarm, 0, torch.clamp(quiet + 1, max=NEVER)), quiet)
            alarms[:, t], onsets[:, t] = alarm, onset
            row_thresholds[:, t] = torch.where(present, held_to, math.nan)
        if events is not None:
            recurring = (events.time, events.score, events.next, events.row_seconds)
        return _Decision(alarms, onsets, quiet, excess, row_thresholds, recurring, continuing)


@pytest.mark.parametrize("recurring_events", [0, 8])
@pytest.mark.parametrize(("rate_control_step", "continuation_step"), [(0.0, 0.0), (1.0, 0.0), (1.0, 0.3), (0.0, 0.3)])
def test_skipping_the_rows_no_line_passes_decides_as_the_row_by_row_walk(
    recurring_events, rate_control_step, continuation_step
):
    """Four lines of uneven length (padding), a burst at the same time every day on two of them,
    random faults, episodes with a gap, over eight chunks of 300 rows carried from one to the
    next: the alarms, onsets, episodes, per-row thresholds and carried states equal those of the
    walk over every row (the log-factor to rounding: it is lowered in one step over a quiet span,
    not row by row)."""
    config = AlarmConfig(
        false_alarm_rate=0.01,
        smoothing_rows=1,
        calibration_rows=200,
        warmup_rows=50,
        episode_gap_rows=5,
        rate_control_step=rate_control_step,
        continuation_step=continuation_step,
        continuation_rate=0.05,
        recurring_events=recurring_events,
        recurring_factor=2.0,
        recurring_tolerance_rows=3.0,
    )
    fast, reference = AnomalyDetector(config), _RowByRow(config)
    lines, chunk, sensors = 4, 300, 3
    rng = np.random.default_rng(12)
    fast_state = reference_state = AlarmState.fresh(lines, sensors, config)
    raised = 0.0  # the largest continuation factor a chunk left
    spacing = 600.0  # 10-minute rows: 144 a day, a burst at the same time each day
    for number in range(8):
        residuals = rng.normal(size=(lines, chunk, sensors))
        rows = number * chunk + np.arange(chunk)
        residuals[:2, rows % 144 == 30] += 6.0  # the daily burst on lines 0 and 1
        faults = rng.random((lines, chunk)) < 0.004
        for length in range(1, 4):  # faults of 1 to 4 rows: episodes with rows after their onset
            faults[:, length:] |= faults[:, :-length] & (rng.random((lines, chunk - length)) < 0.7)
        residuals[faults] += rng.uniform(3, 9, size=(int(faults.sum()), sensors))
        steps = np.ones((lines, chunk), dtype=bool)
        steps[3, chunk - 1 - number * 20 :] = False  # line 3 reports fewer rows each chunk
        times = np.broadcast_to(1.7e9 + spacing * rows, (lines, chunk)).copy()
        inputs = (torch.from_numpy(residuals), torch.from_numpy(steps))
        stamps = torch.from_numpy(times)
        got = fast.detect(inputs[0], fast_state, inputs[1], times=stamps)
        want = reference.detect(inputs[0], reference_state, inputs[1], times=stamps)
        assert torch.equal(got.alarms, want.alarms)
        torch.testing.assert_close(got.row_thresholds, want.row_thresholds, rtol=1e-12, atol=0, equal_nan=True)
        assert [replace(e, threshold=0.0) for e in got.episodes] == [replace(e, threshold=0.0) for e in want.episodes]
        assert [e.threshold for e in got.episodes] == pytest.approx([e.threshold for e in want.episodes], rel=1e-12)
        assert torch.equal(got.state.quiet_rows, want.state.quiet_rows)
        torch.testing.assert_close(got.state.excess, want.state.excess, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            got.state.continuation_excess, want.state.continuation_excess, rtol=1e-12, atol=1e-12
        )
        for name in ("recurring_time", "recurring_score", "recurring_next", "calibration"):
            got_value, want_value = getattr(got.state, name), getattr(want.state, name)
            torch.testing.assert_close(got_value, want_value, rtol=0, atol=0, equal_nan=True)
        fast_state, reference_state = got.state, want.state
        raised = max(raised, float(want.state.continuation_excess.max()))
    assert int(want.alarms.sum()) > 0
    assert (raised > 0) == (continuation_step > 0)


@pytest.mark.parametrize(
    "missing",
    [
        ("tail_level", "held_peak", "continuation_excess"),
        ("held_peak", "continuation_excess"),
        ("continuation_excess",),
    ],
)
def test_a_state_packed_by_an_older_version_reads_as_one_without_its_newer_fields(missing):
    """A line's state packed by the version before `tail_rows`, before the held peak, or before
    the rows' rate control (its figures shorter by those trailing values): read alone or in a
    batch, every field as stored, the missing level and peak left to warm up (NaN) and the
    missing continuation factor at 0."""
    config = AlarmConfig(
        false_alarm_rate=0.1,
        calibration_rows=40,
        warmup_rows=10,
        bias_rows=20,
        tail_rows=30,
        episode_gap_rows=3,
        continuation_step=0.5,
        continuation_rate=0.05,
    )
    detector = AnomalyDetector(config)
    rows = torch.tensor(np.random.default_rng(9).normal(size=(1, 50, 2)))
    state = detector.detect(rows[:, 25:], detector.detect(rows[:, :25], _fresh(config)).state).state
    assert bool(torch.isfinite(state.tail_level).all())  # the level starts once a chunk begins warm
    assert bool(torch.isfinite(state.held_peak).all())
    state.continuation_excess = torch.full_like(state.continuation_excess, 0.75)  # as a line in alarm leaves it
    tensors, meta = codec.decode(state.to_bytes())
    packed = {k: v for k, v in meta["packed"].items() if k not in missing}
    # Written then as vectors (records have since a line dimension of one: `to_many`).
    figures, held = tensors["figures"].reshape(-1), tensors["held"].reshape(-1)
    older = codec.encode({"figures": figures[: -len(missing)], "held": held}, meta | {"packed": packed})
    current = AlarmState.from_bytes(state.to_bytes(), config)  # as stored (quiet rows capped)
    for read in (AlarmState.from_many([older], 2, config), AlarmState.from_bytes(older, config)):
        for name, value in current._tensors().items():
            if name == "continuation_excess" and name in missing:
                assert bool((getattr(read, name) == 0).all())
            elif name in missing:
                assert bool(torch.isnan(getattr(read, name)).all()), name
            else:
                assert torch.allclose(getattr(read, name).double(), value.double(), equal_nan=True), name


def _fresh(config: AlarmConfig, sensors: int = 2) -> AlarmState:
    return AlarmState.fresh(1, sensors, config)


def _autocorrelated(rng: np.random.Generator, rows: int, sensors: int, phi: float) -> np.ndarray:
    """AR(1) noise of unit variance: each row's spread as white noise's, its runs far longer."""
    noise = rng.normal(size=(rows, sensors)) * math.sqrt(1 - phi**2)
    out = np.empty_like(noise)
    out[0] = rng.normal(size=sensors)
    for t in range(1, rows):
        out[t] = phi * out[t - 1] + noise[t]
    return out


def test_the_threshold_follows_lines_whose_scores_grow_wider_than_their_first_rows():
    """Eight lines calm in their first rows (white residuals) that later wander (the same spread
    per row, in runs of tens of rows, as SKAB's vibration does): the mean chart's scores grow
    wider than the held ones, so thresholds held from the first rows let tens of times α of the
    normal rows alarm; following the recent level keeps them within 2α (pooled over the lines:
    each line's held threshold is an order statistic of 400 rows, a noisy floor)."""
    config = AlarmConfig(false_alarm_rate=0.01, smoothing_rows=5, calibration_rows=512, warmup_rows=400, bias_rows=200)
    rng = np.random.default_rng(12)
    lines = [np.concatenate([rng.normal(size=(600, 4)), _autocorrelated(rng, 8_000, 4, 0.8)]) for _ in range(8)]
    rows = torch.tensor(np.stack(lines))
    rates = {}
    for tail_rows in (0, 1024):
        detector = AnomalyDetector(replace(config, tail_rows=tail_rows))
        state, alarms = AlarmState.fresh(8, 4, detector.config), []
        for lo in range(0, rows.shape[1], 10):
            judged = detector.detect(rows[:, lo : lo + 10], state)
            state = judged.state
            alarms.append(judged.alarms)
        rates[tail_rows] = float(torch.cat(alarms, 1)[:, 3000:].double().mean())  # the level has followed
    assert rates[0] > 10 * config.false_alarm_rate
    assert rates[1024] <= 2 * config.false_alarm_rate


def test_the_followed_level_is_the_recent_scores_quantile_and_a_fault_cannot_run_away_with_it():
    """On a stationary line the level settles where a quarter of the scores lie above it; a
    400-row fault alarms on every row after its first few and lifts the level by at most
    e^(400/tail_rows), the bound of its step."""
    config = AlarmConfig(false_alarm_rate=0.01, smoothing_rows=5, calibration_rows=512, warmup_rows=400, tail_rows=1024)
    detector = AnomalyDetector(config)
    rng = np.random.default_rng(13)
    state = _fresh(config, 3)
    scores = []
    for _ in range(800):
        judged = detector.detect(torch.tensor(rng.normal(size=(1, 10, 3))), state)
        state = judged.state
        scores.append(judged.scores[0].numpy())
    later = np.concatenate(scores)[4000:]
    assert abs((later > float(state.tail_level[0])).mean() - 0.25) < 0.05
    before = float(state.tail_level[0])
    fault = rng.normal(size=(1, 400, 3))
    fault[..., 0] += 4.0
    alarms = []
    for lo in range(0, 400, 10):
        judged = detector.detect(torch.tensor(fault[:, lo : lo + 10]), state)
        state = judged.state
        alarms.append(judged.alarms[0].numpy())
    assert np.concatenate(alarms)[10:].all()
    assert float(state.tail_level[0]) / before <= math.exp(400 / 1024) * (1 + 1e-9)


def test_until_a_span_of_rows_is_behind_a_line_its_bias_is_the_plain_mean_of_its_rows():
    """A forecaster off by 6 from the first row: after 30 rows in three chunks the bias is their
    mean, not an exponential mean of a 200-row span started from zero (~0.9 of the offset)."""
    config = AlarmConfig(false_alarm_rate=0.1, calibration_rows=100, warmup_rows=50, bias_rows=200)
    detector = AnomalyDetector(config)
    rows = np.random.default_rng(14).normal(size=(1, 30, 2)) + 6.0
    state = _fresh(config)
    for lo in range(0, 30, 10):
        state = detector.detect(torch.tensor(rows[:, lo : lo + 10]), state).state
    assert state.bias[0].tolist() == pytest.approx(rows[0].mean(0).tolist())


def test_a_column_that_starts_reporting_late_is_scaled_by_its_own_rows():
    """Lines with no residuals in one column for their first 300 rows (a consistency regression
    still learning, a sensor that comes online): once it reports, its scale is that of its own
    rows, not diluted by the rows before it started, its bias starts from its first chunk's
    mean, and the line's scores keep their level."""
    config = AlarmConfig(false_alarm_rate=0.1, calibration_rows=1000, warmup_rows=50, bias_rows=200)
    detector = AnomalyDetector(config)
    rng = np.random.default_rng(21)
    rows = rng.normal(size=(40, 500, 2))
    rows[..., 1] = rows[..., 1] * 3.0 + 0.5
    rows[:, :300, 1] = math.nan
    state, scores = AlarmState.fresh(40, 2, config), []
    for lo in range(0, 500, 20):
        judged = detector.detect(torch.tensor(rows[:, lo : lo + 20]), state, calibrate_only=True)
        scores.append(judged.scores.numpy())
        state = judged.state
        if lo == 300:
            assert state.bias[:, 1].tolist() == pytest.approx(rows[:, 300:320, 1].mean(1).tolist())
    # Around the bias, the squares of a column of scale 3 (diluted by the 300 rows before it
    # started, the scale would read about 3·√(200/500) ≈ 1.9).
    assert np.sqrt(state.square_mean[:, 1].numpy()).mean() == pytest.approx(3.0, rel=0.05)
    # Before it started, the scores average over the one column a line had; after, over both:
    # each column's chart is χ²(1)-like either way, so their level does not jump.
    scores = np.concatenate(scores, axis=1)
    assert scores[:, 350:].mean() == pytest.approx(scores[:, 100:300].mean(), rel=0.3)


def test_a_column_that_starts_late_does_not_raise_the_rate_of_false_alarms():
    """Many lines of normal residuals whose second column starts reporting at row 150, judged in
    chunks of 20 rows: the share of normal rows that alarm stays as it is when both columns
    report from the first row."""
    config = AlarmConfig(false_alarm_rate=0.02, smoothing_rows=10, calibration_rows=400, warmup_rows=100)
    detector = AnomalyDetector(config)
    rng = np.random.default_rng(22)
    rows = rng.normal(size=(100, 600, 2)) * np.array([1.0, 4.0])

    def alarm_rate(residuals: np.ndarray) -> float:
        state, alarms = AlarmState.fresh(100, 2, config), []
        for lo in range(0, 600, 20):
            judged = detector.detect(torch.tensor(residuals[:, lo : lo + 20]), state)
            alarms.append(judged.alarms.numpy())
            state = judged.state
        return float(np.concatenate(alarms, axis=1)[:, 200:].mean())

    late = rows.copy()
    late[:, :150, 1] = math.nan
    from_the_start = alarm_rate(rows)
    assert from_the_start < 2 * config.false_alarm_rate
    assert alarm_rate(late) < 1.5 * from_the_start + 0.005


def test_a_fleet_written_at_once_gives_each_line_its_own_record_and_reads_back():
    """Lines holding different numbers of scores (two layouts) written by `to_many`: each
    record is byte for byte the one the line alone gives, the batch read back holds every
    field as stored, and a record written the older way (vectors without a line dimension)
    reads the same."""
    config = _every_part(consistency_rows=10)
    detector = AnomalyDetector(config)
    rows = torch.tensor(np.random.default_rng(23).normal(size=(6, 50, 3)))
    steps = torch.ones(6, 50, dtype=torch.bool)
    steps[3:, 30:] = False  # three lines hold 30 scores, three hold 50
    state = detector.detect(rows, AlarmState.fresh(6, 3, config), steps=steps, readings=rows.cumsum(1)).state
    records = state.to_many()
    assert len({codec.decode(r)[1]["packed"]["calibration"] for r in records}) == 2
    assert records == [state.select(i).to_bytes() for i in range(6)]

    tensors, meta = codec.decode(records[4])
    older = codec.encode({name: tensor.reshape(-1) for name, tensor in tensors.items()}, meta)
    for stored in (records, [*records[:4], older, records[5]]):
        batch = AlarmState.from_many(stored, 3, config)
        alone = AlarmState.cat([AlarmState.from_bytes(r, config) for r in stored])
        for name, value in alone._tensors().items():
            assert torch.allclose(getattr(batch, name).double(), value.double(), equal_nan=True), name
            if name not in ("calibration", "recent_calibration", "quiet_rows"):  # float32, capped on storing
                assert torch.allclose(value.double(), getattr(state, name).double(), equal_nan=True), name
        for name, value in alone.consistency.tensors().items():
            assert torch.allclose(getattr(batch.consistency, name), value, equal_nan=True), name
    held = torch.isfinite(state.calibration)
    assert torch.equal(torch.isfinite(batch.calibration), held)
    assert torch.allclose(batch.calibration[held], state.calibration[held].float().double())


def _plant_reference(standard: np.ndarray, finite: np.ndarray, times: np.ndarray, minimum: int) -> np.ndarray:
    """The plant's shift row by row, straight from its definition: stretches of COMMON_MODE_ROWS
    typical row spacings, each line's mean over its rows there, their median where enough lines
    have rows, else the nearest such stretch's if it lies within the line's own stretches."""
    lines, length, columns = standard.shape
    timed = finite & np.isfinite(times)[..., None]
    present = timed.any(-1)
    spacings = [np.median(np.diff(times[line][present[line]])) for line in range(lines) if present[line].sum() > 1]
    width = COMMON_MODE_ROWS * np.median(spacings)
    start = times[present].min()
    number = np.where(present, np.floor((np.nan_to_num(times, nan=start) - start) / width), -1).astype(int)
    occupied = sorted(set(number[present].tolist()))
    medians, enough = {}, {}
    for k in occupied:
        for column in range(columns):
            means = [
                standard[line, (number[line] == k) & timed[line, :, column], column].mean()
                for line in range(lines)
                if ((number[line] == k) & timed[line, :, column]).any()
            ]
            enough[k, column] = len(means) >= minimum
            medians[k, column] = np.median(means) if means else 0.0
    shift = np.zeros_like(standard)
    for line in range(lines):
        own = number[line][present[line]]
        for t in range(length):
            if not present[line, t]:
                continue
            for column in range(columns):
                usable = [k for k in occupied if enough[k, column]]
                if not usable:
                    continue
                distance = [abs(k - number[line, t]) for k in usable]
                k = usable[int(np.argmin(distance))]  # the earlier on a tie
                if own.min() <= k <= own.max():
                    shift[line, t, column] = medians[k, column]
    return shift


def test_the_plants_shift_is_the_median_over_lines_of_their_means_in_each_stretch_of_time():
    """Nine lines on their own clocks (one shorter), two more far later in time (a plant of
    unrelated series), readings missing at random: the detector's shift equals the definition
    computed row by row. The far lines get none; rows where the lines' clocks have drifted
    apart take the nearest stretch's."""
    rng = np.random.default_rng(30)
    lines, length, columns = 11, 40, 2
    standard = rng.normal(size=(lines, length, columns)) + np.linspace(0, 3, length)[None, :, None]
    times = np.cumsum(rng.exponential(1.0, (lines, length)), axis=1)  # lines share no timestamp
    times[9:] += 10_000.0
    finite = rng.random((lines, length, columns)) > 0.15
    times[2, 30:] = np.nan  # a shorter line, right-padded
    finite[2, 30:] = False
    standard = np.where(finite, standard, 0.0)
    detector = AnomalyDetector(AlarmConfig(common_mode_lines=6))
    shift = detector.common_mode(torch.tensor(standard), torch.tensor(finite), torch.tensor(times)).numpy()
    expected = _plant_reference(standard, finite, times, 6)
    np.testing.assert_allclose(np.where(finite, shift, 0.0), np.where(finite, expected, 0.0), atol=1e-12)
    assert np.abs(expected[:9]).max() > 1.0  # the plant does move
    assert not expected[9:].any()  # the far lines are not read against it
    late = times[:9] > np.nanquantile(times[:9, -1], 0.5)  # where fewer than six lines still report
    assert np.abs(expected[:9][late & finite[:9].any(-1)]).min() > 0.0


def _plant(rng: np.random.Generator, lines: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    residuals = rng.normal(size=(lines, length, 3))
    times = np.cumsum(rng.exponential(1.0, (lines, length)), axis=1) + rng.uniform(0, 1, (lines, 1))
    return residuals, times


def _alarms_after(detector: AnomalyDetector, calibration, rows, calibration_times, times) -> np.ndarray:
    state = detector.detect(
        torch.tensor(calibration),
        AlarmState.fresh(rows.shape[0], 3, detector.config),
        calibrate_only=True,
        times=torch.tensor(calibration_times),
    ).state
    return detector.detect(torch.tensor(rows), state, times=torch.tensor(times)).alarms.numpy()


def test_a_plant_wide_step_is_taken_off_every_line_while_one_lines_own_fault_still_alarms():
    """40 lines with their own clocks, calibrated on normal rows; then the whole plant steps by
    4σ in one column from the middle of the next chunk on, and line 7 alone steps by 5σ in another.
    Judged alone, most lines alarm on the plant's step; relative to the plant (at least 20
    lines), once past the stretch of time it falls in the plant's step alarms about as often as
    normal rows, and line 7's fault still alarms."""
    rng = np.random.default_rng(31)
    lines, length = 40, 200
    calibration, calibration_times = _plant(rng, lines, 600)
    rows, times = _plant(rng, lines, length)
    times += calibration_times[:, -1:]
    middle = np.median(times[:, length // 2])
    after = times >= middle
    rows[..., 0] += 4.0 * after
    rows[7, :, 1] += 5.0 * after[7]
    base = AlarmConfig(false_alarm_rate=0.01, smoothing_rows=1, calibration_rows=600, warmup_rows=100)
    alone = _alarms_after(AnomalyDetector(base), calibration, rows, calibration_times, times)
    plant = _alarms_after(
        AnomalyDetector(replace(base, common_mode_lines=20)), calibration, rows, calibration_times, times
    )
    others = np.arange(lines) != 7
    assert alone[others][after[others]].mean() > 0.5
    # The stretch of time the step falls in is half before, half after it: its rows may alarm.
    stretch = (np.nanmax(times) - np.nanmin(times)) / (length // COMMON_MODE_ROWS)
    settled = times >= middle + stretch
    assert plant[others][settled[others]].mean() < 3 * base.false_alarm_rate
    assert plant[others][after[others]].mean() < 0.1
    assert plant[others][~after[others]].mean() < 3 * base.false_alarm_rate
    assert plant[7][after[7]].mean() > 0.5


def test_with_fewer_lines_than_the_plant_needs_each_line_is_judged_alone():
    rng = np.random.default_rng(32)
    calibration, calibration_times = _plant(rng, 10, 300)
    rows, times = _plant(rng, 10, 100)
    rows[3, 50:] += 5.0
    base = AlarmConfig(false_alarm_rate=0.01, smoothing_rows=5, calibration_rows=300, warmup_rows=100, bias_rows=50)
    plant = replace(base, common_mode_lines=20)
    np.testing.assert_array_equal(
        _alarms_after(AnomalyDetector(base), calibration, rows, calibration_times, times),
        _alarms_after(AnomalyDetector(plant), calibration, rows, calibration_times, times),
    )


def test_a_plant_whose_lines_report_one_row_each_is_judged():
    """A plant file with one reading per line (no spacing to take stretches from) is judged, as
    at a spacing not known: stretches of one second, in which these lines, each on its own clock,
    are too few for the plant's median, so each is judged alone (before, an error)."""
    rng = np.random.default_rng(33)
    lines = 25
    calibration, calibration_times = _plant(rng, lines, 300)
    rows, times = _plant(rng, lines, 1)
    times += calibration_times[:, -1:]
    config = AlarmConfig(false_alarm_rate=0.01, smoothing_rows=1, calibration_rows=300, warmup_rows=100)
    alone = _alarms_after(AnomalyDetector(config), calibration, rows, calibration_times, times)
    plant = _alarms_after(
        AnomalyDetector(replace(config, common_mode_lines=20)), calibration, rows, calibration_times, times
    )
    assert plant.shape == (lines, 1)
    np.testing.assert_array_equal(plant, alone)


def test_the_plants_shift_needs_the_rows_times():
    detector = AnomalyDetector(AlarmConfig(common_mode_lines=2))
    with pytest.raises(ValueError, match="common_mode_lines"):
        detector.detect(torch.zeros(3, 4, 2), AlarmState.fresh(3, 2, detector.config))
    with pytest.raises(ValueError, match="common_mode_lines"):
        AlarmConfig(common_mode_lines=1)


def _continuation_run(rows: torch.Tensor, continuation_step: float) -> AlarmResult:
    """One line warmed up on its first 600 rows, then its other rows judged as one chunk (a
    large file: the threshold and scale as they stood before it)."""
    config = AlarmConfig(
        false_alarm_rate=0.005,
        smoothing_rows=1,
        calibration_rows=512,
        warmup_rows=100,
        episode_gap_rows=96,
        rate_control_step=1.0,
        continuation_step=continuation_step,
        continuation_rate=0.02,
    )
    detector = AnomalyDetector(config)
    state = detector.detect(rows[:, :600], _fresh(config, 1), calibrate_only=True).state
    return detector.detect(rows[:, 600:], state)


def test_the_rows_rate_control_bounds_how_long_a_new_level_alarms_and_keeps_short_faults_whole():
    """A line whose residual jumps by 4 scales and stays there within one large file (a level
    the forecaster has not learnt yet, as after an unlabelled shift in a long stream): without
    the rows' rate control nearly every row of the new level alarms; with it, the alarmed rows
    that do not open an episode are at most continuation_rate·T + y_T/η_c, y_T ≤ log(largest
    score / threshold) + η_c. A 5-row fault (the demo's stuck sensor) alarms on each of its rows
    with it as without."""
    rng = np.random.default_rng(3)
    residuals = rng.normal(size=(1, 1_200, 1))
    residuals[0, 700:] += 4.0
    rows = torch.tensor(residuals)
    plain, controlled = _continuation_run(rows, 0.0), _continuation_run(rows, 0.1)
    assert float(plain.alarms[0, 100:].float().mean()) > 0.6
    continuing = int((controlled.alarms & ~_onsets(controlled)).sum())
    threshold = float(controlled.thresholds[0])
    largest = float(controlled.scores[0].max())
    assert 0 < continuing <= 0.02 * 600 + (math.log(largest / threshold) + 0.1) / 0.1
    assert float(controlled.alarms[0, 100:].float().mean()) < 0.1

    fault = rng.normal(size=(1, 900, 1))
    fault[0, 750:755] += 8.0
    for step in (0.0, 0.1):
        assert bool(_continuation_run(torch.tensor(fault), step).alarms[0, 150:155].all())


def _onsets(result: AlarmResult) -> torch.Tensor:
    """(B, T) bool: each episode's first alarmed row of the chunk."""
    onsets = torch.zeros_like(result.alarms)
    for episode in result.episodes:
        if not episode.continues:
            onsets[episode.line, episode.start] = True
    return onsets


def test_a_unit_stretched_past_the_cap_is_multiplied_back_by_the_excess():
    """After a level shift the scaler's std (the residuals' unit) is stretched g-fold: residuals
    come g times smaller. With a cap c the detector judges them multiplied by max(1, g / c), the
    same as residuals that came that much larger; a stretch within the cap changes nothing."""
    config = AlarmConfig(false_alarm_rate=0.01, calibration_rows=400, warmup_rows=100, level_stretch_cap=2.0)
    detector = AnomalyDetector(config)
    rng = np.random.default_rng(5)
    calibrated = _calibrated(detector, rng.normal(size=(2, 400, 1)))
    rows = torch.tensor(rng.normal(size=(2, 300, 1)))
    stretch = torch.where(torch.arange(300)[None, :, None] < 100, 1.5, 8.0).expand(2, 300, 1)
    stretched = detector.detect(rows, calibrated, stretch=stretch)
    off = AnomalyDetector(replace(config, level_stretch_cap=0.0))
    multiplied = off.detect(rows * torch.clamp(stretch / 2.0, min=1.0), calibrated)
    torch.testing.assert_close(stretched.scores, multiplied.scores)
    assert torch.equal(stretched.alarms, multiplied.alarms)
    within = detector.detect(rows, calibrated, stretch=torch.full_like(rows, 1.9))
    torch.testing.assert_close(within.scores, off.detect(rows, calibrated).scores)


def test_a_fault_after_a_level_shift_is_seen_at_its_size_before_the_shift():
    """The residuals after a shift come 20 times smaller (the scaler's std stretched 20-fold);
    a fault of 10 deviations then reads 0.5 without the cap and is missed, and 5 with it."""
    config = AlarmConfig(
        false_alarm_rate=0.01, smoothing_rows=1, calibration_rows=400, warmup_rows=100, level_stretch_cap=2.0
    )
    rng = np.random.default_rng(6)
    normal = rng.normal(size=(1, 400, 1))
    after = rng.normal(size=(1, 200, 1))
    after[0, 150:155, 0] += 10.0
    shrunk = torch.tensor(after / 20.0)
    stretch = torch.full_like(shrunk, 20.0)
    for cap, caught in ((2.0, True), (0.0, False)):
        detector = AnomalyDetector(replace(config, level_stretch_cap=cap))
        judged = detector.detect(shrunk, _calibrated(detector, normal), stretch=stretch)
        assert bool(judged.alarms[0, 150:155].any()) is caught
