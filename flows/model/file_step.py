"""One file (or one part of a large file) through the fleet, as plain functions.

    prepare_lines   per group of lines: late rows split off, features from each line's carried
                    feature state (a Dask worker can run it: it touches no shared weights)
    score_lines     the driver: every line scored in one forward from its carried hidden state,
                    by the model as it stood before this file (test-then-train)
    learn_lines     the driver: the update over all lines (`update.lines_per_step` per step),
                    on a thread of its own while the lines are finished
    finish_lines    per group of lines: anomaly alarms, drift detectors and the output Parquet file

The driver then commits everything in one transaction (`flows.commit`). A group's results do
not depend on which lines share it, so any split of the lines (one group in the driver, many
on Dask workers) ends in the same state.
"""

from __future__ import annotations

import time
from concurrent import futures
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from features import FeatureBatch, FeatureSpec, build_features
from flows.model.forecast_mixture import (
    MixtureSetup,
    alarm_residuals,
    carried_mixtures,
    mix_lines,
    run_linear_member,
)
from flows.monitor.drift_detectors import Detection, check_lines, decode_drift_states, encode_drift_states
from flows.settings import DriftSettings
from lru_online import OnlineLearner, RecurrentState, ScoringGraph, codec
from lru_online.alarms import AlarmConfig, AlarmState, AnomalyDetector


@dataclass
class PreparedLines:
    """A group of lines' rows turned into model inputs."""

    received: dict[str, int]  # rows of each line in this part
    late: dict[str, int]  # of which older than the line's watermark
    features: FeatureBatch | None  # the other rows, of the lines that have any
    feature_states: dict[str, bytes]  # the feature state after them, per line with rows
    seconds: float = 0.0


@dataclass
class ScoredLines:
    """What the model made of every line's rows: flat per row, lines in `features` order."""

    forecast: np.ndarray  # (R, horizon, targets)
    residuals: np.ndarray  # (R, targets)
    scores: np.ndarray  # (R,)
    hidden: dict[str, bytes]  # each line's hidden state after its rows
    update_index: int  # the learner's update count when this part was learned from
    # (R, targets) what the alarms judge where it is not `residuals` (the mixture on:
    # forecast_mixture.alarm_residuals); None: `residuals`.
    alarm_residuals: np.ndarray | None = None

    def rows(self, lo: int, hi: int) -> ScoredLines:
        """The figures of rows lo:hi (a group of lines), without the hidden states."""
        judged = self.alarm_residuals[lo:hi] if self.alarm_residuals is not None else None
        return ScoredLines(
            self.forecast[lo:hi],
            self.residuals[lo:hi],
            self.scores[lo:hi],
            {},
            self.update_index,
            judged,
        )

    @property
    def judged_residuals(self) -> np.ndarray:
        """The residuals the alarms judge."""
        return self.residuals if self.alarm_residuals is None else self.alarm_residuals


@dataclass
class JudgedLines:
    """The anomaly detector's verdict on a group's rows, flat per row like `ScoredLines`."""

    scores: np.ndarray  # (R,) smoothed score
    thresholds: np.ndarray  # (R,) what each row was held against (inf while its line warms up)
    alarms: np.ndarray  # (R,) bool
    states: dict[str, bytes]  # per line, carried on
    # Alarm episodes: entity, start_ts, end_ts (ISO, first and last alarmed row), rows (alarmed),
    # peak_score, threshold (what the first row passed), continues (from the file before),
    # onset_ns and onset_rows (each of its rows here that alarmed after one that did not, where
    # its line started alarming: UTC nanoseconds, and its position among the line's rows of the
    # file; read by flows.monitor.plant_alarms).
    episodes: list[dict]


@dataclass
class FinishedLines:
    """A group of lines' alarms, drift checks, figures and output file."""

    output_path: Path
    metrics: dict[str, dict[str, float]]  # per line: rows, errors, score quantiles, alarmed rows
    drift_stats: dict[str, dict]  # per line: psi / ks / mean per sensor
    drift_states: dict[str, bytes]  # per line, carried on
    alarm_states: dict[str, bytes]  # per line, carried on
    alarms: list[dict]  # JudgedLines.episodes
    detections: list[Detection]
    seconds: dict[str, float]  # alarms, drift, output
    worker: str | None = None  # the Dask worker that ran it (None: the driver)


