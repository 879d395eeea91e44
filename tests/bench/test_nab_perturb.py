"""bench/nab_perturb.py: each kind but `seasonal` changes only the rows after the first 15 %,
none removes a labelled row, is the same for the same seed and file, and its copies read back through
bench/nab.py's loader with the windows at the same times."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import nab
from bench.nab_perturb import (
    GAP_BURSTS,
    KINDS,
    LONG_COPIES,
    SEASONAL_SDS,
    SHIFT_SDS,
    VOLATILITY_FACTOR,
    WANDER_ROWS,
    WANDER_SDS,
    write_perturbed,
)

ROOT = Path(__file__).resolve().parents[2]
ROWS = 2000


def _streams(folder: Path) -> None:
    folder.mkdir()
    rng = np.random.default_rng(1)
    windows = {}
    for name in ("cpu_a.csv", "net_b.csv"):
        stamps = pd.date_range("2014-02-14 14:30", periods=ROWS, freq="5min")
        values = 40 + 5 * rng.normal(size=ROWS)
        pd.DataFrame({"timestamp": stamps.strftime("%Y-%m-%d %H:%M:%S"), "value": values.round(3)}).to_csv(
            folder / name, index=False
        )
        windows[name] = [[str(stamps[1200]), str(stamps[1400])]]
    (folder / "windows.json").write_text(json.dumps(windows))


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ("long", "seasonal")])
def test_a_perturbation_keeps_the_first_share_and_every_labelled_row(tmp_path, kind):
    data, out = tmp_path / "data", tmp_path / kind
    _streams(data)
    write_perturbed(data, out, kind, seed=0)
    originals = {item.name: item for item in nab.load_series(data)}
    copies = {item.name: item for item in nab.load_series(out)}
    assert sorted(copies) == sorted(originals)
    first = int(nab.INITIAL_SHARE * ROWS)
    for name, original in originals.items():
        copy = copies[name]
        pd.testing.assert_frame_equal(copy.frame.iloc[:first], original.frame.iloc[:first])
        # The labels mean what they meant: the same window, at the same times.
        (lo, hi), (copy_lo, copy_hi) = original.windows[0], copy.windows[0]
        labelled = original.frame.iloc[lo : hi + 1].reset_index(drop=True)
        copied = copy.frame.iloc[copy_lo : copy_hi + 1].reset_index(drop=True)
        pd.testing.assert_series_equal(copied["timestamp"], labelled["timestamp"])
        kept = original.frame.merge(copy.frame, on="timestamp", suffixes=("", "_copy"))
        if kind == "wander":
            assert len(copy.frame) == ROWS
            added = (kept["value_copy"] - kept["value"]).to_numpy()
            assert np.abs(added[:first]).max() == 0.0
            sd = original.frame["value"].std()
            assert np.abs(added).max() == pytest.approx(WANDER_SDS * sd, rel=1e-3)
            # Slow: one row's step is a small share of the excursion.
            assert np.abs(np.diff(added)).max() < 0.05 * WANDER_SDS * sd
        elif kind == "volatility":
            assert len(copy.frame) == ROWS
            level = original.frame["value"].rolling(WANDER_ROWS, center=True, min_periods=1).median()
            ratio = ((copy.frame["value"] - level) / (original.frame["value"] - level)).to_numpy()
            changed = np.flatnonzero(~np.isclose(ratio, 1.0) & np.isfinite(ratio))
            start = changed[0]
            assert 0.3 * ROWS <= start <= 0.7 * ROWS
            after = ratio[start:][np.isfinite(ratio[start:])]
            assert np.allclose(after, VOLATILITY_FACTOR)
        elif kind == "shift":
            assert len(copy.frame) == ROWS
            added = (copy.frame["value"] - original.frame["value"]).to_numpy()
            start = np.flatnonzero(np.abs(added) > 1e-9)[0]
            assert 0.3 * ROWS <= start <= 0.7 * ROWS
            # One step, the same on every row after it, labelled rows included.
            assert np.allclose(np.abs(added[start:]), SHIFT_SDS * original.frame["value"].std())
            assert np.ptp(added[start:]) < 1e-9 and np.abs(added[:start]).max() < 1e-9
        else:
            pd.testing.assert_series_equal(copied["value"], labelled["value"])
            assert (kept["value_copy"] == kept["value"]).all()  # rows kept as they were
            removed = ROWS - len(copy.frame)
            if kind == "gaps":
                # Six bursts of 1-3 % each, less what overlaps the window or another burst.
                assert 0.01 * ROWS <= removed <= GAP_BURSTS * 0.03 * ROWS
                spacing = copy.frame["timestamp"].diff().dt.total_seconds().to_numpy()[1:] / 300
                assert 1 <= (spacing > 1).sum() <= GAP_BURSTS
            else:
                assert removed == pytest.approx((ROWS - first - (hi - lo + 1)) / 3, rel=0.15)


def test_a_seasonal_copy_adds_one_daily_profile_and_a_weekend_level_to_every_row(tmp_path):
    """The pattern goes on every row, the first share included (a stream has its day from the
    start): the same at the same clock time on any two weekdays, spanning SEASONAL_SDS standard
    deviations in a day, and half of that lower on Saturdays and Sundays; no row removed."""
    data, out = tmp_path / "data", tmp_path / "seasonal"
    _streams(data)
    write_perturbed(data, out, "seasonal", seed=0)
    originals = {item.name: item for item in nab.load_series(data)}
    profiles = []
    for item in nab.load_series(out):
        original = originals[item.name].frame
        assert len(item.frame) == ROWS and item.windows == originals[item.name].windows
        added = (item.frame["value"] - original["value"]).to_numpy() / original["value"].std()
        stamps = original["timestamp"]
        weekend = (stamps.dt.day_of_week >= 5).to_numpy()
        clock = (stamps.dt.hour * 60 + stamps.dt.minute).to_numpy()
        daily = pd.Series(added[~weekend]).groupby(clock[~weekend]).agg(["min", "max"])
        assert np.allclose(daily["min"], daily["max"], atol=1e-3)  # one profile on every weekday
        assert daily["max"].max() - daily["min"].min() == pytest.approx(SEASONAL_SDS, abs=0.01)
        on_weekend = pd.Series(added[weekend]).groupby(clock[weekend]).first()
        shared = on_weekend.index.intersection(daily.index)
        assert len(shared) > 100
        assert np.allclose(daily.loc[shared, "min"] - on_weekend.loc[shared], SEASONAL_SDS / 2, atol=1e-3)
        profiles.append(daily["min"].to_numpy())
    assert not np.allclose(profiles[0], profiles[1], atol=0.1)  # each series its own phases


def test_a_long_copy_repeats_each_series_with_its_windows_and_time_running_on(tmp_path):
    data, out = tmp_path / "data", tmp_path / "long"
    _streams(data)
    write_perturbed(data, out, "long", seed=0)
    for original, copy in zip(nab.load_series(data), nab.load_series(out), strict=True):
        assert len(copy.frame) == LONG_COPIES * ROWS
        assert copy.frame["timestamp"].is_monotonic_increasing
        assert (copy.frame["timestamp"].diff().dropna() == pd.Timedelta(minutes=5)).all()
        values = copy.frame["value"].to_numpy().reshape(LONG_COPIES, ROWS)
        assert (values == original.frame["value"].to_numpy()).all()
        # Every copy's window covers the same rows of that copy as the original's.
        (lo, hi) = original.windows[0]
        assert copy.windows == [(lo + k * ROWS, hi + k * ROWS) for k in range(LONG_COPIES)]


def test_the_same_seed_gives_the_same_copy_whatever_else_the_folder_holds(tmp_path):
    data = tmp_path / "data"
    _streams(data)
    write_perturbed(data, tmp_path / "one", "gaps", seed=3)
    write_perturbed(data, tmp_path / "two", "gaps", seed=3)
    write_perturbed(data, tmp_path / "other", "gaps", seed=4)
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "cpu_a.csv").write_bytes((data / "cpu_a.csv").read_bytes())
    (alone / "windows.json").write_bytes((data / "windows.json").read_bytes())
    write_perturbed(alone, tmp_path / "alone-out", "gaps", seed=3)
    first = (tmp_path / "one" / "cpu_a.csv").read_bytes()
    assert (tmp_path / "two" / "cpu_a.csv").read_bytes() == first
    assert (tmp_path / "alone-out" / "cpu_a.csv").read_bytes() == first
    assert (tmp_path / "other" / "cpu_a.csv").read_bytes() != first


def test_the_command_refuses_to_write_over_its_streams(tmp_path):
    data = tmp_path / "data"
    _streams(data)
    done = subprocess.run(
        [sys.executable, "bench/nab_perturb.py", "--data", str(data), "--out", str(data), "--kind", "gaps"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "must not be --data" in done.stderr
    assert len(pd.read_csv(data / "cpu_a.csv")) == ROWS
