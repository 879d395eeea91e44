"""Cross-sensor consistency: each sensor of a line predicted from the line's other sensors in the
same row, for what a one-step forecaster misses.

A forecaster sees a stuck or offset sensor on its first row only: from the next row on its input
holds the stuck value and its forecast follows it. The other sensors of the same row do not: a
pressure that jumps while the flow and current that drive it stay where they were is
inconsistent for as long as it lasts. Per line and sensor s, an exponentially weighted least
squares regression of s on the line's other sensors in the same row (each the latest reading,
carried forward) and an intercept gives the residual y_s − ŷ_s. With one sensor it is the
intercept alone: the reading against its own recent level, which a level shift passes for as
long as the level takes to be learned.

The statistics forget at 1 − 1/`memory_rows` per row, so a changed relation between the sensors
(a new valve) is learned within about that many rows. A row whose residual passes `huber`
times the sensor's residual scale enters with weight huber·scale/|residual|, and into the scale
at most `scale_clip` scales large, so a fault teaches the regression little while it lasts.
Rows are taken `block_rows` at a time, each block predicted by the weights the rows before it
left (test-then-train), all lines at once. The regression is a ridge one (`ridge`); its
residuals are reported once it has seen `memory_rows` readings of the sensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lru_online import codec


@dataclass(frozen=True)
class ConsistencyConfig:
    memory_rows: int = 100  # 1/(1 − λ): rows behind the weights
    ridge: float = 1.0  # added to the diagonal of each regression's normal equations
    huber: float = 4.0  # residuals beyond this many scales count with weight huber·scale/|residual|
    # A residual enters the scale at most this many scales large: under a lasting change the
    # scale grows by a few per cent a row, so a stuck sensor stays visible for a hundred rows
    # or more while a changed relation is still learned in the end.
    scale_clip: float = 2.0
    block_rows: int = 4  # rows predicted by the same weights
    scale_rows: int = 200  # rows behind each sensor's residual scale

    def __post_init__(self) -> None:
        if self.memory_rows < 2 or self.block_rows < 1 or self.scale_rows < 1:
            raise ValueError("ConsistencyConfig: memory_rows >= 2, block_rows >= 1 and scale_rows >= 1")
        if self.ridge <= 0 or self.huber <= 0 or self.scale_clip <= 0:
            raise ValueError("ConsistencyConfig: ridge, huber and scale_clip must be positive")


@dataclass
class ConsistencyState:
    """What each of B lines carries, for S sensors; regression s has inputs "the other sensors,
    with s's own place holding the intercept"."""

    gram: torch.Tensor  # (B, S, S, S) weighted Σ u uᵀ of each sensor's regression
    moment: torch.Tensor  # (B, S, S) weighted Σ u y
    square_mean: torch.Tensor  # (B, S) residual scale² (running mean of Huber-clipped squares)
    rows: torch.Tensor  # (B, S) readings behind the scale
    last: torch.Tensor  # (B, S) each sensor's latest reading (NaN: none yet)

    @classmethod
    def fresh(cls, lines: int, sensors: int) -> ConsistencyState:
        zeros = torch.zeros(lines, sensors, dtype=torch.float64)
        return cls(
            torch.zeros(lines, sensors, sensors, sensors, dtype=torch.float64),
            torch.zeros(lines, sensors, sensors, dtype=torch.float64),
            torch.ones(lines, sensors, dtype=torch.float64),
            zeros.clone(),
            torch.full((lines, sensors), math.nan, dtype=torch.float64),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "gram": self.gram,
            "moment": self.moment,
            "square_mean": self.square_mean,
            "rows": self.rows,
            "last": self.last,
        }

    def select(self, index: int) -> ConsistencyState:
        return ConsistencyState(**{k: v[index : index + 1].clone() for k, v in self.tensors().items()})

    @staticmethod
    def cat(states: list[ConsistencyState]) -> ConsistencyState:
        return ConsistencyState(**{k: torch.cat([s.tensors()[k] for s in states]) for k in states[0].tensors()})

    def flat(self) -> torch.Tensor:
        """One line's state (B = 1) as one float32 vector: a fleet decodes one tensor per line."""
        if self.gram.shape[0] != 1:
            raise ValueError("ConsistencyState.flat stores one line; select it first")
        return self.flat_many()[0]

    def flat_many(self) -> torch.Tensor:
        """(B, consistency_values(S)) float32: each line's state as one vector."""
        lines = self.gram.shape[0]
        return torch.cat([v.reshape(lines, -1) for v in self.tensors().values()], dim=1).to(torch.float32)

    @classmethod
    def from_flat(cls, values: torch.Tensor, sensors: int) -> ConsistencyState:
        return cls.cat_flat(values[None], sensors)

    @classmethod
    def cat_flat(cls, values: torch.Tensor, sensors: int) -> ConsistencyState:
        """B lines' states from their `flat` vectors stacked (B, consistency_values(S))."""
        if values.shape[1] != consistency_values(sensors):
            raise codec.CodecError(
                f"a consistency state of {sensors} sensors has {consistency_values(sensors)} values, "
                f"not {values.shape[1]}"
            )
        parts, start = {}, 0
        for name, shape in _layout(sensors):
            count = math.prod(shape)
            parts[name] = values[:, start : start + count].reshape(len(values), *shape).to(torch.float64)
            start += count
        return cls(**parts)

    def to_bytes(self) -> bytes:
        return codec.encode({"values": self.flat()}, {"kind": "ConsistencyState", "sensors": self.gram.shape[1]})

    @classmethod
    def from_bytes(cls, data: bytes) -> ConsistencyState:
        tensors, meta = codec.decode(data)
        if meta.get("kind") != "ConsistencyState":
            raise codec.CodecError("state bytes do not hold a ConsistencyState")
        return cls.from_flat(tensors["values"], int(meta["sensors"]))


