"""The drift detectors of every line of a file, from statistics each line carries.

Each line carries what its detectors need (`LineDrift`, stored with its other state), so a file
is checked without reading any earlier output back:
- ADWIN (river) over the line's per-event forecast errors of its last `adwin_batches` batches
  since the reset, firing when it detects a change while reading the newest batch;
- an error jump: the newest batch's MAE above `error_ratio_threshold` times the median MAE of
  the line's earlier batches since the reset (a control chart on the forecast error);
- PSI and KS of each sensor's readings over the line's last `window_batches` batches against
  the training reference, firing when one sensor exceeds its limit for `consecutive` batches
  in a row. The limit is the larger of the configured threshold and what a stationary line
  reaches by chance with probability `significance`, from the effective number of readings
  in the window: readings of a line that moves between operating regimes are strongly
  dependent (lag-1 autocorrelation ρ ≈ 0.95 on the simulator: 160 readings are worth about
  four), and PSI ≈ χ²(bins − 1)/n and KS ≈ Kolmogorov·√(1/n + 1/N) hold for n independent
  ones. With n_eff = n(1 − ρ)/(1 + ρ) (an AR(1) line's), a line whose regimes simply come and
  go stops looking drifted every few files.
A reset (a detection anywhere, or a retraining) restarts the error detectors and the runs; the
readings window is kept, as the reference it is compared with is replaced at the same time.
A file whose detections span a large share of its lines is one plant-wide change
(`plant_level`): one event naming the lines, not one per line.
PSI and KS run for all lines at once, per line, so a line's figures do not depend on which
other lines share the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import torch

from flows.settings import DriftSettings
from lru_online import codec

try:
    # ADWIN's window from river's core module, not from `river.drift`, whose package import pulls
    # river's datasets and scikit-learn in: 1.2 s of every command's start on 2 cores, for nothing
    # used here. A river laid out otherwise gets the public class (`_fresh_adwin`).
    from river._river_rust.drift import AdaptiveWindowing
except ImportError:  # depends on river's layout
    AdaptiveWindowing = None

# MAEs kept for the error jump's median: far more batches than a drift takes to show.
MAE_HISTORY = 1000
_EPS = 1e-4  # the floor of a bin's share in PSI


@dataclass
class LineDrift:
    """What one line's detectors carry from file to file."""

    since: int = 0  # the pipeline's reset sequence these statistics started after
    batches: int = 0  # batches seen since then
    maes: list[float] = field(default_factory=list)  # each batch's forecast MAE since then
    errors: list[np.ndarray] = field(default_factory=list)  # per-event errors, last adwin_batches batches
    readings: list[np.ndarray] = field(default_factory=list)  # (rows, sensors), last window_batches - 1
    runs: dict[str, dict[str, int]] = field(default_factory=dict)  # batches in a row over each threshold

    def restarted(self, since: int) -> LineDrift:
        """The state after a reset at `since`: error history and runs cleared, readings kept."""
        return LineDrift(since=since, readings=self.readings)

    def to_bytes(self) -> bytes:
        """Pickle-free bytes (lru_online.codec): one float64 buffer (MAEs, errors, readings) and
        a small JSON header with the lengths; a single tensor keeps a line's decode cheap."""
        statistics = sorted(self.runs)
        sensors = sorted({s for runs in self.runs.values() for s in runs})
        values = np.concatenate(
            [
                np.asarray(self.maes, dtype=np.float64),
                *(e.astype(np.float64) for e in self.errors),
                *(r.astype(np.float64).ravel() for r in self.readings),
            ]
        )
        meta = {
            "kind": "LineDrift",
            "since": self.since,
            "batches": self.batches,
            "maes": len(self.maes),
            "errors": [len(e) for e in self.errors],
            "readings": [list(r.shape) for r in self.readings],
            "runs": {k: [self.runs[k].get(s, 0) for s in sensors] for k in statistics},
            "sensors": sensors,
        }
        return codec.encode({"values": torch.from_numpy(values)}, meta)

    @classmethod
    def from_bytes(cls, data: bytes | None) -> LineDrift:
        if not data:
            return cls()
        tensors, meta = codec.decode(data)
        if meta.get("kind") != "LineDrift":
            raise codec.CodecError("drift state bytes do not hold a LineDrift")
        values = tensors["values"].numpy()
        start, end = 0, meta["maes"]
        maes = values[start:end].tolist()
        errors = []
        for length in meta["errors"]:
            start, end = end, end + length
            errors.append(values[start:end].astype(np.float32))
        readings = []
        for rows, columns in meta["readings"]:
            start, end = end, end + rows * columns
            readings.append(values[start:end].reshape(rows, columns))
        sensors = meta["sensors"]
        runs = {k: dict(zip(sensors, (int(n) for n in counts), strict=True)) for k, counts in meta["runs"].items()}
        return cls(int(meta["since"]), int(meta["batches"]), maes, errors, readings, runs)


