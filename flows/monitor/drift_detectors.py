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
# The kind of the records `encode_drift_states` writes (since, batches and runs in the body);
# "LineDrift" records, with them in the header, are the earlier layout.
LAYOUT_KIND = "LineDrift/2"


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
        """Pickle-free bytes (lru_online.codec); many lines at once: `encode_drift_states`."""
        return encode_drift_states([self])[0]

    @classmethod
    def from_bytes(cls, data: bytes | None) -> LineDrift:
        return decode_drift_states([data])[0]


def encode_drift_states(states: list[LineDrift]) -> list[bytes]:
    """Each line's state as bytes: one float64 row (MAEs, errors, readings) and one int64 row
    (since, batches, the runs) under a JSON header that holds only lengths and names, so the
    lines of a plant file, whose histories have the same lengths, share one header and are
    encoded together (codec.encode_lines) instead of one by one: a Python loop over thousands
    of lines per file was a third of the drift stage."""
    groups: dict[tuple, list[int]] = {}
    for index, state in enumerate(states):
        groups.setdefault(_layout(state), []).append(index)
    records: list[bytes] = [b""] * len(states)
    for layout, members in groups.items():
        maes, errors, readings, statistics, sensors = layout
        group = [states[i] for i in members]
        parts = [np.array([state.maes for state in group], dtype=np.float64).reshape(len(group), maes)]
        parts += [np.stack([state.errors[k] for state in group]).astype(np.float64) for k in range(len(errors))]
        parts += [
            np.stack([state.readings[k] for state in group]).astype(np.float64).reshape(len(group), -1)
            for k in range(len(readings))
        ]
        values = np.concatenate(parts, axis=1)
        counts = np.array(
            [
                [state.since, state.batches, *(state.runs[k].get(x, 0) for k in statistics for x in sensors)]
                for state in group
            ],
            dtype=np.int64,
        )
        meta = {
            # A kind of its own: a release that knows only the earlier layout refuses these
            # records by name ("do not hold a LineDrift") instead of misreading them.
            "kind": LAYOUT_KIND,
            "maes": maes,
            "errors": list(errors),
            "readings": [list(shape) for shape in readings],
            "statistics": list(statistics),
            "sensors": list(sensors),
        }
        encoded = codec.encode_lines({"values": torch.from_numpy(values), "counts": torch.from_numpy(counts)}, meta)
        for index, record in zip(members, encoded, strict=True):
            records[index] = record
    return records


def _layout(state: LineDrift) -> tuple:
    statistics = tuple(sorted(state.runs))
    sensors = tuple(sorted({s for runs in state.runs.values() for s in runs}))
    return (
        len(state.maes),
        tuple(len(e) for e in state.errors),
        tuple(r.shape for r in state.readings),
        statistics,
        sensors,
    )


