"""Anomaly alarms from forecast residuals, calibrated per line to a target false-alarm rate.

Per line and row, the residuals are standardised by the line's own residual scale (a running
mean of squared residuals over its recent normal rows), then smoothed by a mean chart: the
mean over sensors of n·m², m the mean of a sensor's last n ≤ `smoothing_rows` standardised
residuals. While the forecaster is right this is χ²(1)-like per sensor; a sustained shift
adds up over the window where one squared residual drowns in noise.

The threshold is a split-conformal quantile of the line's recent smoothed scores: with n of
them held, the ⌈(n+1)(1−α)⌉-th smallest, α = `false_alarm_rate`, so that a new normal score
exceeds it with probability at most α while the scores stay exchangeable. The held scores are
the line's newest `calibration_rows`, so the threshold follows the line as it changes. A new
score is held capped at the largest one already held: that keeps the count of scores above
any threshold (all the quantile depends on), so normal rows keep their α, while a long fault
can lift a threshold no higher than the line's largest recent score. (Leaving alarmed rows out
instead would ratchet every threshold down; holding them as they are would let a fault raise
the threshold over itself.) A line alarms only once it holds `warmup_rows` scores.

A chunk of rows (one file of a line) is judged against the threshold as it stood before the
chunk, then the chunk's normal rows join the calibration: the same test-then-train order as
the model. Everything is batched over lines (right-padded, with a step mask) and the state
of each line can be stored on its own (`to_bytes`, `select`, `cat`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lru_online import codec


@dataclass(frozen=True)
class AlarmConfig:
    false_alarm_rate: float = 0.01  # α: the share of normal rows allowed to alarm
    smoothing_rows: int = 30  # n of the mean chart
    calibration_rows: int = 512  # recent normal scores held per line
    warmup_rows: int = 100  # normal scores a line must hold before it can alarm

    def __post_init__(self) -> None:
        if not 0.0 < self.false_alarm_rate < 1.0:
            raise ValueError(f"AlarmConfig.false_alarm_rate must be in (0, 1), got {self.false_alarm_rate}")
        if self.smoothing_rows < 1 or self.calibration_rows < 1:
            raise ValueError("AlarmConfig.smoothing_rows and calibration_rows must be >= 1")
        if not 1 <= self.warmup_rows <= self.calibration_rows:
            raise ValueError("AlarmConfig.warmup_rows must be in [1, calibration_rows]")
        if math.ceil((self.calibration_rows + 1) * (1 - self.false_alarm_rate)) > self.calibration_rows:
            raise ValueError(
                f"AlarmConfig: {self.calibration_rows} calibration rows cannot resolve a false-alarm rate of "
                f"{self.false_alarm_rate}; hold at least {math.ceil(1 / self.false_alarm_rate)}"
            )


@dataclass
class AlarmState:
    """What each of B lines carries: its residual scale, the last n−1 standardised residuals
    for the mean chart, its calibration scores (NaN where empty) and whether it ended in alarm."""

    square_mean: torch.Tensor  # (B, S) running mean of squared residuals on normal rows
    scale_rows: torch.Tensor  # (B,) rows behind it
    history: torch.Tensor  # (B, n−1, S) newest last; zeros before a line's first rows
    history_rows: torch.Tensor  # (B,) real rows in history
    calibration: torch.Tensor  # (B, K)
    in_alarm: torch.Tensor  # (B,) bool

    @classmethod
    def fresh(cls, lines: int, sensors: int, config: AlarmConfig) -> AlarmState:
        return cls(
            torch.zeros(lines, sensors, dtype=torch.float64),
            torch.zeros(lines, dtype=torch.int64),
            torch.zeros(lines, config.smoothing_rows - 1, sensors, dtype=torch.float64),
            torch.zeros(lines, dtype=torch.int64),
            torch.full((lines, config.calibration_rows), float("nan"), dtype=torch.float64),
            torch.zeros(lines, dtype=torch.bool),
        )

    @property
    def lines(self) -> int:
        return self.square_mean.shape[0]

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            "square_mean": self.square_mean,
            "scale_rows": self.scale_rows,
            "history": self.history,
            "history_rows": self.history_rows,
            "calibration": self.calibration,
            "in_alarm": self.in_alarm,
        }

    def select(self, index: int) -> AlarmState:
        return AlarmState(**{k: v[index : index + 1].clone() for k, v in self._tensors().items()})

    @staticmethod
    def cat(states: list[AlarmState]) -> AlarmState:
        if not states:
            raise ValueError("AlarmState.cat needs at least one state")
        return AlarmState(**{k: torch.cat([s._tensors()[k] for s in states]) for k in states[0]._tensors()})

    def to_bytes(self) -> bytes:
        """One line's state (B = 1), with the calibration stored as float32 newest first and
        cut to the scores held: a line's record grows to ~2 KiB at most."""
        if self.lines != 1:
            raise ValueError("AlarmState.to_bytes stores one line; select it first")
        held = self.calibration[torch.isfinite(self.calibration)].to(torch.float32)
        tensors = self._tensors() | {"calibration": held}
        return codec.encode(tensors, {"kind": "AlarmState", "capacity": self.calibration.shape[1]})

    @classmethod
    def from_bytes(cls, data: bytes, config: AlarmConfig) -> AlarmState:
        tensors, meta = codec.decode(data)
        if meta.get("kind") != "AlarmState":
            raise codec.CodecError("state bytes do not hold an AlarmState")
        fresh = cls.fresh(1, tensors["square_mean"].shape[-1], config)
        held = tensors["calibration"].to(torch.float64)[: config.calibration_rows]
        fresh.calibration[0, : len(held)] = held
        history = tensors["history"].to(torch.float64)
        keep = min(history.shape[1], config.smoothing_rows - 1)  # a changed n keeps the newest rows
        if keep:
            fresh.history[:, -keep:] = history[:, history.shape[1] - keep :]
        fresh.history_rows = torch.clamp(tensors["history_rows"], max=keep)
        fresh.square_mean = tensors["square_mean"].to(torch.float64)
        fresh.scale_rows = tensors["scale_rows"]
        fresh.in_alarm = tensors["in_alarm"]
        return fresh


