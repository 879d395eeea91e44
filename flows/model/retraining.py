"""Retraining: a challenger trained on each line's recent rows, judged against the champion,
swapped in between files while ingestion goes on.

The window is set in rows, not files: each line's newest `window_rows` rows, of which the newest
`holdout_rows` are held out, and the challenger trains on at most `max_lines` lines (a sample),
so its cost does not grow with the size of a plant's files. When each file is a run of its
lines (`log_schema.file_is_run`), each batch of a line is a sequence of its own, from a zero
state, for training and judging alike, as the stream reads it. The challenger is a fresh model
trained for a few epochs on the rows before the held-out ones, mixed with the champion's replay
windows from before the held-out slice (so neither sees it). The champion is judged by the
one-step errors it made on the held-out rows before learning from them (test-then-train, as
recorded); the challenger by reading each line's window from a zero state and forecasting the
held-out part. The `champion` alias moves only if the challenger's MSE is below the champion's
by at least the configured margin.

A retraining usually runs beside the update run (its own process, `flows.orchestrate.retrain_beside`), so
files keep being committed while it trains. A winning challenger then catches up: it scores and
learns from every file committed after its window, as the champion did, and is swapped in, in
one transaction that holds only if no file was committed since; otherwise it catches up again.
An update run's file in flight at the swap finds the model moved and is redone from the new
champion. Either way the drift reference becomes the recent window and the detectors restart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm.exc import StaleDataError

from features import FeatureBatch
from flows import faults
from flows.model.file_step import carried_state
from flows.model.fleet import new_learner, save_checkpoint
from flows.model.forecast_mixture import (
    MixtureSetup,
    forecasts_from_residuals,
    keep_linear_member,
    residuals_from_a_fresh_mixture,
)
from flows.model.live import LiveModel
from flows.model.reference import build_reference
from flows.model.registry_package import register_version
from flows.monitor.tracking import CHALLENGER, CHAMPION, Tracker, flat_settings
from flows.storage.line_states import carried_by_every_line, json_safe
from flows.storage.models import BatchSummary, EntityState, ModelState, RetrainDecision
from flows.storage.work_folder import resolved_path, stored_path
from lru_online import OnlineLearner
from lru_online.learner import lines_per_step_for

log = logging.getLogger(__name__)

# A swap needs the files committed during the catch-up to be caught up too; each round reads
# only what the last one did not, so a few rounds suffice unless ingestion outruns scoring.
CATCH_UP_ROUNDS = 20


@dataclass
class RetrainOutcome:
    promoted: bool
    reason: str
    champion_version: str | None = None
    challenger_version: str | None = None
    champion_mse: float | None = None
    challenger_mse: float | None = None
    decision_id: int | None = None
    window_sequence: int | None = None  # the newest file part of the window it trained on
    swapped_at_sequence: int | None = None  # the newest file part it caught up to before the swap


@dataclass
class RecentWindow:
    """Every line's newest rows, its newest `holdout_rows` held out."""

    # The sampled lines' rows before their held-out ones, and every line's whole window (a
    # line once per batch when each file is a run).
    train: FeatureBatch
    full: FeatureBatch
    holdout: np.ndarray  # (rows of `full`,) bool: the held-out rows
    stored_residuals: np.ndarray  # (rows of `full`, sensors) the champion's test-then-train residuals
    # With the mixture on, the champion model's own one-step residuals on every row (the
    # `alarm_residual_*` columns), from which its forecasts are read back.
    model_residuals: np.ndarray | None
    holdout_update_index: int  # the champion's update count when the first held-out row's batch began
    raw: np.ndarray  # readings of every row
    last_sequence: int


def _newest_summaries(live: LiveModel, window_rows: int) -> pd.DataFrame:
    """Each line's newest batch summaries that hold its newest `window_rows` rows (one query)."""
    newer_rows = (
        func.sum(BatchSummary.rows)
        .over(partition_by=BatchSummary.entity, order_by=BatchSummary.sequence.desc())
        .label("through")
    )
    ranked = select(
        BatchSummary.entity,
        BatchSummary.sequence,
        BatchSummary.rows,
        BatchSummary.features_path,
        BatchSummary.metrics,
        newer_rows,
    ).subquery()
    with live.db.session() as session:
        found = session.execute(select(ranked).where(ranked.c.through - ranked.c.rows < window_rows)).all()
    return pd.DataFrame(found, columns=["entity", "sequence", "rows", "features_path", "metrics", "through"])