def prepare_lines(
    rows: pd.DataFrame,
    spec: FeatureSpec,
    feature_states: dict[str, bytes | None],
    watermarks: dict[str, datetime | None],
) -> PreparedLines:
    """Splits off late rows (at or before the line's watermark) and builds the features of the
    rest, each line from its carried feature state (bytes; None or absent for a new line)."""
    started = time.perf_counter()
    entity = rows[spec.entity_column].astype(str)
    received = entity.value_counts().to_dict()
    late_rows = late_mask(rows, spec, watermarks)
    late = entity[late_rows].value_counts().to_dict()
    fresh = rows[~late_rows]
    if fresh.empty:
        return PreparedLines(_counts(received), _counts(late), None, {}, time.perf_counter() - started)
    carried = {e: data for e, data in feature_states.items() if e in received}
    features, states = build_features(fresh, spec, carried)
    encoded = states.to_bytes_many()
    return PreparedLines(_counts(received), _counts(late), features, encoded, time.perf_counter() - started)


def late_mask(rows: pd.DataFrame, spec: FeatureSpec, watermarks: dict[str, datetime | None]) -> np.ndarray:
    """(rows,) bool: the rows at or before their line's watermark (its newest event so far)."""
    entity = rows[spec.entity_column].astype(str)
    marks = entity.map({e: pd.Timestamp(w) for e, w in watermarks.items() if w is not None})
    stamps = pd.to_datetime(rows[spec.timestamp_column], utc=True)
    return (stamps <= pd.to_datetime(marks, utc=True)).to_numpy()


def _counts(values: dict) -> dict[str, int]:
    return {str(k): int(v) for k, v in values.items()}


def carried_state(learner: OnlineLearner, entities: list[str], hidden: dict[str, bytes | None]) -> RecurrentState:
    """The lines' hidden states stacked in order; a new line starts from zero with no forecast."""
    return _stacked_states(learner, _decoded_records(entities, hidden), len(entities))


def _decoded_records(entities: list[str], hidden: dict[str, bytes | None]) -> list[codec.LineGroup]:
    """The lines' stored forecaster records, read at once (grouped by layout; a line without
    one is in no group)."""
    return codec.decode_lines([hidden.get(e) for e in entities])


def _stacked_states(learner: OnlineLearner, records: list[codec.LineGroup], lines: int) -> RecurrentState:
    model = learner.model
    state = RecurrentState(
        model.initial_state(lines).hidden,
        torch.full((lines, model.config.horizon, model.config.n_targets), float("nan")),
    )
    for group in records:
        state = state.place(group.lines, RecurrentState.from_decoded(group.tensors, group.meta))
    return state