@dataclass
class Detection:
    detector: str
    entity: str
    feature: str | None
    value: float
    threshold: float
    event_time: str


@dataclass
class LineCheck:
    """One line's drift figures for this file, its detections and what it carries on."""

    stats: dict  # {"psi": {sensor: v}, "ks": {...}, "mean": {...}}, empty before a full window
    detections: list[Detection]
    state: LineDrift


PLANT = "*plant*"  # the entity of a plant-level event


def plant_level(detections: list[dict], lines: int, settings: DriftSettings) -> list[dict]:
    """A file's detections (dicts of Detection's fields) as they are stored: one plant-level
    event when they span at least `plant_share` of the file's `lines` (and `plant_min_lines`),
    naming the lines and counting the detectors; else as they are, one per line and detector."""
    detecting = sorted({d["entity"] for d in detections})
    if not detecting or len(detecting) < max(settings.plant_min_lines, settings.plant_share * lines):
        return detections
    counts: dict[str, int] = {}
    for detection in detections:
        counts[detection["detector"]] = counts.get(detection["detector"], 0) + 1
    return [
        {
            "detector": "plant",
            "entity": PLANT,
            "feature": max(counts, key=counts.get),  # the detector that fired most
            "value": len(detecting) / lines,
            "threshold": settings.plant_share,
            "event_time": max(d["event_time"] for d in detections),
            "lines": detecting,
            "detectors": counts,
        }
    ]


def adwin_fires(event_errors: list[np.ndarray], delta: float, scale: float = 5.0) -> bool:
    """ADWIN over the per-event forecast errors of consecutive batches (oldest first): does it
    detect a change while reading the newest batch? Errors are clipped to [0, scale] and scaled
    to [0, 1], the range ADWIN's bound assumes.

    river's `ADWIN.update` starts a fresh window after a detection; this feeds its (Rust) window
    the same way, but from C (`any(map(...))` stops at a detection and leaves the iterator
    after it): a file of 2,000 lines replays about a million errors.
    """
    if not event_errors:
        return False
    older = np.concatenate([np.empty(0, np.float32), *event_errors[:-1]])
    older, newest = (np.clip(e[np.isfinite(e)], 0, scale) / scale for e in (older, event_errors[-1]))
    update = _fresh_adwin(delta)
    remaining = iter(older.tolist())
    while any(map(update, remaining)):  # a change inside an older batch: start afresh after it
        update = _fresh_adwin(delta)
    return any(map(update, newest.tolist()))


def _fresh_adwin(delta: float):
    """The update function of a new ADWIN window: river's own (Rust) window, as
    `river.drift.ADWIN(delta=delta, clock=1)` builds it, its other settings at their defaults."""
    if AdaptiveWindowing is None:
        from river.drift import ADWIN

        return ADWIN(delta=delta, clock=1)._helper.update
    return AdaptiveWindowing(delta=delta, clock=1, max_buckets=5, min_window_length=5, grace_period=10).update


