"""Alarms that many lines start at once, raised as one plant-level alarm.

Lines of one plant share what happens to all of them: a valve changed on every line, a new batch
of raw material, the supply voltage. The detector judges each row relative to the plant
(lru_online.alarms, `common_mode_lines`), but a change whose size differs from line to line
(one that scales with each line's load) still leaves most lines alarming together: on a
simulated plant of 60 lines, 54 started alarming within the first 20 of their rows of the file in
which every line's valve was changed. Each of those alarms is right about its line and useless to
an operator, who needs one alarm that says "the plant changed here", not 60 to acknowledge.

So when at least `share` of a part's lines (and `min_lines`) start alarming (a row that alarms
after one that did not) within `stretch_rows` rows of each other, their episodes form one
plant-level alarm. "Within" is read two ways, either enough: in time (`stretch_rows` typical row
spacings: a change at one moment on lines that share a clock, whatever their sampling rates),
and in positions among each line's own rows of the file (a change that came with the file on
lines whose clocks differ, as the simulator's do: their files start up to an hour apart).
Stretches that pass the bar and share an episode are one alarm. It names its lines; each line's
episode is still stored, pointing to it, and its rows keep their `anomaly` flag; the plant-level
alarm raises the one Prefect event. A line that was already alarming when the plant changed
counts once it starts again.

Why the bar holds on a plant that does not change: by chance, the share of lines starting to
alarm in one stretch follows each line's alarm rate (held near α by the detector), not the
number of lines; on the simulated tuning plants (seed 11, 60 lines) it was at most 0.22 in every
file but the valve change's (0.90), with and without drifts, read either way.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from flows.settings import PlantAlarmSettings


def plant_alarms(
    episodes: list[dict], lines: int, spacing_seconds: float, settings: PlantAlarmSettings
) -> tuple[list[dict], list[dict]]:
    """The part's plant-level alarms, and its episodes (flows.model.file_step.JudgedLines, with
    `onset_ns` and `onset_rows`) each with "plant": the index of its plant-level alarm or None.

    lines: the lines the part scored; spacing_seconds: their typical row spacing
    (lru_online.alarms.typical_spacing; 0 where not known: in time, only onsets at one instant
    are together).
    """
    marked = [{**episode, "plant": None} for episode in episodes]
    needed = max(settings.min_lines, math.ceil(settings.share * lines - 1e-9))
    owner = np.array([i for i, e in enumerate(episodes) for _ in e["onset_ns"]], dtype=np.int64)
    line = pd.factorize(pd.Series([e["entity"] for e in episodes]))[0][owner] if len(owner) else owner
    if len(set(line.tolist())) < needed:
        return [], marked
    times = np.array([t for e in episodes for t in e["onset_ns"]], dtype=np.int64)
    rows = np.array([r for e in episodes for r in e["onset_rows"]], dtype=np.int64)
    in_time = round(settings.stretch_rows * spacing_seconds * 1e9) if spacing_seconds > 0 else 0
    found = _together(times, line, in_time, needed) + _together(rows, line, settings.stretch_rows, needed)
    # Spans that share an episode are one alarm: its episodes, the onsets in its spans, the most
    # lines one stretch held.
    groups: list[tuple[set[int], set[int], int]] = []
    for onsets, densest in found:
        members, inside = set(owner[onsets].tolist()), set(onsets.tolist())
        for group in [g for g in groups if g[0] & members]:
            groups.remove(group)
            members, inside, densest = members | group[0], inside | group[1], max(densest, group[2])
        groups.append((members, inside, densest))
    alarms = []
    for members, inside, densest in sorted(groups, key=lambda g: times[list(g[1])].min()):
        for index in members:
            marked[index]["plant"] = len(alarms)
        onset = int(times[list(inside)].min())
        alarms.append(_plant_alarm([episodes[i] for i in sorted(members)], onset, densest, lines, settings))
    return alarms, marked


def _together(coordinate: np.ndarray, line: np.ndarray, stretch: float, needed: int) -> list[tuple[np.ndarray, int]]:
    """Spans of onsets where at least `needed` lines start within `stretch` of each other (on
    `coordinate`): per span, the onsets in it and the most lines any one stretch held."""
    order = np.argsort(coordinate, kind="stable")
    at, line = coordinate[order], line[order]
    # The stretch starting at each onset holds the onsets up to `stretch` later; it counts the
    # lines whose previous onset (if any) lies before its start, so each line once.
    previous = pd.Series(np.arange(len(at))).groupby(line).shift(1).fillna(-1).to_numpy()
    ends = np.searchsorted(at, at + stretch, side="right")
    counts = np.array([int((previous[i:end] < i).sum()) for i, end in enumerate(ends)])
    passing = np.flatnonzero(counts >= needed)
    spans = []
    first = 0
    while first < len(passing):  # passing stretches that overlap are one span
        last = first
        while last + 1 < len(passing) and at[passing[last + 1]] <= at[passing[last]] + stretch:
            last += 1
        spans.append((order[passing[first] : ends[passing[last]]], int(counts[passing[first : last + 1]].max())))
        first = last + 1
    return spans


def _plant_alarm(members: list[dict], onset_ns: int, densest: int, lines: int, settings: PlantAlarmSettings) -> dict:
    """The plant-level alarm of these episodes: from its first onset to the last one's end."""
    ends = pd.to_datetime([m["end_ts"] for m in members], utc=True, format="ISO8601")
    return {
        "start_ts": pd.Timestamp(onset_ns, tz="UTC").isoformat(),
        "end_ts": members[int(np.argmax(ends.asi8))]["end_ts"],
        "entities": sorted({m["entity"] for m in members}),
        "share": densest / lines,  # of the part's lines, in its densest stretch
        "threshold": settings.share,
        "rows": sum(m["rows"] for m in members),  # their alarmed rows in this part
        # How far past its own threshold the most surprised line went.
        "peak_ratio": max((m["peak_score"] / m["threshold"] for m in members if m["threshold"] > 0), default=math.nan),
    }
