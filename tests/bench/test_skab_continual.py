"""bench/skab.py on a folder of synthetic SKAB-format files: the continual protocol's backward
transfer re-scores with the weights frozen, and the plots are drawn. Runs without the data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
SENSORS = ["Accelerometer1RMS", "Current", "Pressure", "Temperature"]


@pytest.fixture(scope="module")
def skab():
    from bench import skab

    return skab


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Five experiments of 600 rows, each with a level shift in two sensors from row 480 on."""
    root = tmp_path_factory.mktemp("skab") / "valve9"
    root.mkdir()
    rng = np.random.default_rng(0)
    start = pd.Timestamp("2020-03-09 10:00:00")
    for number in range(5):
        rows = 600
        t = np.arange(rows)
        values = np.sin(t[:, None] / 7.0 + np.arange(len(SENSORS))) + 0.1 * rng.normal(size=(rows, len(SENSORS)))
        anomaly = (t >= 480).astype(float)
        values[480:, :2] += 3.0
        frame = pd.DataFrame(values, columns=SENSORS)
        frame.insert(0, "datetime", pd.date_range(start + pd.Timedelta(hours=number), periods=rows, freq="s"))
        frame["anomaly"] = anomaly
        frame["changepoint"] = (t == 480).astype(float)
        frame.to_csv(root / f"{number}.csv", sep=";", index=False)
    return root.parent


def test_continual_backward_transfer_rescores_with_frozen_weights(skab, folder, tmp_path, monkeypatch):
    files, normal = skab.load_folder(folder)
    assert [f.relative for f in files] == [f"valve9/{n}.csv" for n in range(5)] and normal is None
    frozen_weights = {}
    original = skab.backward_transfer

    def watched(detector, files, streamed):
        before = [p.detach().clone() for p in detector.learner.model.parameters()]
        detect, rescored = detector.detect, frozen_weights.setdefault("rescored", [])

        def recording(rows):
            rescored.append(detect(rows))
            return rescored[-1]

        detector.detect = recording
        figures = original(detector, files, streamed)
        frozen_weights["unchanged"] = all(
            bool((a == b).all()) for a, b in zip(before, detector.learner.model.parameters(), strict=True)
        )
        return figures

    monkeypatch.setattr(skab, "backward_transfer", watched)
    result = skab.run_method("lru", files, normal, "continual", tmp_path)
    figures = result.figures()
    assert figures["first_fifth_files"] == 1  # the first fifth of five files
    # While streaming, the FAR of file 0 is the one counted in the full table's alarms; frozen,
    # the one of the alarms its re-scoring raised on the same normal rows.
    normal_rows = files[0].anomaly[skab.TRAIN_ROWS :] == 0
    expected = round(100.0 * result.detections[0].alarms[normal_rows].mean(), 2)
    assert figures["first_fifth_far_streaming"] == expected
    assert len(frozen_weights["rescored"]) == 1
    frozen = round(100.0 * frozen_weights["rescored"][0].alarms[normal_rows].mean(), 2)
    assert figures["first_fifth_far_frozen_after"] == frozen
    assert frozen_weights["unchanged"]
    # The level shift is found: the detector is not silent on the anomalous rows.
    assert figures["mar_percent"] < 50.0


def test_strict_protocol_reports_no_backward_transfer(skab, folder, tmp_path):
    files, normal = skab.load_folder(folder)
    figures = skab.run_method("t2", files, normal, "strict", tmp_path).figures()
    assert "first_fifth_far_streaming" not in figures


def test_plots_are_written(skab, folder, tmp_path):
    files, normal = skab.load_folder(folder)
    runs = {name: skab.run_method(name, files, normal, "strict", tmp_path / "out") for name in ("t2", "hst")}
    skab.save_plots(tmp_path / "plots", files, runs, "synthetic")
    written = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert written == ["file0_valve9_0.png", "file1_valve9_1.png", "file2_valve9_2.png", "summary.png"]
    assert all((tmp_path / "plots" / name).stat().st_size > 10_000 for name in written)
