"""Online learning for the streaming forecaster: test-then-train from the carried state.

Each batch is first scored with the weights as they are (the forecasts and anomaly scores a
user sees were made before the model saw those rows), then learned from: truncated BPTT over
windows of `window` events, the state carried (detached) from window to window, each step's
loss mixed with windows replayed from a reservoir of the whole stream, plus an optional online
EWC penalty toward the last consolidated weights.

A batch may hold many sequences (B lines of a plant), right-padded to the longest and marked by
a step mask; one optimizer step then learns from all of them (or from groups of
`lines_per_step`, shuffled with the seed), and padding touches no state, score or loss.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lru_online.adamw import AdamW
from lru_online.ewc import EWCPenalty
from lru_online.model import LRUForecaster, ModelConfig, ScoredSequence
from lru_online.replay import ReservoirReplay
from lru_online.state import RecurrentState


@dataclass(frozen=True)
class LearnerConfig:
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    window: int = 64
    epochs: int = 1
    grad_clip: float | None = 1.0
    replay_capacity: int = 512
    replay_batch: int = 8
    replay_weight: float = 1.0
    ewc_weight: float = 0.0
    ewc_decay: float = 0.9
    # Sequences (lines) per optimizer step when a batch holds many; None: all in one step.
    lines_per_step: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.learning_rate < 0:
            raise ValueError(f"LearnerConfig.learning_rate must be >= 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"LearnerConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.window < 1 or self.epochs < 1:
            raise ValueError("LearnerConfig.window and epochs must be >= 1")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"LearnerConfig.grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.replay_capacity < 0 or self.replay_batch < 0 or self.replay_weight < 0:
            raise ValueError("LearnerConfig.replay_capacity, replay_batch and replay_weight must be >= 0")
        if self.ewc_weight < 0 or not 0.0 <= self.ewc_decay <= 1.0:
            raise ValueError("LearnerConfig.ewc_weight must be >= 0 and ewc_decay in [0, 1]")
        if self.lines_per_step is not None and self.lines_per_step < 1:
            raise ValueError(f"LearnerConfig.lines_per_step must be >= 1 or None, got {self.lines_per_step}")


@dataclass
class LearnStep:
    scored: ScoredSequence  # made before the update: test-then-train
    metrics: dict[str, float]


@dataclass(frozen=True)
class ScoringGraph:
    """A scoring forward's forecast with its autograd graph (OnlineLearner.score_for_update)."""

    forecast: torch.Tensor  # (B, T, horizon, targets), requires grad
    updates: int  # the learner's update count when it was made: valid while no update ran since


