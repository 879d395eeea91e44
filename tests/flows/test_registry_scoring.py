"""The registered model scores raw log rows as they land: a snapshot version, loaded through
MLflow's registry, gives the next file's rows the forecasts, scores and alarms the pipeline then
gives them, and `mlflow models serve` on that version answers an HTTP request with the same."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from flows.model.raw_scoring import RawRowsError
from flows.monitor.tracking import Tracker
from flows.orchestrate.prefect_flows import continual_update
from tests.flows.helpers import small_config, small_plant

pytestmark = pytest.mark.slow

ALARMS = {"false_alarm_rate": 0.02, "smoothing_rows": 1, "calibration_rows": 200, "warmup_rows": 50}
COMPARED = ["score", "anomaly_score", "anomaly_threshold", "forecast_h1_temperature", "forecast_h1_pressure"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_snapshot_version_scores_the_next_file_as_the_pipeline_then_does(tmp_path, prefect_api):
    settings, config = small_config(
        tmp_path,
        initial_training={"batches": 2, "epochs": 2},
        drift={"on_detect": "record"},
        alarms=ALARMS,
        tracking={"snapshot_every": 7},  # one snapshot: after the 7 files before the next one
    )
    truth = small_plant(settings, entities=3, batches=8, rows_per_batch=60, plant_files=True, broken_batches={})
    next_file = settings.paths.landing / truth.files[-1]
    raw = pd.read_parquet(next_file) if next_file.suffix == ".parquet" else pd.read_csv(next_file)
    next_file.unlink()
    continual_update(config=config)  # everything before the next file; a snapshot is registered

    # The next file as it lands: pressure stuck high on line-2 for its second half, and one
    # row of line-1 older than anything the pipeline already has for that line.
    line = raw.index[raw["entity"] == "line-2"]
    raw.loc[line[len(line) // 2 :], "pressure"] = 24.5
    raw["timestamp"] = pd.to_datetime(raw["timestamp"], utc=True)
    stale = raw[raw["entity"] == "line-1"].iloc[:1].copy()
    stale["timestamp"] -= pd.Timedelta(hours=1)  # inside an earlier file's span; first of its line here
    landed = pd.concat([stale, raw], ignore_index=True)
    stale_at = stale["timestamp"].iloc[0]
    landed["timestamp"] = landed["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    rows = landed.sample(frac=1.0, random_state=0)  # any order; the label column comes along too

    tracker = Tracker(settings)
    snapshot = [v["version"] for v in tracker.versions() if v["kind"] == "snapshot"][-1]
    uri = f"models:/{settings.tracking.model_name}/{snapshot}"
    model = mlflow.pyfunc.load_model(uri)
    predicted = model.predict(rows)

    assert predicted.index.equals(rows.index)
    stale_rows = (predicted["entity"] == "line-1") & (predicted["timestamp"] == stale_at)
    assert predicted.loc[stale_rows, "late"].tolist() == [1]
    assert predicted.loc[stale_rows, "score"].isna().all()
    scored = predicted[predicted["late"] == 0]
    assert len(scored) == len(raw)
    assert np.isfinite(scored["anomaly_threshold"]).all()  # every line's calibration came along
    # The stuck rows alarm (the rows' rate control ends the flag within tens of rows), and the
    # score sees them: a quarter of them score above every other row of the line.
    on_line = scored[scored["entity"] == "line-2"].assign(timestamp=lambda f: pd.to_datetime(f["timestamp"], utc=True))
    stuck_from = pd.to_datetime(raw.loc[line[len(line) // 2], "timestamp"], utc=True)
    stuck = on_line["timestamp"] >= stuck_from
    assert on_line.loc[stuck, "anomaly"].sum() >= 5
    calm_peak = on_line.loc[~stuck, "anomaly_score"].max()
    assert (on_line.loc[stuck, "anomaly_score"] > calm_peak).sum() >= len(line) // 4

    # Every line fresh: no calibration yet, and other forecasts than from the carried states.
    fresh = model.predict(rows, params={"carried_states": False})
    assert fresh["late"].sum() == 0 and (fresh["anomaly"] == 0).all()
    assert not np.allclose(fresh.loc[scored.index, "forecast_h1_temperature"], scored["forecast_h1_temperature"])

    # The pipeline then processes the same file: the same figures for every row it scores.
    landed.to_csv(settings.paths.landing / "next.csv", index=False)
    continual_update(config=config)
    newest = max((settings.paths.output / "batches").glob("*.parquet"), key=lambda p: p.stat().st_mtime_ns)
    output = pd.read_parquet(newest, columns=["entity", "timestamp", *COMPARED, "anomaly"])
    keyed = scored.assign(timestamp=pd.to_datetime(scored["timestamp"], utc=True)).set_index(["entity", "timestamp"])
    output = output.set_index(["entity", "timestamp"]).loc[keyed.index]
    for column in COMPARED:
        np.testing.assert_allclose(keyed[column], output[column], rtol=1e-5, atol=1e-6, err_msg=column)
    assert (keyed["anomaly"].to_numpy() == output["anomaly"].to_numpy()).all()

    # A reading that is not a number: MLflow's schema check names the column; the wrapper
    # itself, called without it, names the row too.
    unreadable = rows.head(2).astype({"pressure": object})
    unreadable.iloc[1, unreadable.columns.get_loc("pressure")] = "high"
    with pytest.raises(MlflowException, match="column pressure"):
        model.predict(unreadable)
    with pytest.raises(RawRowsError, match="row 1: pressure 'high' is not a number"):
        model.unwrap_python_model().predict(None, unreadable)

    # `mlflow models serve` on the version: one HTTP request of raw rows, the same answer.
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local"]
        + ["--host", "127.0.0.1", "--port", str(port)],
        # MLflow starts `uvicorn` by name: the environment's bin folder must be on PATH.
        env={
            **os.environ,
            "MLFLOW_TRACKING_URI": settings.tracking.tracking_uri,
            "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}",
        },
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for(f"http://127.0.0.1:{port}/ping", server, tmp_path / "serve.log")
        body = json.dumps({"dataframe_split": json.loads(rows.to_json(orient="split"))}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answered = pd.DataFrame(json.loads(response.read())["predictions"])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    assert len(answered) == len(rows)
    assert answered["late"].tolist() == predicted["late"].tolist()
    assert answered["anomaly"].tolist() == predicted["anomaly"].tolist()
    for column in COMPARED:
        np.testing.assert_allclose(
            answered[column].astype(float), predicted[column], rtol=1e-5, atol=1e-6, err_msg=column
        )


def _wait_for(url: str, server: subprocess.Popen, log_path, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited {server.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow models serve did not answer in {seconds} s: {log_path.read_text()[-2000:]}")