def check_lines(
    entities: list[str],
    states: list[LineDrift],
    errors: list[np.ndarray],
    readings: list[np.ndarray],
    maes: list[float | None],
    event_times: list[str],
    reference: dict,
    sensors: tuple[str, ...],
    settings: DriftSettings,
    since: int,
) -> list[LineCheck]:
    """Runs every line's detectors on its newest batch.

    errors: each line's per-event forecast errors; readings: its raw readings (rows, sensors);
    maes: its batch MAE (None without a forecast); event_times: its last event; since: the
    pipeline's current reset sequence (a line whose statistics started earlier restarts).
    """
    states = [s if s.since == since else s.restarted(since) for s in states]
    keep = settings.window_batches - 1
    windows = [[*(s.readings[-keep:] if keep else []), new] for s, new in zip(states, readings, strict=True)]
    full = [len(w) == settings.window_batches for w in windows]
    stats = _window_stats(windows, full, reference, sensors, settings)

    checks = []
    for index, (entity, state) in enumerate(zip(entities, states, strict=True)):
        recent_errors = [*state.errors, errors[index]][-settings.adwin_batches :]
        mae = maes[index]
        history = state.maes + ([mae] if mae is not None else [])
        runs = {statistic: dict(state.runs.get(statistic, {})) for statistic in ("psi", "ks")}
        for statistic in ("psi", "ks"):
            for sensor in sensors:
                value = stats[index].get(statistic, {}).get(sensor)
                limit = stats[index].get(f"{statistic}_limit", {}).get(sensor)
                over = value is not None and limit is not None and value > limit
                runs[statistic][sensor] = runs[statistic].get(sensor, 0) + 1 if over else 0
        batches = state.batches + 1
        new_state = LineDrift(
            since=since,
            batches=batches,
            maes=history[-MAE_HISTORY:],
            errors=recent_errors,
            readings=windows[index][-keep:] if keep else [],
            runs=runs,
        )
        found: list[Detection] = []
        if batches >= max(settings.cooldown_batches, 1):
            found = _detections(
                entity, event_times[index], recent_errors, mae, state.maes, stats[index], runs, settings
            )
        checks.append(LineCheck(stats[index], found, new_state))
    return checks


def _detections(
    entity: str,
    event_time: str,
    recent_errors: list[np.ndarray],
    mae: float | None,
    earlier: list[float],
    stats: dict,
    runs: dict[str, dict[str, int]],
    settings: DriftSettings,
) -> list[Detection]:
    found = []
    if adwin_fires(recent_errors, settings.adwin_delta):
        value = mae if mae is not None else float("nan")
        found.append(Detection("adwin_error", entity, None, value, settings.adwin_delta, event_time))
    if mae is not None and earlier:
        ratio = mae / max(float(np.median(earlier)), 1e-12)
        if ratio > settings.error_ratio_threshold:
            found.append(Detection("error_jump", entity, None, ratio, settings.error_ratio_threshold, event_time))
    for statistic in ("psi", "ks"):
        values, limits = stats.get(statistic, {}), stats.get(f"{statistic}_limit", {})
        for sensor in sorted(values):
            if runs[statistic].get(sensor, 0) >= settings.consecutive:
                value = float(values[sensor])
                found.append(Detection(statistic, entity, sensor, value, limits[sensor], event_time))
    return found


