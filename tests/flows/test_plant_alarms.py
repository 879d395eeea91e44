"""Plant-level alarms from a part's episodes: many lines opening in one stretch of time are one
alarm; the same number of onsets spread over the file, episodes carried on from the file before
and lines far apart in time are not."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from flows.monitor.plant_alarms import plant_alarms
from flows.settings import PlantAlarmSettings
from lru_online.alarms import typical_spacing

START = pd.Timestamp("2026-03-01T00:00:00Z")
SPACING = 10.0  # seconds between a line's rows


def _episode(
    line: int, row: float, rows: int = 5, continues: bool = False, peak: float = 3.0, clock_rows: float = 0.0
) -> dict:
    """An episode of `line` alarming from its `row` of the file on for `rows` rows (opened in the
    file before when it `continues`: from then on it alarms again at `row`); the line's file
    starts `clock_rows` row spacings after the plant's."""
    onset = START + pd.Timedelta(seconds=(row + clock_rows) * SPACING)
    return {
        "entity": f"line-{line}",
        "start_ts": (onset - pd.Timedelta(minutes=30) if continues else onset).isoformat(),
        "end_ts": (onset + pd.Timedelta(seconds=(rows - 1) * SPACING)).isoformat(),
        "rows": rows,
        "peak_score": peak,
        "threshold": 1.5,
        "continues": continues,
        "onset_ns": [onset.value],
        "onset_rows": [int(row)],
    }


def test_most_lines_opening_together_are_one_plant_alarm_naming_them():
    together = [_episode(line, 100 + 2 * line, rows=3 + line) for line in range(7)]  # 7 of 10 in 14 rows
    spread = [_episode(8, 10), _episode(9, 190), _episode(0, 200)]  # line-0 opens again later
    found, marked = plant_alarms(together + spread, lines=10, spacing_seconds=SPACING, settings=PlantAlarmSettings())
    assert len(found) == 1
    alarm = found[0]
    assert alarm["entities"] == [f"line-{line}" for line in range(7)]
    assert alarm["share"] == pytest.approx(0.7)
    assert alarm["start_ts"] == together[0]["start_ts"]
    assert alarm["end_ts"] == together[-1]["end_ts"]  # the longest episode ends last
    assert alarm["rows"] == sum(e["rows"] for e in together)
    assert alarm["peak_ratio"] == pytest.approx(2.0)
    assert [m["plant"] for m in marked] == [0] * 7 + [None] * 3
    assert [{k: v for k, v in m.items() if k != "plant"} for m in marked] == together + spread


def test_onsets_spread_over_the_file_carried_on_or_too_few_raise_none():
    settings = PlantAlarmSettings()
    spread = [_episode(line, 25 * line) for line in range(10)]  # each line once, 25 rows apart
    assert plant_alarms(spread, 10, SPACING, settings)[0] == []
    carried = [{**_episode(line, 0, continues=True), "onset_ns": [], "onset_rows": []} for line in range(10)]
    assert plant_alarms(carried, 10, SPACING, settings)[0] == []
    four_of_ten = [_episode(line, 100) for line in range(4)]
    assert plant_alarms(four_of_ten, 10, SPACING, settings)[0] == []
    two_of_two = [_episode(line, 100) for line in range(2)]  # half and more, but fewer than min_lines
    assert plant_alarms(two_of_two, 2, SPACING, settings)[0] == []
    repeated = [_episode(0, 100 + row) for row in range(0, 20, 2)]  # one line opening ten times
    assert plant_alarms(repeated, 4, SPACING, settings)[0] == []


def test_lines_already_alarming_count_where_they_start_again():
    again = [_episode(line, 100 + line, continues=True) for line in range(3)]  # opened in the file before
    new = [_episode(line, 102 + line) for line in range(3, 6)]
    found, marked = plant_alarms(again + new, 6, SPACING, PlantAlarmSettings())
    assert len(found) == 1 and found[0]["entities"] == [f"line-{line}" for line in range(6)]
    assert found[0]["start_ts"] == pd.Timestamp(again[0]["onset_ns"][0], tz="UTC").isoformat()
    assert [m["plant"] for m in marked] == [0] * 6
    # An episode that flaps: alarming again within the stretch counts its line once.
    flapping = {
        **_episode(0, 100),
        "onset_ns": [_episode(0, r)["onset_ns"][0] for r in (100, 103, 106)],
        "onset_rows": [100, 103, 106],
    }
    assert plant_alarms([flapping, *new[:2]], 8, SPACING, PlantAlarmSettings())[0] == []  # 5 onsets, 3 lines


def test_separate_plant_wide_changes_are_separate_alarms_and_overlapping_stretches_one():
    first = [_episode(line, 10 + 3 * line) for line in range(6)]  # stretches overlap: 15 rows wide
    second = [_episode(line, 150 + line) for line in range(5)]
    found, marked = plant_alarms(first + second, 8, SPACING, PlantAlarmSettings())
    assert [len(a["entities"]) for a in found] == [6, 5]
    assert [m["plant"] for m in marked] == [0] * 6 + [1] * 5


def test_together_in_time_or_in_each_lines_own_rows():
    line_rows = np.arange(4) * 30.0
    times = torch.tensor(np.stack([line_rows, line_rows + 86_400.0]))  # a day between the lines is no gap
    assert typical_spacing(times) == 30.0
    assert typical_spacing(times[:, :1]) == 0.0  # one row a line: not known
    settings = PlantAlarmSettings()
    # In time: lines whose files start 30 rows apart, opening within 15 rows of time (their own
    # rows 100, 85, 40, 25: no three within 20).
    in_time = [_episode(line, 100 - 30 * line + 15 * (line % 2), clock_rows=30 * line) for line in range(4)]
    assert len(plant_alarms(in_time, 4, SPACING, settings)[0]) == 1
    assert plant_alarms(in_time, 4, SPACING / 3, settings)[0] == []  # a third of the spacing: 6.7 rows
    # In the lines' own rows: each line's file starts 50 rows later, every line opens at its row 3.
    with_the_file = [_episode(line, 3, clock_rows=50 * line) for line in range(4)]
    found, _ = plant_alarms(with_the_file, 4, SPACING, settings)
    assert len(found) == 1 and found[0]["start_ts"] == with_the_file[0]["start_ts"]
    spread = [_episode(line, 3 + 25 * line, clock_rows=50 * line) for line in range(4)]
    assert plant_alarms(spread, 4, SPACING, settings)[0] == []
    same_instant = [{**_episode(line, 0), "onset_rows": [40 * line]} for line in range(3)]
    assert len(plant_alarms(same_instant, 3, math.nan, settings)[0]) == 1
