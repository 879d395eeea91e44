import json

import numpy as np
import pandas as pd

from flows.ingest.landing import read_batch
from flows.ingest.simulator import SimulationConfig, simulate
from flows.settings import LogSchema


def test_simulated_plant(tmp_path):
    config = SimulationConfig(
        entities=2,
        batches=10,
        rows_per_batch=100,
        gradual_drift_start=3,
        abrupt_drift_batch=6,
        broken_batches={"wrong_schema": 2, "nan_burst": 4, "out_of_range": 5, "unsorted_timestamps": 7},
    )
    truth = simulate(tmp_path / "landing", tmp_path / "truth.json", config)
    files = sorted((tmp_path / "landing").iterdir())
    assert len(files) == 20 and {f.suffix for f in files} == {".csv", ".parquet"}
    assert json.loads((tmp_path / "truth.json").read_text())["files"] == truth.files
    assert {d["kind"] for d in truth.drifts} == {"gradual", "abrupt"}
    assert {b["kind"] for b in truth.broken_files} == {
        "wrong_schema",
        "nan_burst",
        "out_of_range",
        "unsorted_timestamps",
    }
    assert truth.anomalies

    schema = LogSchema()
    good = [read_batch(f, schema) for f in files if f.name not in {b["file"] for b in truth.broken_files}]
    line = pd.concat([g for g in good if g["entity"].iloc[0] == "line-1"])
    stamps = pd.to_datetime(line["timestamp"], utc=True, format="ISO8601")
    gaps = stamps.diff().dt.total_seconds().dropna()
    assert gaps.min() > 0 and gaps.std() > 1.0  # irregular, increasing timestamps
    # Sources report on their own clocks: hydraulic readings are missing together, often.
    missing = line[["pressure", "flow"]].isna()
    assert 0.1 < missing["pressure"].mean() < 0.5 and (missing["pressure"] == missing["flow"]).all()
    # The valve change halves pressure per unit of flow after the abrupt drift (batch 6).
    ratio = (line["pressure"] / line["flow"]).to_numpy()
    split = 6 * config.rows_per_batch
    assert np.nanmedian(ratio[split:]) < 0.7 * np.nanmedian(ratio[:split])
    assert np.isfinite(line[schema.sensor_names].to_numpy(dtype=float)).any()