def decode_drift_states(records: list[bytes | None]) -> list[LineDrift]:
    """The lines' states (a fresh one where a line has none), read once per layout
    (codec.decode_lines); records of the earlier layout, with since, batches and runs in the
    header, are read one by one as before."""
    states = [LineDrift() for _ in records]
    for group in codec.decode_lines(records):
        meta = group.meta
        if meta.get("kind") not in ("LineDrift", LAYOUT_KIND):
            raise codec.CodecError("drift state bytes do not hold a LineDrift")
        lines = len(group.lines)
        values = group.tensors["values"].numpy().reshape(lines, -1)
        if meta["kind"] == LAYOUT_KIND:
            counts = group.tensors["counts"].numpy().reshape(lines, -1).tolist()
            statistics, sensors = meta["statistics"], meta["sensors"]
        else:
            counts = [[meta["since"], meta["batches"], *(n for k in meta["runs"] for n in meta["runs"][k])]]
            statistics, sensors = list(meta["runs"]), meta["sensors"]
        start, end = 0, meta["maes"]
        maes = values[:, start:end].tolist()
        errors = []
        for length in meta["errors"]:
            start, end = end, end + length
            errors.append(values[:, start:end].astype(np.float32))
        readings = []
        for rows, columns in meta["readings"]:
            start, end = end, end + rows * columns
            readings.append(values[:, start:end].reshape(lines, rows, columns))
        width = len(sensors)
        for row, index in enumerate(group.lines):
            since, batches, *runs = counts[row]
            per_statistic = (runs[i * width : (i + 1) * width] for i in range(len(statistics)))
            states[index] = LineDrift(
                int(since),
                int(batches),
                maes[row],
                [e[row] for e in errors],
                [r[row] for r in readings],
                {k: dict(zip(sensors, n, strict=True)) for k, n in zip(statistics, per_statistic, strict=True)},
            )
    return states


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
    readings window, for the lines whose window is full (the others get no figures yet).
    Every figure is computed for all lines and sensors at once (a line's rows are contiguous,
    so its sums are segment sums) and handed out as Python floats, None where it does not
    exist (no readings)."""
    lines = [i for i, ok in enumerate(full) if ok]
    stats: list[dict] = [{} for _ in windows]
    if not lines:
        return stats
    arrays = [batch for i in lines for batch in windows[i]]
    sizes = np.array([sum(len(batch) for batch in windows[i]) for i in lines])
    line = np.repeat(np.arange(len(lines)), sizes)
    values = np.concatenate(arrays)
    # Consecutive readings of one batch of one line: the pairs the autocorrelation is read from.
    batch_of = np.repeat(np.arange(len(arrays)), [len(batch) for batch in arrays])
    follows = np.r_[False, batch_of[1:] == batch_of[:-1]]
    finite = np.isfinite(values)
    counts = _line_sums(finite.astype(np.float64), sizes)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = _line_sums(np.where(finite, values, 0.0), sizes) / counts
    references = reference.get("sensors", {})
    referenced = [column for column, sensor in enumerate(sensors) if sensor in references]
    names = [sensors[column] for column in referenced]
    shape = (len(lines), len(referenced))
    psis, kss, psi_limits, ks_limits = (np.empty(shape) for _ in range(4))
    if referenced:
        effective = _effective_readings(values[:, referenced], line, follows, counts[:, referenced], sizes)
    for position, column in enumerate(referenced):
        sensor_reference = references[sensors[column]]
        owner, observed = line[finite[:, column]], values[finite[:, column], column]
        psis[:, position] = grouped_psi(sensor_reference, observed, owner, len(lines))
        kss[:, position] = grouped_ks(sensor_reference, observed, owner, len(lines))
        bins, sample = len(sensor_reference["edges"]) + 1, len(sensor_reference["sample"])
        psi_limits[:, position] = psi_by_chance(bins, effective[:, position], settings.significance)
        ks_limits[:, position] = ks_by_chance(effective[:, position], sample, settings.significance)
    # Per figure: the sensors it has and each line's values, in the order the stats are stored.
    figures = {
        "psi": (names, _finite_or_none(psis)),
        "ks": (names, _finite_or_none(kss)),
        "mean": (sensors, _finite_or_none(means)),
        "psi_limit": (names, np.maximum(settings.psi_threshold, psi_limits).tolist()),
        "ks_limit": (names, np.maximum(settings.ks_threshold, ks_limits).tolist()),
    }
    for position, i in enumerate(lines):
        stats[i] = {name: dict(zip(keys, rows[position], strict=True)) for name, (keys, rows) in figures.items()}
    return stats


def _line_sums(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(lines, columns) sums of each line's contiguous rows of (rows, columns) `values`, one
    line per entry of `sizes`; 0 for a line without rows."""
    sums = np.zeros((len(sizes), values.shape[1]))
    present = sizes > 0
    if present.any():
        sums[present] = np.add.reduceat(values, (np.cumsum(sizes) - sizes)[present], axis=0)
    return sums


def _effective_readings(
    values: np.ndarray, line: np.ndarray, follows: np.ndarray, counts: np.ndarray, sizes: np.ndarray
) -> np.ndarray:
    """Per line and column, n(1 − ρ)/(1 + ρ) with ρ the lag-1 autocorrelation of its finite
    readings (pairs within a batch), in [1, n]; ρ ≤ 0 counts as independent. `line`: each
    row's line, `sizes`: each line's rows (contiguous)."""
    previous = np.vstack([np.full((1, values.shape[1]), np.nan), values[:-1]])
    pairs = follows[:, None] & np.isfinite(values) & np.isfinite(previous)
    size = _line_sums(pairs.astype(np.float64), sizes)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_c = _line_sums(np.where(pairs, values, 0.0), sizes) / size
        mean_p = _line_sums(np.where(pairs, previous, 0.0), sizes) / size
        current = np.where(pairs, values - mean_c[line], 0.0)
        before = np.where(pairs, previous - mean_p[line], 0.0)
        rho = _line_sums(current * before, sizes) / np.sqrt(
            _line_sums(current**2, sizes) * _line_sums(before**2, sizes)
        )
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


def _finite_or_none(values: np.ndarray) -> list:
    """The values as Python floats (nested lists for more dimensions), None where not finite."""
    return np.where(np.isfinite(values), values, None).tolist()


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
