"""Cross-sensor consistency (lru_online.consistency) against a plain numpy weighted least
squares written from its definition, a fleet batch against each line alone, chunked against
one pass, and what it is for: a stuck sensor stays inconsistent for as long as it is stuck."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lru_online.consistency import ConsistencyConfig, ConsistencyState, consistency_residuals


def _reference(readings: np.ndarray, config: ConsistencyConfig) -> np.ndarray:
    """One line (T, S): for each block of rows, each sensor's weights from every earlier row,
    w = argmin Σ λ^(age) h (y − w·u)² + ridge |w|², u the row's other readings carried forward
    with its own place holding 1, h the Huber weight its residual had when it was predicted."""
    rows, sensors = readings.shape
    decay = 1 - 1 / config.memory_rows
    carried = readings.copy()
    for s in range(sensors):
        for t in range(1, rows):
            if np.isnan(carried[t, s]):
                carried[t, s] = carried[t - 1, s]
    carried = np.nan_to_num(carried)
    out = np.full_like(readings, np.nan)
    history: list[tuple[int, int, np.ndarray, float, float]] = []  # row, sensor, u, y, weight
    square_mean, count = np.ones(sensors), np.zeros(sensors)
    for lo in range(0, rows, config.block_rows):
        hi = min(lo + config.block_rows, rows)
        weights = np.zeros((sensors, sensors))
        for s in range(sensors):
            gram, moment = config.ridge * np.eye(sensors), np.zeros(sensors)
            for t, sensor, u, y, h in history:
                if sensor == s:
                    age = sum(1 for r in range(t + 1, lo))
                    gram += h * decay**age * np.outer(u, u)
                    moment += h * decay**age * u * y
            weights[s] = np.linalg.solve(gram, moment)
        block_squares: list[list[float]] = [[] for _ in range(sensors)]
        for t in range(lo, hi):
            for s in range(sensors):
                if np.isnan(readings[t, s]):
                    continue
                u = carried[t].copy()
                u[s] = 1.0
                residual = readings[t, s] - weights[s] @ u
                out[t, s] = residual
                scale = math.sqrt(square_mean[s])
                h = min(1.0, config.huber * scale / max(abs(residual), 1e-300))
                history.append((t, s, u, readings[t, s], h))
                block_squares[s].append(min(residual**2, config.scale_clip**2 * square_mean[s]))
        for s in range(sensors):
            if block_squares[s]:
                old = min(count[s], config.scale_rows)
                square_mean[s] = (square_mean[s] * old + sum(block_squares[s])) / (old + len(block_squares[s]))
                count[s] += len(block_squares[s])
    return out


def _plant(rng: np.random.Generator, rows: int) -> np.ndarray:
    load = np.cumsum(rng.normal(0, 0.1, rows))
    noise = 0.1 * rng.normal(size=(rows, 3))
    return np.stack([load, 2 * load, -load], axis=1) + noise


def test_residuals_equal_a_weighted_least_squares_from_its_definition():
    config = ConsistencyConfig(memory_rows=20, block_rows=3, huber=2.0, ridge=0.5)
    rng = np.random.default_rng(0)
    readings = _plant(rng, 40)
    readings[rng.random(readings.shape) < 0.15] = np.nan  # sources that did not report
    readings[25, 1] += 8.0  # an outlier: it enters with a Huber weight
    got, _ = consistency_residuals(
        torch.tensor(readings[None]), ConsistencyState.fresh(1, 3), torch.ones(1, 40, dtype=torch.bool), config
    )
    expected = _reference(readings, config)
    # Reported once the sensor's regression has seen memory_rows readings (before its block).
    seen_before = np.concatenate([np.zeros((1, 3)), np.cumsum(~np.isnan(readings), axis=0)[:-1]])
    block_start = (np.arange(40) // config.block_rows) * config.block_rows
    expected[seen_before[block_start] < config.memory_rows] = np.nan
    assert got[0].numpy() == pytest.approx(expected, nan_ok=True, abs=1e-9)
    assert np.isfinite(got[0, 30:].numpy()).any()


def test_a_fleet_batch_equals_each_line_alone_and_chunks_equal_one_pass():
    config = ConsistencyConfig(memory_rows=30, block_rows=4)
    rng = np.random.default_rng(1)
    lengths = [40, 24, 32]
    lines = [_plant(rng, n) for n in lengths]
    padded = np.zeros((3, 40, 3))
    steps = torch.zeros(3, 40, dtype=torch.bool)
    for i, line in enumerate(lines):
        padded[i, : len(line)] = line
        steps[i, : len(line)] = True
    fleet, fleet_state = consistency_residuals(torch.tensor(padded), ConsistencyState.fresh(3, 3), steps, config)
    for i, line in enumerate(lines):
        alone, alone_state = consistency_residuals(
            torch.tensor(line[None]), ConsistencyState.fresh(1, 3), torch.ones(1, len(line), dtype=torch.bool), config
        )
        assert fleet[i, : len(line)].numpy() == pytest.approx(alone[0].numpy(), nan_ok=True)
        for name, value in alone_state.tensors().items():
            assert fleet_state.select(i).tensors()[name].numpy() == pytest.approx(value.numpy(), nan_ok=True)
        # In chunks of whole blocks, carrying the state, as one pass.
        state, parts = ConsistencyState.fresh(1, 3), []
        for lo in range(0, len(line), 8):
            chunk = torch.tensor(line[None, lo : lo + 8])
            part, state = consistency_residuals(chunk, state, torch.ones(1, chunk.shape[1], dtype=torch.bool), config)
            parts.append(part[0])
        restored = ConsistencyState.from_bytes(state.to_bytes())  # stored as float32
        assert torch.cat(parts).numpy() == pytest.approx(alone[0].numpy(), nan_ok=True)
        assert torch.allclose(restored.gram, state.gram, rtol=1e-6) and torch.equal(restored.rows, state.rows)


def test_a_stuck_sensor_stays_inconsistent_for_as_long_as_it_is_stuck():
    """The second sensor freezes 5 units above its value for 80 rows while the load that drives
    all three keeps moving: each of those rows' residuals stays far above the line's usual
    ones, though a forecaster fed the frozen value would predict it."""
    rng = np.random.default_rng(2)
    readings = _plant(rng, 600)
    readings[400:480, 1] = readings[400, 1] + 5.0
    residuals, _ = consistency_residuals(
        torch.tensor(readings[None]), ConsistencyState.fresh(1, 3), torch.ones(1, 600, dtype=torch.bool),
        ConsistencyConfig(),
    )
    stuck = residuals[0, 400:480, 1].abs()
    usual = residuals[0, 200:400, 1].abs()
    assert float(stuck.min()) > 5 * float(usual.quantile(0.99))


def test_a_changed_relation_is_learned_within_its_memory_and_one_sensor_is_its_own_level():
    rng = np.random.default_rng(3)
    readings = _plant(rng, 1200)
    readings[600:, 2] = 3.0 * readings[600:, 0] + 0.1 * rng.normal(size=600)  # a new valve
    residuals, _ = consistency_residuals(
        torch.tensor(readings[None]), ConsistencyState.fresh(1, 3), torch.ones(1, 1200, dtype=torch.bool),
        ConsistencyConfig(memory_rows=100),
    )
    before = float(residuals[0, 400:600, 2].abs().mean())
    assert float(residuals[0, 600:620, 2].abs().mean()) > 5 * before
    assert float(residuals[0, 1000:1200, 2].abs().mean()) < 2 * before
    level = np.concatenate([np.zeros(300), np.full(60, 4.0)])[:, None] + 0.1 * rng.normal(size=(360, 1))
    single, _ = consistency_residuals(
        torch.tensor(level[None]), ConsistencyState.fresh(1, 1), torch.ones(1, 360, dtype=torch.bool),
        ConsistencyConfig(memory_rows=100),
    )
    assert float(single[0, 300:330, 0].min()) > 2.0  # a level that jumps and stays is seen