def score_lines(
    learner: OnlineLearner,
    features: FeatureBatch,
    hidden: dict[str, bytes | None],
    mixture: MixtureSetup | None = None,
    beside: futures.Executor | None = None,
    for_update: bool = False,
) -> tuple[ScoredLines, RecurrentState, ScoringGraph | None]:
    """One forward over every line, right-padded to the longest, from their carried states.
    With `mixture`, the forecasts, residuals and scores are the mixture's (flows.model
    .forecast_mixture) and each line's record carries its mixture state too; its `linear`
    member runs on `beside` (a thread) while the model's forward runs here, when given.
    Returned beside the scores: the carried states scored from and, `for_update`, the scoring
    forward's graph when the update can learn from it (OnlineLearner.score_for_update), for
    `learn_lines`."""
    u, y, dt, steps = features.tensors()
    records = _decoded_records(features.entities, hidden)
    state = _stacked_states(learner, records, len(features.entities))
    carried = linear = None
    if mixture is not None:
        config = learner.model.config
        carried = carried_mixtures(records, len(features.entities), mixture, config.horizon, config.n_targets)
        if beside is not None:
            linear = beside.submit(run_linear_member, mixture, carried, y, steps)
    try:
        if for_update:
            scored, scoring = learner.score_for_update(u, y, state, dt, steps)
        else:
            scored, scoring = learner.score(u, y, state, dt, steps), None
    finally:
        if linear is not None:  # its error, if any, is raised below
            futures.wait([linear])
    forecast, residuals, scores, ends = scored.forecast, scored.residuals, scored.scores, scored.state
    records_beside = None
    judged = None
    if mixture is not None:
        linear_run = linear.result() if linear is not None else None
        mixed = mix_lines(mixture, forecast, y, steps, carried, state.last_forecast, linear_run)
        judged = features.flat(alarm_residuals(residuals, mixed, steps).float().numpy())
        forecast, residuals, scores = mixed.forecast.float(), mixed.residuals.float(), mixed.scores.float()
        hidden = scored.state.hidden
        if bool(mixed.model_diverged.any()):  # those lines start their next file afresh
            fresh = learner.model.initial_state(len(features.entities)).hidden
            reset = mixed.model_diverged[:, None]
            hidden = [torch.where(reset, new, old) for new, old in zip(fresh, hidden, strict=True)]
        ends = RecurrentState(hidden, mixed.last_forecast.float())
        records_beside = mixed.record_tensors()
    result = ScoredLines(
        forecast=features.flat(forecast.numpy()),
        residuals=features.flat(residuals.numpy()),
        scores=features.flat(scores.numpy()),
        hidden=dict(zip(features.entities, ends.lines_to_bytes(records_beside), strict=True)),
        update_index=learner.updates,
        alarm_residuals=judged,
    )
    return result, state, scoring


def learn_lines(
    learner: OnlineLearner, features: FeatureBatch, state: RecurrentState, scoring: ScoringGraph | None = None
) -> dict[str, float]:
    """The update over every line of the part, from the states they were scored from (and from
    the scoring forward itself when `score_lines` kept it); its figures."""
    u, y, dt, steps = features.tensors()
    return learner.update(u, y, state, dt, steps, scoring=scoring)


def judge_lines(
    features: FeatureBatch, scored: ScoredLines, alarm_states: dict[str, bytes | None], config: AlarmConfig
) -> JudgedLines:
    """Every line's rows judged at once by the anomaly detector, from its carried state; in
    chunks of `config.judge_rows` rows when set (all lines a chunk at a time, so a fresh line
    can alarm within its first file once it holds its warm-up)."""
    sensors = scored.residuals.shape[1]
    detector = AnomalyDetector(config)
    residuals = torch.from_numpy(features.padded(scored.judged_residuals, fill=np.nan))
    readings = torch.from_numpy(features.padded(features.targets.astype(np.float64), fill=np.nan))
    steps = torch.from_numpy(features.padded(np.ones(len(features), dtype=bool), fill=False))
    seconds = features.timestamps.as_unit("ns").asi8.astype(np.float64) / 1e9
    times = torch.from_numpy(features.padded(seconds, fill=np.nan))
    stretch = None if features.level_stretch is None else torch.from_numpy(features.padded(features.level_stretch, 1.0))
    length = residuals.shape[1]
    size = config.judge_rows or max(length, 1)
    state = AlarmState.from_many([alarm_states.get(e) for e in features.entities], sensors, config)
    alarming_before = state.in_alarm.numpy().copy()  # each line's last row before this file alarmed
    scores, thresholds, alarms, episodes = [], [], [], []
    latest: dict[int, dict] = {}  # line → its latest episode
    spans: list[list[int]] = []  # per episode: its line, first and last alarmed position in the file
    latest_span: dict[int, list[int]] = {}
    for lo in range(0, max(length, 1), size):
        judged = detector.detect(
            residuals[:, lo : lo + size],
            state,
            steps[:, lo : lo + size],
            readings=readings[:, lo : lo + size],
            times=times[:, lo : lo + size],
            stretch=stretch[:, lo : lo + size] if stretch is not None else None,
        )
        state = judged.state
        scores.append(judged.scores)
        alarms.append(judged.alarms)
        thresholds.append(judged.row_thresholds)
        for episode in judged.episodes:
            first = features.offsets[episode.line] + lo
            end_ts = features.timestamps[first + episode.end].isoformat()
            if episode.continues and episode.line in latest:  # the line's latest episode, cut by the chunk grid
                record = latest[episode.line]
                record.update(end_ts=end_ts, rows=record["rows"] + episode.rows)
                record["peak_score"] = max(record["peak_score"], episode.peak_score)
                latest_span[episode.line][2] = lo + episode.end
                continue
            latest[episode.line] = {
                "entity": features.entities[episode.line],
                "start_ts": features.timestamps[first + episode.start].isoformat(),
                "end_ts": end_ts,
                "rows": episode.rows,
                "peak_score": episode.peak_score,
                "threshold": episode.threshold,
                "continues": episode.continues,  # from the file before
            }
            episodes.append(latest[episode.line])
            latest_span[episode.line] = [episode.line, lo + episode.start, lo + episode.end]
            spans.append(latest_span[episode.line])
    alarmed = torch.cat(alarms, 1).numpy()
    _add_onsets(episodes, spans, alarmed, alarming_before, features)
    return JudgedLines(
        scores=features.flat(torch.cat(scores, 1).numpy()),
        thresholds=features.flat(torch.cat(thresholds, 1).numpy()),
        alarms=features.flat(alarmed),
        states=dict(zip(features.entities, state.to_many(), strict=True)),
        episodes=episodes,
    )


