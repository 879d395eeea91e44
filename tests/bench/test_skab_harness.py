"""The SKAB harness against the leaderboard: its T² control chart, scored by our metric code,
must give the published T-squared row on the valve1 files, and the exchange files must hold
every test row."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "skab"

pytestmark = pytest.mark.skipif(not (DATA / "valve1").is_dir(), reason=f"SKAB data not at {DATA}")


@pytest.fixture(scope="module")
def skab():
    from bench import skab

    return skab


def test_t2_reproduces_the_published_valve1_row(skab, tmp_path):
    files, normal = skab.load_folder(DATA)
    assert len(files) == 16 and normal is not None
    figures = skab.run_method("t2", files, normal, "strict", tmp_path).figures()
    f1, far, mar, nab_std, nab_low_fp, nab_low_fn, missed, false_positives = skab.PUBLISHED_VALVE1["T-squared"]
    assert figures["f1"] == pytest.approx(f1, abs=0.03)
    assert (figures["far_percent"], figures["mar_percent"]) == pytest.approx((far, mar), abs=0.01)
    assert (figures["nab_standard"], figures["nab_low_fp"], figures["nab_low_fn"]) == pytest.approx(
        (nab_std, nab_low_fp, nab_low_fn), abs=0.01
    )
    assert (figures["missed_changepoints"], figures["false_positives"]) == (missed, false_positives)
    written = pd.read_csv(tmp_path / "t2" / "valve1__0.csv")
    first = next(f for f in files if f.relative == "valve1/0.csv")
    assert len(written) == len(first.frame) - skab.TRAIN_ROWS
    assert list(written.columns) == ["datetime", "anomaly", "changepoint", "score"]
    assert written["datetime"].iloc[0] == first.frame.index[skab.TRAIN_ROWS].strftime("%Y-%m-%d %H:%M:%S")


def test_the_seed_spread_reruns_the_configured_lru_and_means_each_figure(skab):
    files, _ = skab.load_folder(DATA)
    picked = [f for f in files if f.relative in ("valve1/0.csv", "valve1/1.csv")]
    configured = skab.LruDetectorConfig(**skab.load_config("skab")["lru"]).seed
    main_run = skab.run_method("lru", picked, None, "strict", None)
    spread = skab.seed_spread("lru", picked, None, "strict", [configured, configured + 1])
    assert list(spread) == [configured, configured + 1]
    again = spread[configured]
    assert [(c.tp, c.fp, c.fn, c.tn) for c in again.counts] == [(c.tp, c.fp, c.fn, c.tn) for c in main_run.counts]
    rows = [run.figures() for run in spread.values()]
    mean = skab.mean_row(rows)
    assert set(mean) == set(skab.COLUMNS)
    assert mean["far_percent"] == pytest.approx((rows[0]["far_percent"] + rows[1]["far_percent"]) / 2, abs=0.005)
    assert mean["f1"] == pytest.approx((rows[0]["f1"] + rows[1]["f1"]) / 2, abs=0.005)


def test_the_normal_run_is_cut_into_experiments_whose_test_rows_all_count_as_normal(skab):
    import numpy as np

    files, normal = skab.load_folder(DATA)
    rows = skab.experiment_rows(files)
    assert 1000 < rows < 1300  # valve1's experiments hold about 1,100 rows each
    pieces = skab.normal_pieces(normal, rows)
    assert len(pieces) == len(normal.frame) // rows
    assert all(len(p.frame) == rows and not p.anomaly.any() and not p.changepoint.any() for p in pieces)
    # Consecutive and disjoint: the second piece starts where the first ends.
    assert pieces[1].frame.index[0] == normal.frame.index[rows]
    with pytest.raises(ValueError, match="no test rows"):
        skab.normal_pieces(normal, skab.TRAIN_ROWS)
    run = skab.run_method("t2", pieces[:3], None, "strict", None)
    figures = skab.normal_run_figures(run)
    alarms = [d.alarms for d in run.detections]
    # Every alarmed test row is a false alarm: the FAR is the alarmed share, per piece and pooled.
    assert figures["piece_far_percent"] == [round(100 * float(a.mean()), 1) for a in alarms]
    assert figures["far_percent"] == pytest.approx(100 * float(np.concatenate(alarms).mean()), abs=0.005)
    assert figures["worst_piece_far_percent"] == max(figures["piece_far_percent"])
    # SKAB's changepoints are every start and end of an alarm span (the first row counts as a
    # change from nothing); on a normal run each one is a false positive.
    changes = sum(int(a[0]) + int(np.sum(np.abs(np.diff(a)))) for a in alarms)
    assert figures["false_positives"] == changes
