"""bench/ett_pipeline.py's staging: a station's rows, in order, cut into an initial-training file
of its first 20 % and `parts` files of the rest, with timestamps a log schema reads as UTC."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.ett_pipeline import stage


def test_a_station_is_cut_into_its_first_fifth_and_parts_of_the_rest(tmp_path):
    dates = pd.date_range("2016-07-01", periods=103, freq="h").strftime("%Y-%m-%d %H:%M:%S")
    columns = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    frame = pd.DataFrame(np.random.default_rng(0).normal(size=(103, 7)), columns=columns)
    frame.insert(0, "date", dates)
    frame.to_csv(tmp_path / "station.csv", index=False)
    assert stage(tmp_path / "station.csv", tmp_path / "stream", parts=4) == 103
    files = sorted((tmp_path / "stream").glob("*.csv"))
    parts = [pd.read_csv(f) for f in files]
    sizes = [len(p) for p in parts]
    assert sizes[0] == 20 and max(sizes[1:]) - min(sizes[1:]) <= 1 and sum(sizes) == 103
    joined = pd.concat(parts, ignore_index=True)
    np.testing.assert_allclose(joined[columns].to_numpy(), frame[columns].to_numpy())
    assert joined["date"].iloc[0] == "2016-07-01T00:00:00Z"
