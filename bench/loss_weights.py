"""Online combination of forecasters by their recent losses (the idea of OneNet, Wen et al.,
NeurIPS 2023: run several forecasters side by side and weight them online by how they have just
done, so the combination follows whichever carries over to the stream at hand).

For each horizon step and column separately, forecaster k's recent loss L_k is the
exponentially weighted mean of its squared errors on the windows learned so far (`half_life`
in windows), and its weight is softmax(-temperature · L_k / mean_j L_j): scale-free, uniform at
temperature 0, following the leader as it grows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CombineConfig:
    half_life: float = 12.0  # windows after which a loss counts half
    temperature: float = 8.0

    def __post_init__(self) -> None:
        if self.half_life <= 0 or self.temperature < 0:
            raise ValueError(f"CombineConfig: half_life > 0 and temperature >= 0 needed, got {self}")


class LossWeights:
    """Weights of K forecasters, per horizon step and column, from their recent losses."""

    def __init__(self, losses: np.ndarray, config: CombineConfig) -> None:
        """losses (K, H, C): each forecaster's starting loss (e.g. on the validation rows)."""
        self.losses = np.asarray(losses, dtype=np.float64).copy()
        self.config = config
        self.decay = 0.5 ** (1.0 / config.half_life)

    def weights(self) -> np.ndarray:
        """(K, H, C), summing to 1 over K."""
        relative = self.losses / np.maximum(self.losses.mean(axis=0, keepdims=True), 1e-12)
        logits = -self.config.temperature * relative
        logits -= logits.max(axis=0, keepdims=True)
        weights = np.exp(logits)
        return weights / weights.sum(axis=0, keepdims=True)

    def combine(self, forecasts: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """(K, H, C) forecasts → (H, C), by the current weights unless given."""
        return np.einsum("khc,khc->hc", self.weights() if weights is None else weights, forecasts)

    def observe(self, forecasts: np.ndarray, truth: np.ndarray) -> None:
        """One learned window: the K forecasts made for it (K, H, C) and its target (H, C)."""
        self.losses = self.decay * self.losses + (1.0 - self.decay) * (forecasts - truth[None]) ** 2
