"""The Numenta Anomaly Benchmark's scoring rules (NAB v1.1's sweeper), for detections given as rows.

A file of n rows with labelled windows [left, right] (row positions, inclusive):
- the first min(⌊0.15·n⌋, 750) rows are probationary: a detection there counts neither way;
- in a window only the first detection counts, worth A_TP·σ(p)/σ(−1), p = −(right − i + 1)/width
  its position against the window's right edge (width = right − left + 1), σ(x) = 2/(1+e^{5x}) − 1;
- a window without a detection costs A_FN;
- a detection outside every window costs A_FP before the first window, and A_FP·(−σ(d)) after
  one, d = |i − right_prev| / (width_prev − 1) its distance past the preceding window's right
  edge (NAB takes σ = −1 beyond d = 3).
A corpus score is the sum over files; normalised, 100·(S − S_null)/(S_perfect − S_null) with
S_null every window missed and S_perfect every window detected at its left edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# (A_TP, A_FP, A_FN) per profile, as NAB's config/profiles.json weights them.
PROFILES: dict[str, tuple[float, float, float]] = {
    "standard": (1.0, 0.11, 1.0),
    "low_fp": (1.0, 0.22, 1.0),
    "low_fn": (1.0, 0.11, 2.0),
}
PROBATION_SHARE = 0.15
PROBATION_CAP = 750


def scaled_sigmoid(position: float) -> float:
    """NAB's σ: near 1 well before a window's right edge, 0 at it, towards −1 after it."""
    if position > 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * position)) - 1.0


def probationary_rows(rows: int) -> int:
    return min(int(math.floor(PROBATION_SHARE * rows)), PROBATION_CAP)


@dataclass
class FileOutcome:
    """One file's detections matched against its windows: what every profile's score needs."""

    windows: int
    hit_worth: list[float] = field(default_factory=list)  # σ(p)/σ(−1) of each detected window
    false_positive_weights: list[float] = field(default_factory=list)  # −σ or 1 of each false detection

    @property
    def missed(self) -> int:
        return self.windows - len(self.hit_worth)

    @property
    def false_positives(self) -> int:
        return len(self.false_positive_weights)

    def score(self, profile: str) -> float:
        a_tp, a_fp, a_fn = PROFILES[profile]
        return a_tp * sum(self.hit_worth) - a_fp * sum(self.false_positive_weights) - a_fn * self.missed


def match_file(rows: int, windows: list[tuple[int, int]], detections: np.ndarray) -> FileOutcome:
    """Scores the detections (row positions, any order) of a file of `rows` rows against its
    windows (row positions, inclusive, not overlapping)."""
    windows = sorted(windows)
    for (_, right), (left, _) in zip(windows, windows[1:], strict=False):
        if left <= right:
            raise ValueError(f"NAB windows overlap at row {left}")
    probation = probationary_rows(rows)
    detections = np.unique(np.asarray(detections, dtype=np.int64))
    detections = detections[(detections >= probation) & (detections < rows)]
    outcome = FileOutcome(len(windows))
    max_tp = scaled_sigmoid(-1.0)
    inside = np.zeros(len(detections), dtype=bool)
    for left, right in windows:
        here = (detections >= left) & (detections <= right)
        inside |= here
        if here.any():
            first = int(detections[here][0])
            width = right - left + 1
            outcome.hit_worth.append(scaled_sigmoid(-(right - first + 1) / width) / max_tp)
    rights = np.array([right for _, right in windows], dtype=np.int64)
    widths = np.array([right - left + 1 for left, right in windows], dtype=np.int64)
    for row in detections[~inside]:
        before = np.searchsorted(rights, row) - 1  # the last window that ended before this row
        if before < 0:
            outcome.false_positive_weights.append(1.0)
        else:
            past = abs(int(row) - int(rights[before])) / max(int(widths[before]) - 1, 1)
            outcome.false_positive_weights.append(-scaled_sigmoid(past))
    return outcome


@dataclass
class CorpusScore:
    """File outcomes added up; `normalised(profile)` is NAB's 0 (no detection) to 100 (perfect)."""

    files: dict[str, FileOutcome] = field(default_factory=dict)

    def add(self, name: str, outcome: FileOutcome) -> None:
        self.files[name] = outcome

    def subset(self, names: list[str]) -> CorpusScore:
        return CorpusScore({n: self.files[n] for n in names if n in self.files})

    def raw(self, profile: str) -> float:
        return sum(outcome.score(profile) for outcome in self.files.values())

    def normalised(self, profile: str) -> float:
        a_tp, _, a_fn = PROFILES[profile]
        windows = sum(outcome.windows for outcome in self.files.values())
        null, perfect = -a_fn * windows, a_tp * windows
        return 100.0 * (self.raw(profile) - null) / (perfect - null) if windows else 0.0

    @property
    def detected(self) -> int:
        return sum(len(o.hit_worth) for o in self.files.values())

    @property
    def windows(self) -> int:
        return sum(o.windows for o in self.files.values())

    @property
    def false_positives(self) -> int:
        return sum(o.false_positives for o in self.files.values())