def _add_onsets(
    episodes: list[dict],
    spans: list[list[int]],
    alarmed: np.ndarray,
    alarming_before: np.ndarray,
    features: FeatureBatch,
) -> None:
    """Each episode's `onset_ns` and `onset_rows`: its rows that alarmed after a row of the line
    that did not (alarmed: (B, T), right-padded with False)."""
    previous = np.concatenate([alarming_before[:, None], alarmed[:, :-1]], axis=1)
    starts = alarmed & ~previous
    nanoseconds = features.timestamps.as_unit("ns").asi8
    for record, (line, first, last) in zip(episodes, spans, strict=True):
        positions = first + np.flatnonzero(starts[line, first : last + 1])
        record["onset_ns"] = nanoseconds[features.offsets[line] + positions].tolist()
        record["onset_rows"] = positions.tolist()


def finish_lines(
    prepared: PreparedLines,
    scored: ScoredLines,
    drift_states: dict[str, bytes | None],
    alarm_states: dict[str, bytes | None],
    reference: dict,
    spec: FeatureSpec,
    drift: DriftSettings,
    alarms: AlarmConfig,
    since: int,
    output_path: Path,
) -> FinishedLines:
    """Alarms, drift checks and figures of a group of lines, and their output file. `scored`
    holds the group's rows only, in the order of `prepared.features`."""
    features = prepared.features
    entities = features.entities
    offsets = features.offsets
    started = time.perf_counter()
    judged = judge_lines(features, scored, alarm_states, alarms)
    alarm_seconds = time.perf_counter() - started
    started = time.perf_counter()
    maes, rmses = _line_errors(scored.residuals, offsets)
    errors = np.sqrt(scored.scores)  # per-event absolute one-step error
    checks = check_lines(
        entities,
        decode_drift_states([drift_states.get(e) for e in entities]),
        np.split(errors, offsets[1:-1]),
        np.split(features.raw, offsets[1:-1]),
        maes,
        [features.timestamps[end - 1].isoformat() for end in offsets[1:]],
        reference,
        spec.sensors,
        drift,
        since,
    )
    drift_seconds = time.perf_counter() - started

    started = time.perf_counter()
    quantiles = _line_quantiles(features.padded(scored.scores, fill=np.nan))
    alarmed_rows = np.add.reduceat(judged.alarms.astype(np.int64), offsets[:-1]) if len(judged.alarms) else []
    metrics = {}
    for index, entity in enumerate(entities):
        metrics[entity] = {
            "rows": float(features.lengths[index]),
            "anomaly_rows": float(alarmed_rows[index]),
            "mae_before": maes[index],
            "rmse_before": rmses[index],
            "update_index": float(scored.update_index),
            **{name: values[index] for name, values in quantiles.items()},
        }
    write_output(output_path, features, scored, judged, spec)
    return FinishedLines(
        output_path=output_path,
        metrics=metrics,
        drift_stats={e: c.stats for e, c in zip(entities, checks, strict=True)},
        drift_states=dict(zip(entities, encode_drift_states([c.state for c in checks]), strict=True)),
        alarm_states=judged.states,
        alarms=judged.episodes,
        detections=[d for c in checks for d in c.detections],
        seconds={"alarms": alarm_seconds, "drift": drift_seconds, "output": time.perf_counter() - started},
    )