@dataclass
class AlarmEpisode:
    """A run of alarmed rows of one line within a chunk; `continues` when the line was already
    in alarm at the end of the chunk before (the episode started earlier)."""

    line: int  # index into the batch
    start: int  # first and last row, positions within the line's rows of this chunk
    end: int
    peak_score: float
    continues: bool


@dataclass
class AlarmResult:
    scores: torch.Tensor  # (B, T) smoothed score; NaN at padding
    thresholds: torch.Tensor  # (B,) the threshold each line was judged by (inf while warming up)
    alarms: torch.Tensor  # (B, T) bool
    state: AlarmState
    episodes: list[AlarmEpisode]


class AnomalyDetector:
    def __init__(self, config: AlarmConfig | None = None) -> None:
        self.config = config or AlarmConfig()

    def thresholds(self, state: AlarmState) -> torch.Tensor:
        """Each line's conformal threshold from its held normal scores (inf before warm-up)."""
        held = torch.isfinite(state.calibration).sum(1)
        ordered = torch.sort(torch.nan_to_num(state.calibration, nan=math.inf), dim=1).values
        rank = torch.ceil((held + 1).double() * (1 - self.config.false_alarm_rate)).long()
        picked = ordered.gather(1, (rank.clamp(1, ordered.shape[1]) - 1)[:, None])[:, 0]
        usable = (held >= self.config.warmup_rows) & (rank <= held)
        return torch.where(usable, picked, torch.full_like(picked, math.inf))

    def detect(
        self,
        residuals: torch.Tensor,
        state: AlarmState,
        steps: torch.Tensor | None = None,
        calibrate_only: bool = False,
    ) -> AlarmResult:
        """Scores and alarms of B lines' next rows, residuals (B, T, S) (NaN: no forecast or no
        reading), `steps` (B, T) False at padding. `calibrate_only`: every row is taken as
        normal (a line's known-good start); nothing alarms."""
        residuals = residuals.to(torch.float64)
        lines, length, _ = residuals.shape
        steps = torch.ones(lines, length, dtype=torch.bool) if steps is None else steps.to(torch.bool)
        finite = torch.isfinite(residuals) & steps[..., None]
        squares = torch.where(finite, residuals, 0.0) ** 2
        # A line without a scale yet (its first rows) is standardised by those rows themselves.
        chunk_mean = squares.sum(1) / finite.sum(1).clamp(min=1)
        square_mean = torch.where(state.scale_rows[:, None] > 0, state.square_mean, chunk_mean)
        scale = torch.sqrt(torch.where(square_mean > 0, square_mean, 1.0))
        standard = torch.where(finite, residuals, 0.0) / scale[:, None, :]

        scores = self._mean_chart(standard, state)
        scores = torch.where(steps, scores, math.nan)
        thresholds = self.thresholds(state)
        if calibrate_only:
            alarms = torch.zeros_like(steps)
        else:
            alarms = steps & (scores > thresholds[:, None])
        new_state = AlarmState(
            # An alarmed row counts at the scale it was judged by: a long fault does not widen
            # the scale over itself, and normal rows are not thinned of their largest squares.
            *self._scale_update(state, torch.where(alarms[..., None], square_mean[:, None, :], squares), finite),
            *self._history_update(state, standard, steps),
            self._calibration_update(state.calibration, torch.minimum(scores, self._held_max(state)[:, None]), steps),
            self._ends_in_alarm(state.in_alarm, alarms, steps),
        )
        return AlarmResult(scores, thresholds, alarms, new_state, self._episodes(alarms, scores, state.in_alarm))

    @staticmethod
    def _held_max(state: AlarmState) -> torch.Tensor:
        """Each line's largest held score (inf while it holds none)."""
        held = torch.nan_to_num(state.calibration, nan=-math.inf).max(1).values
        return torch.where(torch.isfinite(held), held, math.inf)

    def _mean_chart(self, standard: torch.Tensor, state: AlarmState) -> torch.Tensor:
        n = self.config.smoothing_rows
        joined = torch.cat([state.history, standard], dim=1)  # (B, n−1+T, S)
        totals = torch.cat([torch.zeros_like(joined[:, :1]), joined.cumsum(1)], dim=1)
        length = standard.shape[1]
        end = torch.arange(n, n + length)  # row t's window ends at joined position n−1+t
        sums = totals[:, end] - totals[:, end - n]
        # Rows in the window: those of this chunk so far plus the real history rows.
        counts = torch.clamp(torch.arange(1, length + 1)[None, :] + state.history_rows[:, None], max=n)
        means = sums / counts[..., None]
        return (counts[..., None] * means**2).mean(-1)

    def _scale_update(
        self, state: AlarmState, squares: torch.Tensor, used: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A running mean over the newest ~`calibration_rows` normal rows (exponential forgetting
        once that many are behind it)."""
        added = used.sum(1)  # (B, S)
        total = squares.where(used, 0.0).sum(1)
        rows = state.scale_rows[:, None].double()
        weight_old = torch.clamp(rows, max=self.config.calibration_rows)
        count = weight_old + added
        mean = torch.where(count > 0, (state.square_mean * weight_old + total) / count.clamp(min=1), state.square_mean)
        return mean, state.scale_rows + used.any(-1).sum(1)

    def _history_update(self, state: AlarmState, standard: torch.Tensor, steps: torch.Tensor):
        keep = self.config.smoothing_rows - 1
        if keep == 0:
            return state.history, state.history_rows
        joined = torch.cat([state.history, standard], dim=1)
        lengths = steps.sum(1)
        # Each line's last `keep` real rows: its rows are left-aligned, so they end at keep+len.
        index = lengths[:, None] + torch.arange(keep)[None, :]  # positions keep+len−keep … keep+len−1
        gathered = joined.gather(1, index[..., None].expand(-1, -1, joined.shape[-1]))
        return gathered, torch.clamp(state.history_rows + lengths, max=keep)

    def _calibration_update(self, calibration: torch.Tensor, scores: torch.Tensor, steps: torch.Tensor):
        """The newest `calibration_rows` scores, old ones first, then this chunk's."""
        capacity = calibration.shape[1]
        joined = torch.cat([calibration, torch.where(steps, scores, math.nan)], dim=1)
        valid = torch.isfinite(joined)
        newer = valid.flip(1).cumsum(1).flip(1)  # valid entries at or after each position
        keep = valid & (newer <= capacity)
        position = torch.arange(joined.shape[1]).expand_as(joined)
        picked = torch.topk(torch.where(keep, position, -1), capacity, dim=1).indices
        return torch.where(keep.gather(1, picked), joined.gather(1, picked), math.nan)

    @staticmethod
    def _ends_in_alarm(before: torch.Tensor, alarms: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        lengths = steps.sum(1)
        if alarms.shape[1] == 0:
            return before.clone()
        last = alarms.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]
        return torch.where(lengths > 0, last, before)

    @staticmethod
    def _episodes(alarms: torch.Tensor, scores: torch.Tensor, was_in_alarm: torch.Tensor) -> list[AlarmEpisode]:
        flags = alarms.to(torch.int8)
        edges = torch.diff(flags, dim=1, prepend=torch.zeros_like(flags[:, :1]), append=torch.zeros_like(flags[:, :1]))
        starts, stops = (edges == 1).nonzero().tolist(), (edges == -1).nonzero().tolist()
        episodes = []
        for (line, start), (_, stop) in zip(starts, stops, strict=True):
            peak = float(scores[line, start:stop].max())
            episodes.append(AlarmEpisode(line, start, stop - 1, peak, bool(start == 0 and was_in_alarm[line])))
        return episodes