def _layout(sensors: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        ("gram", (sensors, sensors, sensors)),
        ("moment", (sensors, sensors)),
        ("square_mean", (sensors,)),
        ("rows", (sensors,)),
        ("last", (sensors,)),
    ]


def consistency_values(sensors: int) -> int:
    """How many numbers one line's state holds (0 without sensors)."""
    return sum(math.prod(shape) for _, shape in _layout(sensors)) if sensors else 0


def consistency_residuals(
    readings: torch.Tensor, state: ConsistencyState, steps: torch.Tensor, config: ConsistencyConfig
) -> tuple[torch.Tensor, ConsistencyState]:
    """Residuals (B, T, S) of B lines' readings (B, T, S; NaN where a sensor did not report or at
    padding) against the other sensors of their rows, and the state after them. `steps` (B, T)
    is False at padding. A line's result does not depend on the other lines of the batch."""
    readings = readings.to(torch.float64)
    lines, length, sensors = readings.shape
    steps = steps.to(torch.bool)
    present = torch.isfinite(readings) & steps[..., None]
    carried = _carried_forward(torch.where(present, readings, math.nan), state.last)
    decay = 1.0 - 1.0 / config.memory_rows
    gram, moment = state.gram.clone(), state.moment.clone()
    square_mean, rows = state.square_mean.clone(), state.rows.clone()
    residuals = torch.full_like(readings, math.nan)
    diagonal = torch.eye(sensors, dtype=torch.bool)
    ridge = config.ridge * torch.eye(sensors, dtype=torch.float64)
    for lo in range(0, length, config.block_rows):
        hi = min(lo + config.block_rows, length)
        weights = torch.linalg.solve(gram + ridge, moment[..., None])[..., 0]  # (B, S, S)
        inputs = torch.where(diagonal, 1.0, torch.nan_to_num(carried[:, lo:hi, None, :]))  # (B, k, S, S)
        predicted = (inputs * weights[:, None]).sum(-1)
        seen = present[:, lo:hi]
        block = torch.where(seen, readings[:, lo:hi] - predicted, math.nan)
        # A regression that has not yet seen `memory_rows` readings of its sensor is still
        # learning: its residuals are not reported (they would inflate the alarm's scales).
        residuals[:, lo:hi] = torch.where((rows >= config.memory_rows)[:, None, :], block, math.nan)
        scale = torch.sqrt(square_mean)[:, None, :]
        size = torch.nan_to_num(block).abs()
        weight = torch.where(seen, torch.clamp(config.huber * scale / size.clamp(min=1e-300), max=1.0), 0.0)
        # Each row's statistics decay by the line's rows after it in the block.
        after = seen.any(-1).flip(1).cumsum(1).flip(1) - seen.any(-1).long()  # (B, k)
        row_decay = decay ** after.double()
        weighted = weight * row_decay[..., None]  # (B, k, S)
        kept = decay ** seen.any(-1).sum(1).double()  # (B,)
        gram = kept[:, None, None, None] * gram + torch.einsum("bks,bksi,bksj->bsij", weighted, inputs, inputs)
        moment = kept[:, None, None] * moment + torch.einsum(
            "bks,bksi,bks->bsi", weighted, inputs, torch.nan_to_num(readings[:, lo:hi])
        )
        clipped = torch.minimum(size**2, (config.scale_clip**2) * square_mean[:, None, :])
        count = seen.sum(1).double()
        old = torch.clamp(rows, max=config.scale_rows)
        total = torch.where(seen, clipped, 0.0).sum(1)
        square_mean = torch.where(count > 0, (square_mean * old + total) / (old + count).clamp(min=1), square_mean)
        rows = rows + count
    last = _last_reading(torch.where(present, readings, math.nan), state.last)
    return residuals, ConsistencyState(gram, moment, square_mean, rows, last)


def _carried_forward(values: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(B, T, S): each reading, or the sensor's latest one before it (the carried `last` first)."""
    lines, length, sensors = values.shape
    joined = torch.cat([last[:, None, :], values], 1)
    index = torch.where(torch.isfinite(joined), torch.arange(length + 1)[None, :, None], 0)
    latest = torch.cummax(index, 1).values
    return joined.gather(1, latest)[:, 1:]


def _last_reading(values: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    return _carried_forward(values, last)[:, -1] if values.shape[1] else last.clone()
