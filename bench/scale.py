"""A plant of many lines through `continual_update`: embedded profile vs servers profile with 1
and 2 Dask workers, in one run.

    python bench/scale.py [--entities 200] [--batches 20] [--rows 40] [--infra DIR] [--workdir DIR]

Each batch is one file holding every line's rows for that period (as a plant exports them).
The simulated batches are the same for every profile. The servers profile needs the services of
`lru-online infra up --dir DIR` (Postgres, MLflow with S3 artifacts, Prefect server); the bench
starts its own Dask cluster of 1, then 2 single-threaded worker processes and points
`prefect.dask_address` at it. Each profile runs in a fresh child process (the driver), so its
peak RSS is its own.

Reported per profile: rows scored per second from the first batch commit to the last (initial
training excluded), p50/p99 batch latency (time between consecutive batch commits in the run:
validate, features, score, update, commit, tracking, drift), and the driver's peak RSS.
Baseline: the embedded profile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

# A small model keeps the bench about the pipeline's scale-out, not the model's size; drift is
# recorded, not answered, so no retraining lands inside the measured batches.
OVERRIDES = {
    "initial_training": {"batches": 2, "epochs": 1},
    "model": {"d_model": 16, "d_state": 16, "n_layers": 1},
    "update": {"window": 32, "replay_capacity": 64, "replay_batch": 2},
    "drift": {"on_detect": "record"},
    "tracking": {"snapshot_every": 0},
}


def simulate_plant(folder: Path, entities: int, batches: int, rows: int) -> list[Path]:
    """One Parquet file per batch index, holding every entity's rows of that period."""
    from flows.settings import load_settings
    from flows.simulator import SimulationConfig, simulate

    settings = load_settings(workdir=folder / "sim")
    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    config = SimulationConfig(
        entities=entities, batches=batches, rows_per_batch=rows, broken_batches={}, anomaly_rate=0.0
    )
    simulate(raw, folder / "truth.json", config, settings.log_schema)
    by_batch: dict[int, list[pd.DataFrame]] = {}
    for path in sorted(raw.iterdir()):
        index = int(re.search(r"batch-(\d+)", path.name).group(1))
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        by_batch.setdefault(index, []).append(frame)
    merged = folder / "batches"
    merged.mkdir(exist_ok=True)
    files = []
    for index in sorted(by_batch):
        frame = pd.concat(by_batch[index], ignore_index=True)
        frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True, format="ISO8601")
        path = merged / f"plant_batch-{index:04d}.parquet"
        frame.sort_values(["entity", "timestamp"]).to_parquet(path, index=False)
        files.append(path)
    return files


def write_config(profile: str, workdir: Path, extra: dict) -> Path:
    from flows.settings import derive_config

    return derive_config(ROOT / "configs" / f"{profile}.yaml", workdir, {**OVERRIDES, **extra})


def run_driver(config: Path) -> dict:
    """The child: one continual_update over the landed batches; figures as JSON."""
    from sqlalchemy import select

    from flows.prefect_flows import continual_update
    from flows.settings import load_settings
    from flows.storage.database import Database
    from flows.storage.models import Batch

    settings = load_settings(config)
    if settings.prefect.api_url:
        os.environ["PREFECT_API_URL"] = settings.prefect.api_url
    started = time.time()
    continual_update(config=str(config))
    wall = time.time() - started
    db = Database(settings.database_url)
    with db.session() as session:
        batches = list(session.scalars(select(Batch).order_by(Batch.processed_at)))
    db.dispose()
    processed = [b for b in batches if b.status == "processed"]
    # Initial training happens before the first commit; from the first commit on, every interval
    # between commits is one batch's latency and the rows it scored.
    commits = np.array([b.processed_at.timestamp() for b in processed])
    latencies = np.diff(commits)
    rows = sum(b.rows_scored for b in processed[1:])
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "batches": len(processed),
        "rows": rows,
        "rows_per_s": rows / (commits[-1] - commits[0]),
        "p50_s": float(np.percentile(latencies, 50)),
        "p99_s": float(np.percentile(latencies, 99)),
        "peak_rss_mib": peak_rss_mib,
        "wall_s": wall,
    }


def run_profile(label: str, config: Path, files: list[Path], env: dict[str, str | None]) -> dict:
    from flows.settings import load_settings

    landing = load_settings(config).paths.landing
    landing.mkdir(parents=True, exist_ok=True)
    for path in files:
        (landing / path.name).write_bytes(path.read_bytes())
    environment = {key: value for key, value in {**os.environ, **env}.items() if value is not None}
    done = subprocess.run(
        [sys.executable, __file__, "--driver", str(config)],
        env=environment,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{label} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=200)
    parser.add_argument("--batches", type=int, default=20, help="live batches (2 more train the model)")
    parser.add_argument("--rows", type=int, default=40, help="rows per entity per batch")
    parser.add_argument("--workers", default="1,2", help="Dask worker counts for the servers profile")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--infra", type=Path, default=Path(".infra"), help="folder of `lru-online infra up`")
    parser.add_argument("--driver", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        print(json.dumps(run_driver(args.driver)))
        return

    from distributed import LocalCluster

    from infra import services

    status = services.status(args.infra)
    if any(status[name] != "up" for name in ("postgres", "s3", "mlflow", "prefect")):
        raise SystemExit(f"start the services first: lru-online infra up --dir {args.infra}")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="lru-scale-"))
    total = args.batches + OVERRIDES["initial_training"]["batches"]
    files = simulate_plant(root / "data", args.entities, total, args.rows)
    print(f"{len(files)} batch files, {args.entities} entities x {args.rows} rows each, in {root}")
    results = {}
    clean = {"PREFECT_API_URL": None}  # the embedded driver starts its own local API
    results["embedded"] = run_profile("embedded", write_config("embedded", root / "embedded", {}), files, clean)
    api = services.urls()["prefect_api_url"]
    for workers in [int(w) for w in args.workers.split(",")]:
        label = f"servers, {workers} Dask worker{'s' if workers > 1 else ''}"
        name = f"scale-{workers}w-{uuid.uuid4().hex[:6]}"
        # Prefect tasks on the workers report to the server, like the workers `infra up` starts.
        os.environ["PREFECT_API_URL"] = api
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            config = write_config(
                "servers",
                root / f"servers-{workers}",
                {
                    "database_url": services.create_database("lru_bench"),
                    "pipeline": name,
                    "tracking": {**OVERRIDES["tracking"], "experiment": name, "model_name": name},
                    "prefect": {"dask_address": cluster.scheduler_address},
                },
            )
            results[label] = run_profile(label, config, files, {})
        del os.environ["PREFECT_API_URL"]
    base = results["embedded"]["rows_per_s"]
    header = (
        f"{'profile':<26}{'batches':>8}{'rows':>9}{'rows/s':>9}{'vs embedded':>13}"
        f"{'p50 s':>8}{'p99 s':>8}{'peak RSS MiB':>14}"
    )
    print(header)
    print("-" * len(header))
    for label, r in results.items():
        print(
            f"{label:<26}{r['batches']:>8}{r['rows']:>9}{r['rows_per_s']:>9.0f}{r['rows_per_s'] / base:>12.2f}x"
            f"{r['p50_s']:>8.2f}{r['p99_s']:>8.2f}{r['peak_rss_mib']:>14.0f}"
        )


if __name__ == "__main__":
    main()
