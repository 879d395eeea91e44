"""Online learning for the streaming forecaster: test-then-train from the carried state.

Each batch is first scored with the weights as they are (the forecasts and anomaly scores a
user sees were made before the model saw those rows), then learned from: truncated BPTT over
windows of `window` events, the state carried (detached) from window to window, each step's
loss mixed with windows replayed from a reservoir of the whole stream, plus an optional online
EWC penalty toward the last consolidated weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

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
    seed: int = 0

    def __post_init__(self) -> None:
        if self.learning_rate < 0:
            raise ValueError(f"LearnerConfig.learning_rate must be >= 0, got {self.learning_rate}")
        if self.window < 1 or self.epochs < 1:
            raise ValueError("LearnerConfig.window and epochs must be >= 1")
        if self.replay_batch < 0 or self.replay_weight < 0:
            raise ValueError("LearnerConfig.replay_batch and replay_weight must be >= 0")


@dataclass
class LearnStep:
    scored: ScoredSequence  # made before the update: test-then-train
    metrics: dict[str, float]


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
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=self.config.learning_rate, weight_decay=self.config.weight_decay
        )
        self.replay = ReservoirReplay(self.config.replay_capacity, self.config.seed)
        self.ewc = EWCPenalty(self.config.ewc_weight, self.config.ewc_decay)
        self.updates = 0

    # --- test ---------------------------------------------------------------------------
    @torch.no_grad()
    def score(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        state: RecurrentState | None = None,
        dt: torch.Tensor | None = None,
    ) -> ScoredSequence:
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model.score(inputs, targets, state, dt)
        finally:
            self.model.train(was_training)

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
        """Offers each row of a full-length training window to the replay reservoir."""
        if inputs.shape[1] != self.config.window:
            return
        for row in range(inputs.shape[0]):
            if not bool(mask[row].any()):
                continue
            # update_index tells when a window was seen, so a retraining can leave out
            # windows from data it must not learn from (a held-out slice).
            window = {
                "inputs": inputs[row],
                "future": future[row],
                "mask": mask[row],
                "update_index": torch.tensor(self.updates),
            }
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
    ) -> dict[str, float]:
        """Learns from one batch, starting from the state carried in before it.

        `updates` counts the calls; this one has index `updates` until it returns.
        """
        future, mask = forecast_targets(targets, self.model.config.horizon)
        return self.update_forecasts(inputs, future, mask, state, dt)

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
    ) -> dict[str, float]:
        """Learns from explicit forecast targets, for targets that do not simply follow `inputs`
        in the same batch: values that arrive later than the inputs, or only in part.

        future (B, T, horizon, n_targets): what the forecast made at each event is judged on;
        mask (same shape, bool): which of those values may be learned from.
        """
        future, mask = self._checked_targets(inputs, future, mask)
        start_state = (state or self.model.initial_state(inputs.shape[0], inputs.device)).detach()
        self.model.train()
        losses, replay_losses, penalties = [], [], []
        for epoch in range(self.config.epochs):
            carried = start_state
            for lo, hi in self._windows(inputs.shape[1]):
                window_dt = dt[:, lo:hi] if dt is not None else None
                forecast, next_state = self.model(inputs[:, lo:hi], carried, window_dt)
                loss = masked_mse(forecast, future[:, lo:hi], mask[:, lo:hi])
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
                    self._remember(inputs[:, lo:hi], future[:, lo:hi], mask[:, lo:hi], window_dt, carried)
                carried = next_state.detach()
        self.updates += 1
        return {
            "loss": _mean(losses),
            "replay_loss": _mean(replay_losses),
            "ewc_penalty": _mean(penalties),
            "windows": float(len(losses)),
            "replay_size": float(len(self.replay)),
        }

    def learn(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        state: RecurrentState | None = None,
        dt: torch.Tensor | None = None,
    ) -> LearnStep:
        """Test-then-train on one batch: score it, then update on it.

        The returned state is the one the scoring pass ends in; carry it into the next batch.
        """
        scored = self.score(inputs, targets, state, dt)
        metrics = self.update(inputs, targets, state, dt)
        metrics.update(forecast_error(scored.residuals))
        return LearnStep(scored, metrics)

    def consolidate(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        state: RecurrentState | None = None,
        dt: torch.Tensor | None = None,
    ) -> None:
        """EWC: estimates how much each weight matters on this batch and anchors the weights."""
        future, mask = forecast_targets(targets, self.model.config.horizon)
        self.consolidate_forecasts(inputs, future, mask, state, dt)

    def consolidate_forecasts(
        self,
        inputs: torch.Tensor,
        future: torch.Tensor,
        mask: torch.Tensor,
        state: RecurrentState | None = None,
        dt: torch.Tensor | None = None,
    ) -> None:
        """`consolidate` with explicit forecast targets, as in `update_forecasts`."""
        if self.config.ewc_weight <= 0:
            return
        future, mask = self._checked_targets(inputs, future, mask)
        start = (state or self.model.initial_state(inputs.shape[0], inputs.device)).detach()
        windows = self._windows(inputs.shape[1])
        states = [start]
        with torch.no_grad():
            for lo, hi in windows[:-1]:
                _, nxt = self.model(inputs[:, lo:hi], states[-1], dt[:, lo:hi] if dt is not None else None)
                states.append(nxt)

        def closure(lo: int, hi: int, carried: RecurrentState):
            window_dt = dt[:, lo:hi] if dt is not None else None
            return lambda: masked_mse(
                self.model(inputs[:, lo:hi], carried, window_dt)[0],
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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