def _read_rows(live: LiveModel, summaries: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The rows of the summarised (line, file part) pairs, each output file read once, in line,
    part and time order, tagged with their part's sequence."""
    spec = live.spec
    frames = []
    for path, group in summaries.groupby("features_path", sort=False):
        frame = pd.read_parquet(resolved_path(live.settings.workdir, path), columns=columns)
        frame[spec.entity_column] = frame[spec.entity_column].astype(str)
        tags = group[["entity", "sequence"]].rename(columns={"entity": spec.entity_column})
        frames.append(frame.merge(tags, on=spec.entity_column, how="inner"))
    return pd.concat(frames, ignore_index=True).sort_values(
        [spec.entity_column, "sequence", spec.timestamp_column], kind="stable", ignore_index=True
    )


def _feature_columns(live: LiveModel) -> list[str]:
    spec = live.spec
    return [
        spec.entity_column,
        spec.timestamp_column,
        *spec.input_names,
        *(f"target_{s}" for s in spec.sensors),
        "dt",
    ]


def _load_window(live: LiveModel) -> RecentWindow | None:
    """Reads each line's newest `window_rows` rows; holds out its newest `holdout_rows` when it
    has more than that; the challenger trains on the rest of at most `max_lines` lines."""
    settings = live.settings.retrain
    spec = live.spec
    summaries = _newest_summaries(live, settings.window_rows)
    if summaries.empty:
        return None
    residuals = [f"residual_{s}" for s in spec.sensors]
    model_residuals = [f"alarm_residual_{s}" for s in spec.sensors] if live.settings.mixture.enabled else []
    readings = [f"raw_{s}" for s in spec.sensors]
    columns = [*_feature_columns(live), *readings, *residuals]
    try:
        rows = _read_rows(live, summaries, [*columns, *model_residuals])
    except ValueError:
        if not model_residuals:
            raise
        # Files written before the mixture was switched on hold no model residuals: the champion
        # is then judged by its stored residuals, as with the mixture off.
        model_residuals = []
        rows = _read_rows(live, summaries, columns)
    line = rows[spec.entity_column]
    from_end = rows.groupby(line, sort=False).cumcount(ascending=False)  # 0 = a line's newest row
    rows = rows[(from_end < settings.window_rows).to_numpy()].reset_index(drop=True)
    from_end = from_end[from_end < settings.window_rows].to_numpy()
    line = rows[spec.entity_column]
    line_rows = line.map(line.value_counts()).to_numpy()
    holdout = (from_end < settings.holdout_rows) & (line_rows > settings.holdout_rows)
    if not holdout.any():
        return None

    last_sequence = int(summaries["sequence"].max())
    lines = np.unique(line[line_rows > settings.holdout_rows])
    if len(lines) > settings.max_lines:  # the budget: a sample of lines, the same for one window
        lines = np.sort(np.random.default_rng(last_sequence).choice(lines, settings.max_lines, replace=False))
    train = ~holdout & line.isin(lines).to_numpy()  # `lines` hold more rows than the holdout

    # The replay windows the champion stored from the held-out rows' batches on are forgotten.
    first_held = rows[holdout].groupby(spec.entity_column, sort=False)["sequence"].min()
    update_index = {
        (entity, int(sequence)): (metrics or {}).get("update_index")
        for entity, sequence, metrics in summaries[["entity", "sequence", "metrics"]].itertuples(index=False)
    }
    runs_by = "sequence" if live.settings.log_schema.file_is_run else None
    return RecentWindow(
        train=FeatureBatch.from_frame(rows[train], spec, runs_by),
        full=FeatureBatch.from_frame(rows, spec, runs_by),
        holdout=holdout,
        stored_residuals=rows[residuals].to_numpy(np.float64),
        model_residuals=rows[model_residuals].to_numpy(np.float64) if model_residuals else None,
        holdout_update_index=min(int(update_index.get((e, int(s))) or 0) for e, s in first_held.items()),
        raw=rows[readings].to_numpy(np.float64),
        last_sequence=last_sequence,
    )


def _held_out_mse(window: RecentWindow, residuals: np.ndarray) -> float:
    """Mean squared residual over the held-out rows of `residuals` (rows of `full`, sensors)."""
    held = residuals[window.holdout]
    finite = held[np.isfinite(held)]
    return float(np.mean(finite**2)) if finite.size else float("nan")


def _through_a_fresh_mixture(
    window: RecentWindow, mixture: MixtureSetup, forecast: torch.Tensor, y: torch.Tensor, steps: torch.Tensor
) -> np.ndarray:
    """The residuals (rows of `full`, sensors) of one-step model forecasts (lines, T, 1, S) of
    the window's targets `y` put through a mixture started afresh at each line's window: how
    that model would forecast the window as a line's forecaster."""
    residuals = residuals_from_a_fresh_mixture(mixture, forecast, y, steps)
    return window.full.flat(residuals.numpy())


def _champion_mse(window: RecentWindow, mixture: MixtureSetup | None) -> float:
    """The champion's held-out one-step MSE, as it forecast those rows before learning from them.
    With the mixture on, its model's forecasts (read back from its own residuals) go through a
    mixture started afresh at the window's start, as the challenger's do: the stored mixed
    residuals come from a mixture that has weighed its members for the whole stream, and a
    fresh one would give the champion a handicap the challenger does not have."""
    if mixture is None or window.model_residuals is None:
        return _held_out_mse(window, window.stored_residuals)
    _, y, _, steps = window.full.tensors()
    model_residuals = torch.from_numpy(window.full.padded(window.model_residuals, fill=np.nan))
    forecast = forecasts_from_residuals(y, model_residuals)
    return _held_out_mse(window, _through_a_fresh_mixture(window, mixture, forecast, y, steps))


def _evaluate(
    learner: OnlineLearner, window: RecentWindow, mixture: MixtureSetup | None
) -> tuple[float, dict[str, bytes]]:
    """Held-out one-step MSE over all lines, each read from a zero state, and each line's state
    at its newest event (the end of its last sequence: rows are in time order). With the
    mixture on, its one-step forecasts go through a mixture started afresh on each line's
    window, as the champion's do (`_champion_mse`)."""
    u, y, dt, steps = window.full.tensors()
    scored = learner.score(u, y, None, dt, steps)
    if mixture is None:
        residuals = window.full.flat(scored.residuals.float().numpy())
    else:
        residuals = _through_a_fresh_mixture(window, mixture, scored.forecast[:, :, :1], y, steps)
    states = dict(zip(window.full.entities, scored.state.lines_to_bytes(), strict=True))
    return _held_out_mse(window, residuals), states


def _catch_up(live: LiveModel, learner: OnlineLearner, hidden: dict[str, bytes], after: int) -> int:
    """Scores and learns from every file part committed after sequence `after`, in order and
    from each line's state in `hidden` (updated), as the champion did; the newest one read."""
    with live.db.session() as session:
        found = session.execute(
            select(BatchSummary.entity, BatchSummary.sequence, BatchSummary.part, BatchSummary.features_path).where(
                BatchSummary.sequence > after
            )
        ).all()
    if not found:
        return after
    summaries = pd.DataFrame(found, columns=["entity", "sequence", "part", "features_path"])
    file_is_run = live.settings.log_schema.file_is_run
    for _, part in summaries.groupby("sequence", sort=True):
        features = FeatureBatch.from_frame(_read_rows(live, part, _feature_columns(live)), live.spec)
        new_run = file_is_run and int(part["part"].iloc[0]) == 0
        start = {} if new_run else hidden
        u, y, dt, steps = features.tensors()
        state = carried_state(learner, features.entities, start)
        scored = learner.score(u, y, state, dt, steps)
        learner.update(u, y, state, dt, steps)
        hidden.update(zip(features.entities, scored.state.lines_to_bytes(), strict=True))
    return int(summaries["sequence"].max())


def _swap_in(
    live: LiveModel, checkpoint: str, version: str, hidden: dict[str, bytes], caught_up: int, reference: dict
) -> str | None:
    """One transaction: every line's state, the live checkpoint and the champion, if no file
    part was committed after `caught_up`. The replaced checkpoint, or None when ingestion moved on."""
    try:
        with live.db.session() as session:
            model = session.get(ModelState, live.settings.pipeline)
            if (session.scalar(select(func.max(BatchSummary.sequence))) or 0) != caught_up:
                return None
            previous = model.checkpoint_path
            model.checkpoint_path = checkpoint
            model.champion_version = version
            model.reference = reference
            model.drift_since_sequence = caught_up
            session.flush()  # fails if an update run committed since the model was read
            if "linear" in live.settings.mixture.members and live.settings.mixture.enabled:
                # Read after the flush: no file part committed since, so these stand where `hidden` does.
                stored = dict(session.execute(select(EntityState.entity, EntityState.hidden_state)).all())
                hidden = {entity: keep_linear_member(stored.get(entity), state) for entity, state in hidden.items()}
            session.connection().execute(
                update(EntityState)
                .where(EntityState.entity == bindparam("key"))
                .values(hidden_state=bindparam("hidden"), model_version=version, version=EntityState.version + 1)
                .execution_options(synchronize_session=False),
                [{"key": entity, "hidden": state} for entity, state in hidden.items()],
            )
    except StaleDataError:
        return None
    return previous


def _move_reference(live: LiveModel, reference: dict) -> None:
    """Without a promotion the drift reference still becomes the recent window."""
    for _ in range(CATCH_UP_ROUNDS):
        try:
            with live.db.session() as session:
                model = session.get(ModelState, live.settings.pipeline)
                model.reference = reference
                model.drift_since_sequence = session.scalar(select(func.max(BatchSummary.sequence))) or 0
            return
        except StaleDataError:
            continue  # an update run committed meanwhile: read the model again


def retrain(
    live: LiveModel, tracker: Tracker, trigger: str = "manual", drift_event_id: int | None = None
) -> RetrainOutcome:
    settings = live.settings
    state = live.state()
    if state is None:
        return RetrainOutcome(False, "no live model to retrain yet")
    window = _load_window(live)
    if window is None:
        return RetrainOutcome(False, "not enough processed rows for a held-out slice")
    champion = live.load()

    challenger = new_learner(settings, live.spec)
    challenger.set_learning_rate(settings.retrain.learning_rate)
    challenger.replay.load_state_dict(champion.replay.state_dict())
    challenger.forget_replay_from(window.holdout_update_index)
    u, y, dt, steps = window.train.tensors()
    groups = lines_per_step_for(len(window.train.entities), settings.retrain.steps_per_window)
    losses = [
        challenger.update(u, y, None, dt, steps, lines_per_step=groups)["loss"] for _ in range(settings.retrain.epochs)
    ]

    champion_mse = _champion_mse(window, settings.mixture.setup())
    challenger_mse, challenger_states = _evaluate(challenger, window, settings.mixture.setup())
    margin = settings.retrain.margin
    promoted = bool(challenger_mse < champion_mse * (1 - margin))
    reason = (
        f"challenger held-out MSE {challenger_mse:.4f} vs champion {champion_mse:.4f} "
        f"(needs < {champion_mse * (1 - margin):.4f})"
    )

    run_id = tracker.start_run(f"retrain-{trigger}", "retrain", params=flat_settings(settings))
    for epoch, loss in enumerate(losses):
        tracker.log_metrics(run_id, {"train_loss": loss}, step=epoch)
    tracker.log_metrics(run_id, {"champion_mse": champion_mse, "challenger_mse": challenger_mse}, step=0)
    checkpoint = save_checkpoint(challenger, settings.paths.checkpoints, "challenger")
    with live.db.session() as session:
        lines = carried_by_every_line(session)
    lines.hidden.update(challenger_states)  # the challenger read each recent window itself
    challenger_version = register_version(tracker, settings, run_id, checkpoint, "challenger", reason, lines)
    tracker.set_alias(CHALLENGER, challenger_version)
    faults.pause("retrain_trained")

    reference = json_safe(
        build_reference(window.raw, live.spec.sensors, mae=float(np.sqrt(challenger_mse if promoted else champion_mse)))
    )
    swapped_at = None
    if promoted:
        hidden, caught_up = dict(lines.hidden), window.last_sequence
        for _ in range(CATCH_UP_ROUNDS):
            caught_up = _catch_up(live, challenger, hidden, caught_up)
            live_checkpoint = save_checkpoint(challenger, settings.paths.checkpoints, "live")
            previous = _swap_in(
                live, stored_path(settings.workdir, live_checkpoint), challenger_version, hidden, caught_up, reference
            )
            if previous is not None:
                swapped_at = caught_up
                live.remove_checkpoint(previous)
                break
            live_checkpoint.unlink(missing_ok=True)
        else:
            promoted = False
            reason += f"; not promoted: ingestion stayed ahead of the catch-up for {CATCH_UP_ROUNDS} rounds"
        if swapped_at is not None and swapped_at > window.last_sequence:
            reason += f"; caught up on {swapped_at - window.last_sequence} file part(s) committed while it trained"
    if not promoted:
        _move_reference(live, reference)

    with live.db.session() as session:
        decision = RetrainDecision(
            pipeline=settings.pipeline,
            drift_event_id=drift_event_id,
            trigger=trigger,
            champion_version=state.champion_version,
            challenger_version=challenger_version,
            champion_mse=champion_mse,
            challenger_mse=challenger_mse,
            margin=margin,
            promoted=promoted,
            reason=reason,
            mlflow_run_id=run_id,
            window_sequence=window.last_sequence,
            swapped_at_sequence=swapped_at,
        )
        session.add(decision)
        session.flush()
        decision_id = decision.id
    live.drop()  # whatever it holds, the next use loads the committed model
    checkpoint.unlink(missing_ok=True)  # the registry keeps its own copy of the judged challenger
    if promoted:
        tracker.set_alias(CHAMPION, challenger_version)
    tracker.log_metrics(run_id, {"promoted": float(promoted)}, step=0)
    tracker.end_run(run_id)
    log.info("retrain (%s): %s", trigger, reason)
    return RetrainOutcome(
        promoted,
        reason,
        state.champion_version,
        challenger_version,
        champion_mse,
        challenger_mse,
        decision_id,
        window.last_sequence,
        swapped_at,
    )