def _window_stats(
    windows: list[list[np.ndarray]],
    full: list[bool],
    reference: dict,
    sensors: tuple[str, ...],
    settings: DriftSettings,
) -> list[dict]:
    """PSI, KS, their limits (module docstring) and the mean of each sensor over each line's
    readings window, for the lines whose window is full (the others get no figures yet)."""
    lines = [i for i, ok in enumerate(full) if ok]
    stats: list[dict] = [{} for _ in windows]
    if not lines:
        return stats
    arrays = [batch for i in lines for batch in windows[i]]
    line = np.repeat(np.arange(len(lines)), [sum(len(batch) for batch in windows[i]) for i in lines])
    values = np.concatenate(arrays)
    # Consecutive readings of one batch of one line: the pairs the autocorrelation is read from.
    batch_of = np.repeat(np.arange(len(arrays)), [len(batch) for batch in arrays])
    follows = np.r_[False, batch_of[1:] == batch_of[:-1]]
    for i in lines:
        stats[i] = {"psi": {}, "ks": {}, "mean": {}, "psi_limit": {}, "ks_limit": {}}
    references = reference.get("sensors", {})
    for column, sensor in enumerate(sensors):
        finite = np.isfinite(values[:, column])
        owner, observed = line[finite], values[finite, column]
        counts = np.bincount(owner, minlength=len(lines))
        sums = np.bincount(owner, weights=observed, minlength=len(lines))
        with np.errstate(invalid="ignore", divide="ignore"):
            means = sums / counts
        # None where a figure does not exist (no readings): stored as JSON as it is. Each figure
        # is computed for all lines at once and handed out as Python floats.
        figures = {"mean": _finite_or_none(np.where(counts > 0, means, np.nan))}
        if sensor in references:
            effective = _effective_readings(values[:, column], line, follows, counts, len(lines))
            bins, sample = len(references[sensor]["edges"]) + 1, len(references[sensor]["sample"])
            psi_chance = psi_by_chance(bins, effective, settings.significance)
            ks_chance = ks_by_chance(effective, sample, settings.significance)
            figures["psi"] = _finite_or_none(grouped_psi(references[sensor], observed, owner, len(lines)))
            figures["ks"] = _finite_or_none(grouped_ks(references[sensor], observed, owner, len(lines)))
            figures["psi_limit"] = np.maximum(settings.psi_threshold, psi_chance).tolist()
            figures["ks_limit"] = np.maximum(settings.ks_threshold, ks_chance).tolist()
        for name, per_line in figures.items():
            for i, value in zip(lines, per_line, strict=True):
                stats[i][name][sensor] = value
    return stats


def _effective_readings(
    values: np.ndarray, line: np.ndarray, follows: np.ndarray, counts: np.ndarray, lines: int
) -> np.ndarray:
    """Per line, n(1 − ρ)/(1 + ρ) with ρ the lag-1 autocorrelation of its finite readings
    (pairs within a batch), in [1, n]; ρ ≤ 0 counts as independent."""
    finite = np.isfinite(values)
    pairs = follows & finite & np.r_[False, finite[:-1]]
    current, previous, owner = values[pairs], np.r_[np.nan, values[:-1]][pairs], line[pairs]
    size = np.bincount(owner, minlength=lines).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_c = np.bincount(owner, weights=current, minlength=lines) / size
        mean_p = np.bincount(owner, weights=previous, minlength=lines) / size
        cov = np.bincount(owner, weights=(current - mean_c[owner]) * (previous - mean_p[owner]), minlength=lines)
        var_c = np.bincount(owner, weights=(current - mean_c[owner]) ** 2, minlength=lines)
        var_p = np.bincount(owner, weights=(previous - mean_p[owner]) ** 2, minlength=lines)
        rho = cov / np.sqrt(var_c * var_p)
    rho = np.clip(np.nan_to_num(rho, nan=0.0), 0.0, 0.999)
    return np.clip(counts * (1 - rho) / (1 + rho), 1.0, np.maximum(counts, 1))


def psi_by_chance(bins: int, readings: float | np.ndarray, significance: float) -> float | np.ndarray:
    """The PSI that `readings` independent values (a count, or an array of counts) from the
    reference's own law pass with probability `significance`: χ²(bins − 1) at 1 − significance
    (Wilson–Hilferty) over n."""
    k = bins - 1
    z = NormalDist().inv_cdf(1.0 - significance)
    quantile = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
    return quantile / readings


def ks_by_chance(readings: float | np.ndarray, sample: int, significance: float) -> float | np.ndarray:
    """The KS distance between `readings` independent values (a count, or an array of counts)
    and a reference sample of `sample` from the same law that is passed with probability
    `significance`."""
    return math.sqrt(-math.log(significance / 2) / 2) * np.sqrt(1 / readings + 1 / max(sample, 1))


