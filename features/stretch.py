"""How far level changes have stretched a line's scaling unit beyond its row-to-row noise.

The scaler (features.scaling) standardises by the running std s of everything a line has
reported. A level that jumps and stays inflates s for good (a jump of D after a share p of the
rows adds p(1−p)·D² to the variance), and every later residual, read in its units, shrinks with
it: a server metric whose row noise is a hundredth of the jump then shows its faults tens of
times smaller than before, for as long as the line lives. The row-to-row noise d (the root of
the mean of half the squared differences of successive readings) grows with the line's noise
and bursts as s does, but a jump adds one difference to it. The ratio s/d against its value at
the line's `REFERENCE_STEPS`-th difference is the stretch: about 1 while a line's level varies
as it did against its noise (bursts and spikes move both), large after the level moved. The
alarms (lru_online.alarms, `level_stretch_cap`) read residuals multiplied back where it passes
a cap.

Like the scaler, the statistics run per line over the readings it learns (pandas' grouped
cumsum, every line of a file at once) and carry over from file to file. Sensors that enter as
their change, and lines whose scaling holds a baseline (`baseline_rows`), have a stretch of 1:
the first are differences already, the second cannot stretch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.scaling import last_observed

REFERENCE_STEPS = 100  # differences behind a line's reference ratio: its first steady estimate


@dataclass
class StepStatistics:
    """Per line and sensor, each (L, S): the differences learned, the mean of their half
    squares, the last reading learned (NaN: none) and the reference s/d (NaN: not yet)."""

    counts: np.ndarray
    square_means: np.ndarray
    last_readings: np.ndarray
    references: np.ndarray

    @classmethod
    def empty(cls, shape: tuple[int, int]) -> StepStatistics:
        return cls(np.zeros(shape), np.zeros(shape), np.full(shape, np.nan), np.full(shape, np.nan))


def level_stretch(
    readings: np.ndarray,
    stds: np.ndarray,
    line: np.ndarray,
    offsets: np.ndarray,
    carried: StepStatistics,
    columns: np.ndarray,
    latest: np.ndarray,
) -> tuple[np.ndarray, StepStatistics]:
    """The stretch (R, S) of each reading, 1 where not known, and the statistics after the batch.

    readings: (R, S) as the scaler learned them (NaN: absent); stds: (R, S) the scaler's std
    at each row (the one it was standardised by); line, offsets as in `standardize`; columns:
    (S,) bool, the sensors a stretch is measured for (others stay at 1 and carry nothing);
    latest: `latest_observed` of the readings' presence, which the builder has already.
    """
    readings = np.where(columns, readings, np.nan)
    present = ~np.isnan(readings)
    starts = offsets[:-1][line][:, None]
    # Each reading's previous one: in this batch, else the line's last carried reading.
    before = np.vstack([np.full((1, readings.shape[1]), -1), latest[:-1]])
    in_batch = before >= starts
    in_batch_reading = readings[np.where(in_batch, before, 0), np.arange(readings.shape[1])]
    previous = np.where(in_batch, in_batch_reading, carried.last_readings[line])
    stepped = present & ~np.isnan(previous)
    halves = np.where(stepped, (readings - np.where(stepped, previous, 0.0)) ** 2 / 2, 0.0)
    width = readings.shape[1]
    running = pd.DataFrame(np.concatenate([stepped.astype(np.float64), halves], 1)).groupby(line, sort=False).cumsum()
    running = running.to_numpy()
    count0 = carried.counts[line]
    counts = count0 + running[:, :width]
    with np.errstate(invalid="ignore", divide="ignore"):
        square_means = (count0 * carried.square_means[line] + running[:, width:]) / counts
        ratios = np.where(present & (square_means > 0) & (stds > 0), stds / np.sqrt(square_means), np.nan)

    # The reference: carried, or the ratio at the line's first row with enough differences.
    rows = np.arange(len(readings))[:, None]
    steady = (counts >= REFERENCE_STEPS) & ~np.isnan(ratios)
    never = len(readings)
    # Every line has rows in a batch, so each segment of the reduction is non-empty.
    first_steady = np.minimum.reduceat(np.where(steady, rows, never), offsets[:-1], axis=0)
    found = first_steady < never
    reference_found = np.where(found, ratios[np.where(found, first_steady, 0), np.arange(width)], np.nan)
    references_after = np.where(np.isnan(carried.references), reference_found, carried.references)
    reference = np.where(
        np.isnan(carried.references[line]) & (rows < first_steady[line]), np.nan, references_after[line]
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        stretch = np.where(~np.isnan(ratios) & (reference > 0), ratios / reference, 1.0)

    last = last_observed(latest, offsets)
    has = last >= 0
    pick = np.where(has, last, 0)
    cols = np.broadcast_to(np.arange(width), last.shape)
    after = StepStatistics(
        np.where(has, counts[pick, cols], carried.counts),
        np.where(has, np.nan_to_num(square_means[pick, cols]), carried.square_means),
        np.where(has, readings[pick, cols], carried.last_readings),
        references_after,
    )
    return stretch, after