def _line_errors(residuals: np.ndarray, offsets: np.ndarray) -> tuple[list[float | None], list[float | None]]:
    """Each line's MAE and RMSE over its finite residuals (None where it has none)."""
    finite = np.isfinite(residuals)
    cells = np.add.reduceat(finite.sum(1), offsets[:-1]) if len(residuals) else np.zeros(0)
    absolute = (
        np.add.reduceat(np.where(finite, np.abs(residuals), 0.0).sum(1), offsets[:-1]) if len(residuals) else cells
    )
    squared = np.add.reduceat(np.where(finite, residuals**2, 0.0).sum(1), offsets[:-1]) if len(residuals) else cells
    maes = [float(a / c) if c else None for a, c in zip(absolute, cells, strict=True)]
    rmses = [float(np.sqrt(s / c)) if c else None for s, c in zip(squared, cells, strict=True)]
    return maes, rmses


def _line_quantiles(scores: np.ndarray) -> dict[str, list[float | None]]:
    """Score quantiles (numpy's linear method) and maximum of each line (L, T) over its finite
    scores, by one sort: np.nanpercentile along an axis loops in Python."""
    ordered = np.sort(np.where(np.isfinite(scores), scores, np.nan), axis=1)  # NaN sort last
    count = np.isfinite(ordered).sum(1)
    rows = np.arange(len(ordered))
    out: dict[str, list[float | None]] = {}
    for q in (50, 95, 99):
        position = q / 100 * np.maximum(count - 1, 0)
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, np.maximum(count - 1, 0))
        below, above = ordered[rows, low], ordered[rows, high]
        out[f"score_p{q}"] = _listed(np.where(count > 0, below + (position - low) * (above - below), np.nan))
    out["score_max"] = _listed(np.where(count > 0, ordered[rows, np.maximum(count - 1, 0)], np.nan))
    return out


def _listed(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]


def write_output(
    path: Path, features: FeatureBatch, scored: ScoredLines, judged: JudgedLines, spec: FeatureSpec
) -> None:
    """Scores, alarms, forecasts, residuals, readings and features of every row of a group of
    lines, as one Parquet file with the line in a column (written straight from the arrays)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, object] = {
        spec.entity_column: pa.array(np.repeat(np.asarray(features.entities, dtype=object), features.lengths)),
        spec.timestamp_column: pa.array(features.timestamps.as_unit("ns").asi8, type=pa.timestamp("ns", tz="UTC")),
    }
    for index, name in enumerate(spec.input_names):
        columns[name] = features.inputs[:, index]
    for index, sensor in enumerate(spec.sensors):
        columns[f"target_{sensor}"] = features.targets[:, index]
    columns["dt"] = features.dt
    columns["score"] = scored.scores
    columns["anomaly"] = judged.alarms.astype(np.int8)
    columns["anomaly_score"] = judged.scores
    columns["anomaly_threshold"] = judged.thresholds
    for index, sensor in enumerate(spec.sensors):
        columns[f"raw_{sensor}"] = features.raw[:, index]
        columns[f"residual_{sensor}"] = scored.residuals[:, index]
        if scored.alarm_residuals is not None:  # what the alarms judged, where that is not the above
            columns[f"alarm_residual_{sensor}"] = scored.alarm_residuals[:, index]
        for step in range(scored.forecast.shape[1]):
            columns[f"forecast_h{step + 1}_{sensor}"] = scored.forecast[:, step, index]
        if features.level_stretch is not None:
            columns[f"level_stretch_{sensor}"] = features.level_stretch[:, index]
    if features.labels is not None:
        for index, label in enumerate(features.label_names):
            columns[f"label_{label}"] = features.labels[:, index]
    path.parent.mkdir(parents=True, exist_ok=True)
    # Dictionary encoding only where values repeat: on float columns it is built and dropped,
    # at five times the cost of the write.
    pq.write_table(pa.table(columns), path, use_dictionary=[spec.entity_column])