def forecast_targets(targets: torch.Tensor, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The values each event's forecast is judged on, and where they exist.

    targets (B, T, n) → (B, T, horizon, n) with [t, k] = targets[t + 1 + k], and a bool mask
    (B, T, horizon, n), false beyond the end of the sequence or where the target is missing.
    """
    batch, length, n_targets = targets.shape
    padded = torch.cat([targets, targets.new_full((batch, horizon, n_targets), float("nan"))], dim=1)
    future = torch.stack([padded[:, 1 + k : 1 + k + length] for k in range(horizon)], dim=2)
    mask = torch.isfinite(future)
    return torch.nan_to_num(future, nan=0.0, posinf=0.0, neginf=0.0), mask


def masked_mse(forecast: torch.Tensor, future: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    count = mask.sum()
    if count == 0:
        return forecast.sum() * 0.0
    return ((forecast - future) ** 2 * mask).sum() / count


class OnlineLearner:
    def __init__(self, model: LRUForecaster, config: LearnerConfig | None = None) -> None:
        self.model = model
        self.config = config or LearnerConfig()
        self.optimizer = AdamW(model.parameters(), lr=self.config.learning_rate, weight_decay=self.config.weight_decay)
        self.replay = ReservoirReplay(self.config.replay_capacity, self.config.seed)
        self.ewc = EWCPenalty(self.config.ewc_weight, self.config.ewc_decay)
        self.updates = 0

    def set_learning_rate(self, value: float) -> None:
        """Changes the optimizer's learning rate in place (its moments are kept): a fit at one
        rate, then online updates at a smaller one."""
        for group in self.optimizer.param_groups:
            group["lr"] = value

    # --- test ---------------------------------------------------------------------------
    def score(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        state: RecurrentState | None = None,
        dt: torch.Tensor | None = None,
        steps: torch.Tensor | None = None,
    ) -> ScoredSequence:
        return self._score(inputs, targets, state, dt, steps, keep_graph=False)[0]

    def score_for_update(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        state: RecurrentState | None = None,
        dt: torch.Tensor | None = None,
        steps: torch.Tensor | None = None,
    ) -> tuple[ScoredSequence, ScoringGraph | None]:
        """`score`, and, when the update of this batch will run the very same forward (all its
        rows in one window and one optimizer step, no dropout: a plant file of many short
        lines), that forward's forecast with its autograd graph, for `update(..., scoring=)` to
        learn from instead of running the forward again (a third of an update's time)."""
        return self._score(inputs, targets, state, dt, steps, keep_graph=self._one_forward(*inputs.shape[:2]))

    def _one_forward(self, lines: int, length: int, lines_per_step: int | None = None) -> bool:
        """Whether an update over (lines, length) is one forward from the carried state, the one
        scoring runs (scoring is in eval mode: equal only without dropout)."""
        per_step = lines_per_step or self.config.lines_per_step
        one_step = per_step is None or per_step >= lines
        return length <= self.config.window and one_step and not self.model.config.dropout

    def _score(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        state: RecurrentState | None,
        dt: torch.Tensor | None,
        steps: torch.Tensor | None,
        keep_graph: bool,
    ) -> tuple[ScoredSequence, ScoringGraph | None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.set_grad_enabled(keep_graph):
                scored = self.model.score(inputs, targets, state, dt, steps)
        finally:
            self.model.train(was_training)
        if not keep_graph:
            return scored, None
        detached = ScoredSequence(
            scored.forecast.detach(), scored.residuals.detach(), scored.scores.detach(), scored.state.detach()
        )
        return detached, ScoringGraph(scored.forecast, self.updates)

    # --- train --------------------------------------------------------------------------
    def _windows(self, length: int) -> list[tuple[int, int]]:
        size = self.config.window
        return [(start, min(start + size, length)) for start in range(0, length, size)]

    def _replay_loss(self) -> torch.Tensor | None:
        picked = self.replay.sample(self.config.replay_batch)
        if not picked:
            return None
        layers = len(self.model.state_sizes)
        state = RecurrentState([torch.stack([w[f"hidden.{i}"] for w in picked]) for i in range(layers)])
        dt = None
        if any("dt" in w for w in picked):
            dt = torch.stack([w.get("dt", torch.ones_like(w["inputs"][:, 0])) for w in picked])
        inputs = torch.stack([w["inputs"] for w in picked])
        forecast, _ = self.model(inputs, state, dt)
        return masked_mse(
            forecast,
            torch.stack([w["future"] for w in picked]),
            torch.stack([w["mask"] for w in picked]),
        )

    def _remember(
        self,
        inputs: torch.Tensor,
        future: torch.Tensor,
        mask: torch.Tensor,
        dt: torch.Tensor | None,
        state: RecurrentState,
    ) -> None:
        """Offers each row of a training window to the replay reservoir.

        A window shorter than `window` (a short batch, or a line's last events) is right-padded
        to full length with its targets masked, so replayed windows stack; short batches thus
        keep refreshing the reservoir instead of never reaching it.
        """
        missing = self.config.window - inputs.shape[1]
        if missing > 0:
            inputs = nn.functional.pad(inputs, (0, 0, 0, missing))
            future = nn.functional.pad(future, (0, 0, 0, 0, 0, missing))
            mask = nn.functional.pad(mask, (0, 0, 0, 0, 0, missing))
            dt = nn.functional.pad(dt, (0, missing)) if dt is not None else None
        useful = mask.flatten(1).any(1).tolist()
        # update_index tells when a window was seen, so a retraining can leave out windows
        # from data it must not learn from (a held-out slice); the reservoir copies what it keeps.
        update_index = torch.tensor(self.updates)
        for row, keep in enumerate(useful):
            if not keep:
                continue
            window = {"inputs": inputs[row], "future": future[row], "mask": mask[row], "update_index": update_index}
            if dt is not None:
                window["dt"] = dt[row]
            for index, h in enumerate(state.hidden):
                window[f"hidden.{index}"] = h[row]
            self.replay.add(window)

    def forget_replay_from(self, update_index: int) -> None:
        """Drops replay windows stored at or after the given update (see `updates`)."""
        self.replay.windows = [w for w in self.replay.windows if int(w["update_index"]) < update_index]

    def update(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        state: RecurrentState | None = None,
        dt: torch.Tensor | None = None,
        steps: torch.Tensor | None = None,
        lines_per_step: int | None = None,
        scoring: ScoringGraph | None = None,
    ) -> dict[str, float]:
        """Learns from one batch, starting from the state carried in before it.

        `updates` counts the calls; this one has index `updates` until it returns.
        `lines_per_step` overrides the configured one for this call. `scoring`: what
        `score_for_update` kept of this batch's scoring forward (same inputs, state, dt, steps).
        """
        future, mask = forecast_targets(_padding_to_nan(targets, steps), self.model.config.horizon)
        return self.update_forecasts(inputs, future, mask, state, dt, steps, lines_per_step, scoring)

    def _checked_targets(
        self, inputs: torch.Tensor, future: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Explicit targets with their shape checked; a missing value is masked out and zeroed."""
        expected = (*inputs.shape[:2], self.model.config.horizon, self.model.config.n_targets)
        if tuple(future.shape) != expected or tuple(mask.shape) != expected:
            raise ValueError(f"future and mask must be {expected}, got {tuple(future.shape)} and {tuple(mask.shape)}")
        return torch.nan_to_num(future, nan=0.0, posinf=0.0, neginf=0.0), mask & torch.isfinite(future)

    def update_forecasts(
        self,
        inputs: torch.Tensor,
        future: torch.Tensor,
        mask: torch.Tensor,
        state: RecurrentState | None = None,
        dt: torch.Tensor | None = None,
        steps: torch.Tensor | None = None,
        lines_per_step: int | None = None,
        scoring: ScoringGraph | None = None,
    ) -> dict[str, float]:
        """Learns from explicit forecast targets, for targets that do not simply follow `inputs`
        in the same batch: values that arrive later than the inputs, or only in part.

        future (B, T, horizon, n_targets): what the forecast made at each event is judged on;
        mask (same shape, bool): which of those values may be learned from; steps: optional
        (B, T) bool, False at padding (no loss is taken there). `scoring`: as in `update`.
        """
        future, mask = self._checked_targets(inputs, future, mask)
        reused = self._reusable(scoring, inputs, lines_per_step)
        if steps is not None:
            mask = mask & steps[:, :, None, None]
        start_state = (state or self.model.initial_state(inputs.shape[0], inputs.device)).detach()
        self.model.train()
        losses, replay_losses, penalties = [], [], []
        for epoch in range(self.config.epochs):
            for rows in self._line_groups(inputs.shape[0], lines_per_step or self.config.lines_per_step):
                carried = start_state if rows is None else start_state.select_rows(rows)

                def pick(tensor: torch.Tensor | None, rows=rows) -> torch.Tensor | None:
                    return tensor if tensor is None or rows is None else tensor[rows]

                group_inputs, group_future, group_mask = pick(inputs), pick(future), pick(mask)
                group_dt, group_steps = pick(dt), pick(steps)
                for lo, hi in self._windows(inputs.shape[1]):
                    window_dt = group_dt[:, lo:hi] if group_dt is not None else None
                    window_steps = group_steps[:, lo:hi] if group_steps is not None else None
                    if reused is not None and epoch == 0:  # the weights have not moved yet
                        forecast, next_state = reused, None
                    else:
                        forecast, next_state = self.model(group_inputs[:, lo:hi], carried, window_dt, window_steps)
                    loss = masked_mse(forecast, group_future[:, lo:hi], group_mask[:, lo:hi])
                    total = loss
                    losses.append(loss.item())
                    if self.config.replay_weight > 0:
                        replayed = self._replay_loss()
                        if replayed is not None:
                            total = total + self.config.replay_weight * replayed
                            replay_losses.append(replayed.item())
                    if self.ewc.active:
                        penalty = self.ewc.penalty(self.model)
                        total = total + penalty
                        penalties.append(penalty.item())
                    self.optimizer.zero_grad(set_to_none=True)
                    total.backward()
                    if self.config.grad_clip:
                        nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
                    self.optimizer.step()
                    if epoch == 0:
                        self._remember(
                            group_inputs[:, lo:hi], group_future[:, lo:hi], group_mask[:, lo:hi], window_dt, carried
                        )
                    if next_state is not None:  # None: the batch's only window
                        carried = next_state.detach()
        self.updates += 1
        return {
            "loss": _mean(losses),
            "replay_loss": _mean(replay_losses),
            "ewc_penalty": _mean(penalties),
            "windows": float(len(losses)),
            "replay_size": float(len(self.replay)),
        }

    def _reusable(
        self, scoring: ScoringGraph | None, inputs: torch.Tensor, lines_per_step: int | None
    ) -> torch.Tensor | None:
        """The kept scoring forecast, after checking that this update is that very forward."""
        if scoring is None:
            return None
        lines, length = inputs.shape[:2]
        if scoring.updates != self.updates or scoring.forecast.shape[:2] != (lines, length):
            raise ValueError("the scoring graph is of another batch or of weights an update has changed since")
        if not self._one_forward(lines, length, lines_per_step):
            raise ValueError("the scoring graph serves an update of one window and one step only")
        return scoring.forecast

    def _line_groups(self, lines: int, size: int | None) -> list[torch.Tensor | None]:
        """Rows of each optimizer step: all at once (None), or shuffled groups of `size`, the
        shuffle drawn from the seed and the update count."""
        if size is None or size >= lines:
            return [None]
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.updates)
        order = torch.randperm(lines, generator=generator)
        return list(order.split(size))

    def learn(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        state: RecurrentState | None = None,
        dt: torch.Tensor | None = None,
        steps: torch.Tensor | None = None,
    ) -> LearnStep:
        """Test-then-train on one batch: score it, then update on it.

        Every row is scored by the weights as they were before this batch, so a row's scores
        do not depend on the other rows or their order. The returned state is the one the
        scoring pass ends in; carry it into the next batch.
        """
        scored, scoring = self.score_for_update(inputs, targets, state, dt, steps)
        metrics = self.update(inputs, targets, state, dt, steps, scoring=scoring)
        metrics.update(forecast_error(scored.residuals))
        return LearnStep(scored, metrics)

    def consolidate(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        state: RecurrentState | None = None,
        dt: torch.Tensor | None = None,
        steps: torch.Tensor | None = None,
    ) -> None:
        """EWC: estimates how much each weight matters on this batch and anchors the weights."""
        future, mask = forecast_targets(_padding_to_nan(targets, steps), self.model.config.horizon)
        self.consolidate_forecasts(inputs, future, mask, state, dt, steps)

    def consolidate_forecasts(
        self,
        inputs: torch.Tensor,
        future: torch.Tensor,
        mask: torch.Tensor,
        state: RecurrentState | None = None,
        dt: torch.Tensor | None = None,
        steps: torch.Tensor | None = None,
    ) -> None:
        """`consolidate` with explicit forecast targets, as in `update_forecasts`."""
        if self.config.ewc_weight <= 0:
            return
        future, mask = self._checked_targets(inputs, future, mask)
        if steps is not None:
            mask = mask & steps[:, :, None, None]
        start = (state or self.model.initial_state(inputs.shape[0], inputs.device)).detach()
        windows = self._windows(inputs.shape[1])

        def window_of(tensor: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
            return tensor[:, lo:hi] if tensor is not None else None

        states = [start]
        with torch.no_grad():
            for lo, hi in windows[:-1]:
                _, nxt = self.model(inputs[:, lo:hi], states[-1], window_of(dt, lo, hi), window_of(steps, lo, hi))
                states.append(nxt)

        def closure(lo: int, hi: int, carried: RecurrentState):
            return lambda: masked_mse(
                self.model(inputs[:, lo:hi], carried, window_of(dt, lo, hi), window_of(steps, lo, hi))[0],
                future[:, lo:hi],
                mask[:, lo:hi],
            )

        self.ewc.consolidate(self.model, [closure(lo, hi, s) for (lo, hi), s in zip(windows, states, strict=True)])

    # --- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model_config": self.model.config.to_dict(),
            "learner_config": asdict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "replay": self.replay.state_dict(),
            "ewc": self.ewc.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.replay.load_state_dict(state["replay"])
        self.ewc.load_state_dict(state["ewc"])
        self.updates = int(state["updates"])

    def save_checkpoint(self, path: str | Path) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> OnlineLearner:
        """Restores model, optimizer and learner state; refuses anything but plain tensors and data."""
        state = torch.load(path, map_location=map_location, weights_only=True)
        learner = cls(
            LRUForecaster(ModelConfig(**state["model_config"])),
            LearnerConfig(**state["learner_config"]),
        )
        learner.load_state_dict(state)
        return learner


def forecast_error(residuals: torch.Tensor) -> dict[str, float]:
    """MAE and RMSE of one-step residuals, ignoring events with no forecast."""
    finite = residuals[torch.isfinite(residuals)]
    if finite.numel() == 0:
        return {"mae_before": math.nan, "rmse_before": math.nan}
    return {
        "mae_before": float(finite.abs().mean()),
        "rmse_before": float(finite.pow(2).mean().sqrt()),
    }


def _padding_to_nan(targets: torch.Tensor, steps: torch.Tensor | None) -> torch.Tensor:
    """Targets at padded steps become missing, so no forecast is judged against them."""
    return targets if steps is None else targets.masked_fill(~steps.unsqueeze(-1), float("nan"))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def lines_per_step_for(lines: int, steps_per_window: int) -> int:
    """Lines per optimizer step that give `steps_per_window` steps per window of time: one line
    a step for a small fleet, as many as it takes for a large one."""
    return max(1, math.ceil(lines / steps_per_window))
