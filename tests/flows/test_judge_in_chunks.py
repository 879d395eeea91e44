"""flows.model.file_step.judge_lines with `judge_rows`: a file's rows judged chunk by chunk, all
lines together, give each line what the detector gives it alone fed the same chunks, and runs
of alarmed rows cut by the chunk grid are stored as one alarm."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from features import FeatureSpec, build_features
from flows.model.file_step import ScoredLines, judge_lines
from lru_online.alarms import AlarmConfig, AlarmState, AnomalyDetector

SENSORS = ("a", "b")
SPEC = FeatureSpec(entity_column="entity", timestamp_column="timestamp", sensors=SENSORS, time_scale_seconds=1.0)
CONFIG = AlarmConfig(false_alarm_rate=0.05, smoothing_rows=3, calibration_rows=60, warmup_rows=20, judge_rows=7)


def _file(lengths: dict[str, int], shifted: dict[str, slice]) -> tuple:
    """A file of the given lines, their residuals (a shift of 6 on sensor a where `shifted`)."""
    rng = np.random.default_rng(11)
    frames = []
    for entity, length in lengths.items():
        stamps = pd.date_range("2026-01-01", periods=length, freq="1s", tz="UTC")
        frames.append(pd.DataFrame({"entity": entity, "timestamp": stamps, "a": 0.0, "b": 0.0}))
    features, _ = build_features(pd.concat(frames, ignore_index=True), SPEC, {})
    residuals = rng.normal(size=(len(features), len(SENSORS)))
    for line, entity in enumerate(features.entities):
        if entity in shifted:
            rows = np.arange(features.offsets[line], features.offsets[line + 1])[shifted[entity]]
            residuals[rows, 0] += 6.0
    scored = ScoredLines(np.zeros((len(features), 1, 2)), residuals, (residuals**2).mean(1), {}, 0)
    return features, scored


def _alone(residuals: np.ndarray, state: AlarmState, chunk: int):
    """One line through the detector chunk by chunk: per-row scores, thresholds, alarms, state."""
    detector = AnomalyDetector(CONFIG)
    scores, thresholds, alarms = [], [], []
    for lo in range(0, len(residuals), chunk):
        judged = detector.detect(torch.from_numpy(residuals[None, lo : lo + chunk]), state)
        state = judged.state
        scores.append(judged.scores[0].numpy())
        alarms.append(judged.alarms[0].numpy())
        thresholds.append(np.full(judged.scores.shape[1], float(judged.thresholds[0])))
    return np.concatenate(scores), np.concatenate(thresholds), np.concatenate(alarms), state


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate([[0], flags.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1, strict=True))


def test_each_line_is_judged_as_alone_chunk_by_chunk_and_a_cut_run_is_one_alarm():
    lengths = {"line-1": 60, "line-2": 45, "line-3": 9}  # line-3 is shorter than the warm-up
    features, scored = _file(lengths, {"line-1": slice(30, 50), "line-2": slice(26, 41)})
    judged = judge_lines(features, scored, {}, CONFIG)

    expected_episodes = []
    for line, entity in enumerate(features.entities):
        rows = slice(features.offsets[line], features.offsets[line + 1])
        fresh = AlarmState.fresh(1, len(SENSORS), CONFIG)
        scores, thresholds, alarms, state = _alone(scored.residuals[rows], fresh, CONFIG.judge_rows)
        np.testing.assert_allclose(judged.scores[rows], scores)
        np.testing.assert_array_equal(judged.thresholds[rows], thresholds)
        np.testing.assert_array_equal(judged.alarms[rows], alarms)
        assert judged.states[entity] == state.to_bytes()
        stamps = features.timestamps[rows]
        for start, end in _runs(alarms):
            # A run is one episode here, and the line starts alarming at its first row only.
            expected_episodes.append(
                (
                    entity,
                    stamps[start].isoformat(),
                    stamps[end].isoformat(),
                    end - start + 1,
                    [start],
                    [stamps[start].value],
                )
            )
            peak = max(e["peak_score"] for e in judged.episodes if e["start_ts"] == stamps[start].isoformat())
            assert peak == pytest.approx(scores[start : end + 1].max())

    got = [
        (e["entity"], e["start_ts"], e["end_ts"], e["rows"], e["onset_rows"], e["onset_ns"]) for e in judged.episodes
    ]
    assert sorted(got) == sorted(expected_episodes)
    assert any(e["rows"] > CONFIG.judge_rows for e in judged.episodes)  # runs did cross the grid
    assert not judged.alarms[features.offsets[2] :].any()  # line-3 never held its warm-up
    assert not any(e["continues"] for e in judged.episodes)


def test_without_judge_rows_a_file_is_judged_at_once_and_a_run_from_the_file_before_continues():
    whole = AlarmConfig(**{**CONFIG.__dict__, "judge_rows": 0})
    features, scored = _file({"line-1": 40}, {"line-1": slice(25, 40)})
    first = judge_lines(features, scored, {}, CONFIG)
    assert first.alarms[-1]  # the file ends in alarm

    later, scored_later = _file({"line-1": 12}, {"line-1": slice(0, 12)})
    carried = {"line-1": first.states["line-1"]}
    at_once = judge_lines(later, scored_later, carried, whole)
    state = AlarmState.from_bytes(first.states["line-1"], whole)
    scores, thresholds, alarms, _ = _alone(scored_later.residuals, state, len(scored_later.residuals))
    np.testing.assert_array_equal(at_once.alarms, alarms)
    np.testing.assert_array_equal(at_once.thresholds, thresholds)
    assert at_once.episodes[0]["continues"] and at_once.episodes[0]["start_ts"] == later.timestamps[0].isoformat()
    # Alarming on from the file before is no onset; each later row that alarms after a quiet one is.
    restarts = [i for i in range(1, len(alarms)) if alarms[i] and not alarms[i - 1]]
    assert at_once.episodes[0]["onset_rows"] == restarts

    in_chunks = judge_lines(later, scored_later, carried, CONFIG)
    assert [e["continues"] for e in in_chunks.episodes][:1] == [True]


def test_judge_rows_must_not_be_negative():
    with pytest.raises(ValueError, match="judge_rows"):
        AlarmConfig(judge_rows=-1)