def _finite_or_none(values: np.ndarray) -> list[float | None]:
    return [value if math.isfinite(value) else None for value in values.tolist()]


def grouped_psi(reference: dict, values: np.ndarray, group: np.ndarray, groups: int) -> np.ndarray:
    """Population stability index of each group's finite values against the reference bins
    (`lru_online.drift.psi` for many groups at once; NaN for a group without values)."""
    edges = np.asarray(reference["edges"])
    bins = len(edges) + 1
    counts = np.bincount(group * bins + np.searchsorted(edges, values, side="left"), minlength=groups * bins)
    counts = counts.reshape(groups, bins)
    sizes = counts.sum(1, keepdims=True)
    expected = np.maximum(np.asarray(reference["fractions"]), _EPS)
    actual = np.maximum(counts / np.maximum(sizes, 1), _EPS)
    out = np.sum((actual - expected) * np.log(actual / expected), axis=1)
    return np.where(sizes[:, 0] > 0, out, np.nan)


def grouped_ks(reference: dict, values: np.ndarray, group: np.ndarray, groups: int) -> np.ndarray:
    """sup |F_ref - F_group| of each group's finite values against the reference sample
    (`lru_online.drift.ks_statistic` for many groups at once; NaN for a group without values).

    Both CDFs are right-continuous steps, so the supremum is reached at a value of either side;
    between two consecutive values of a group its CDF is flat, so it is enough to compare at
    each group value c both F(c) and the left limits F(c-).
    """
    sample = np.asarray(reference["sample"])
    if values.size == 0:
        return np.full(groups, np.nan)
    values, group = _sorted_within_groups(values, group, groups)
    sizes = np.bincount(group, minlength=groups)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    position = np.arange(len(values)) - starts[group]
    # Ties: F_group(c) counts every copy of c, F_group(c-) none of them.
    new_run = np.r_[True, (group[1:] != group[:-1]) | (values[1:] != values[:-1])]
    run = np.cumsum(new_run) - 1
    run_first = position[new_run]
    run_last = position[np.r_[np.flatnonzero(new_run)[1:] - 1, len(values) - 1]]
    size = sizes[group].astype(np.float64)
    at = (run_last[run] + 1) / size
    before = run_first[run] / size
    # F_ref(c) and F_ref(c-) from one search: they differ by the copies of c in the sample.
    right = np.searchsorted(sample, values, side="right")
    tied = (right > 0) & (sample[np.maximum(right - 1, 0)] == values)
    run_start = np.maximum.accumulate(np.where(np.r_[True, sample[1:] != sample[:-1]], np.arange(sample.size), 0))
    left = np.where(tied, run_start[np.maximum(right - 1, 0)], right)
    reference_at, reference_before = right / sample.size, left / sample.size
    gaps = np.maximum(np.abs(reference_at - at), np.abs(reference_before - before))
    present = sizes > 0
    out = np.full(groups, np.nan)
    out[present] = np.maximum.reduceat(gaps, starts[present])  # each group's rows are contiguous
    return out


def _sorted_within_groups(values: np.ndarray, group: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """The values grouped (groups in order) and ascending within each group."""
    if np.any(group[1:] < group[:-1]):
        order = np.argsort(group, kind="stable")
        values, group = values[order], group[order]
    sizes = np.bincount(group, minlength=groups)
    position = np.arange(len(values)) - np.concatenate([[0], np.cumsum(sizes)[:-1]])[group]
    if sizes.max() * groups <= 4 * len(values) + 4096:
        # Groups of similar size: one row each, sorted all at once (+inf pads the short ones).
        rows = np.full((groups, sizes.max()), np.inf)
        rows[group, position] = values
        rows.sort(axis=1)
        return rows[group, position], group
    order = np.argsort(values, kind="stable")
    order = order[np.argsort(group[order], kind="stable")]
    return values[order], group
