"""Fleet throughput: plants of many lines through `continual_update`, embedded and on servers
with 1 and 2 Dask workers, beside river's HalfSpaceTrees and the per-line model loop.

    python bench/scale.py [--shapes 200x40,2000x40,10x5000] [--batches 20] [--workers 1,2]
                          [--infra DIR] [--embedded-only] [--per-line] [--as-deployed] [--workdir DIR]

`--workdir DIR` keeps the work folder for a look after; without it a temporary one is removed.

A shape LxR is a plant of L lines whose every file holds R rows of each line (one file per
period, all lines in it, as a plant exports them); `--entities L --rows R` asks for one shape.
The simulated files of a shape are the same for every profile; the first two train the model
(one epoch), drift is recorded, not answered, and no snapshot is registered, so the measured
files are the continual update alone. Each profile runs in a fresh child process (the driver),
so its peak RSS is its own, and runs the flow as `lru-online run` does: embedded, its files read
and validated ahead in the checking interpreter (flows/ingest/check_process.py, a process of
its own whose memory the driver's RSS does not count); on servers, by the Dask workers. The
embedded runs come first, with nothing else running; the servers profile then uses the
services of `lru-online infra up --dir DIR` (Postgres, MLflow with S3 artifacts, Prefect
server), started by the bench and stopped after when they are not up already (on two cores
their idle polling alone costs the driver 15 %), and its own Dask cluster of 1, then 2
single-threaded worker processes.

Reported per run: rows scored per second from the first file's commit to the last (initial
training excluded), p50/p99 seconds per file (between consecutive commits: everything a file
costs), the driver's median stage seconds per file (each stage's own wall time: the update runs
beside the alarms, drift and output, so those overlap), the CPU seconds per file of the driver
(all its threads) and of the processes it started (the checking interpreter, the monitoring
helper, Prefect's temporary API; not Dask's workers) over the same span as the rows/s (where
every core is busy, work saved shows there before it shows in the rows/s), and its peak RSS
(with the growth per 1,000 lines over an empty run's). Beside them, in the same run:
- `river HST`: river's HalfSpaceTrees scoring and learning the same rows one at a time
  (score_one, learn_one; no validation, storage or tracking) — the yardstick a user would pick;
- with `--as-deployed`: the same shape as a plant running the defaults exports and pays for it
  (the team's check): the simulator's anomalies in the rows, drift answered by retraining (beside
  the run), snapshots as configured; only the initial training stays as short;
- with `--per-line`: the model step of today's per-line loop (one score and one update per
  line, batch size 1) against the fleet step (all lines in one forward and one update), on the
  same file and the same weights, and, up to 500 lines a file, the pipeline with
  `update.lines_per_step: 1` (an optimizer step per line).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psutil

from bench.common import work_folder

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

# The default model (configs/embedded.yaml); drift is recorded, not answered, so no retraining
# lands inside the measured files.
OVERRIDES = {
    "initial_training": {"batches": 2, "epochs": 1},
    "drift": {"on_detect": "record"},
    "tracking": {"snapshot_every": 0},
}
STAGES = ["validate", "read_state", "features", "score", "update", "alarms", "drift", "output", "commit"]
# `--as-deployed`: what a plant running the defaults pays beside the continual update (the team's
# check): anomalies in the rows (alarm episodes, events), drift answered by retraining beside the
# run, snapshots registered as configured. Only the initial training stays short.
AS_DEPLOYED = {"drift": {"on_detect": "retrain"}, "tracking": {"snapshot_every": 50}}


def simulate_plant(folder: Path, lines: int, batches: int, rows: int, anomalies: bool = False) -> list[Path]:
    """One file per period holding every line's rows (with the simulator's anomalies, or none)."""
    from flows.ingest.simulator import SimulationConfig, simulate
    from flows.settings import load_settings

    shutil.rmtree(folder, ignore_errors=True)  # a reused --workdir: the plant is simulated again
    settings = load_settings(workdir=folder / "sim")
    raw = folder / "files"
    config = SimulationConfig(entities=lines, batches=batches, rows_per_batch=rows, broken_batches={}, plant_files=True)
    if not anomalies:
        config.anomaly_rate = 0.0
    truth = simulate(raw, folder / "truth.json", config, settings.log_schema)
    return [raw / name for name in truth.files]


def write_config(profile: str, workdir: Path, extra: dict) -> Path:
    from flows.settings import derive_config

    # Every profile starts from an empty work folder: in a reused --workdir the files of the last
    # run would already be processed, and it would report that run's figures again.
    shutil.rmtree(workdir, ignore_errors=True)
    return derive_config(ROOT / "configs" / f"{profile}.yaml", workdir, {**OVERRIDES, **extra})


class CpuClock:
    """CPU seconds of this process (all threads) and of every process it started, read every
    `every` seconds on a thread of its own, so that the CPU spent between two moments of the run
    (two commits) can be read after it. A child that has exited keeps the last figure read.
    The thread runs in the measured process: the list of children, which psutil finds by reading
    every process of the machine, is renewed every `children_every` readings only (a child found
    late brings its whole CPU time with it)."""

    def __init__(self, every: float = 0.2, children_every: int = 10) -> None:
        self._me = psutil.Process()
        self._known: list[psutil.Process] = []
        self._children: dict[int, float] = {}
        self._children_every = children_every
        self.samples: list[tuple[float, float, float]] = []  # (time, own, children's)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), name="cpu-clock", daemon=True)

    def __enter__(self) -> CpuClock:
        self._sample(list_children=True)
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(list_children=True)

    def _run(self, every: float) -> None:
        readings = 0
        while not self._stop.wait(every):
            readings += 1
            self._sample(list_children=readings % self._children_every == 0)

    def _sample(self, list_children: bool) -> None:
        if list_children:
            self._known = self._me.children(recursive=True)
        for child in self._known:
            try:
                times = child.cpu_times()
            except psutil.Error:  # exited since the listing
                continue
            self._children[child.pid] = times.user + times.system
        own = self._me.cpu_times()
        self.samples.append((time.time(), own.user + own.system, sum(self._children.values())))

    def between(self, start: float, end: float) -> tuple[float, float]:
        """CPU seconds of this process and of its children from `start` to `end` (times, s)."""
        times, own, children = (np.array(column) for column in zip(*self.samples, strict=True))
        return (
            float(np.interp(end, times, own) - np.interp(start, times, own)),
            float(np.interp(end, times, children) - np.interp(start, times, children)),
        )


def run_driver(config: Path, per_line: bool) -> dict:
    """The child: one continual_update over the landed files; figures as JSON."""
    from sqlalchemy import select

    from flows.ingest.check_process import checking_for_command
    from flows.orchestrate.prefect_flows import continual_update
    from flows.settings import load_settings
    from flows.storage.database import Database
    from flows.storage.models import Batch, BatchStatus, ModelState

    settings = load_settings(config)
    if settings.prefect.api_url:
        os.environ["PREFECT_API_URL"] = settings.prefect.api_url
    started = time.time()
    # As `lru-online run` runs it: its files read and validated ahead in the checking interpreter
    # (embedded; Dask workers check them on servers).
    with CpuClock() as clock, checking_for_command(settings.prefect.dask_address):
        outcome = continual_update(config=str(config))
    wall = time.time() - started
    db = Database(settings.database_url)
    with db.session() as session:
        batches = list(session.scalars(select(Batch).order_by(Batch.processed_at)))
        checkpoint = session.get(ModelState, settings.pipeline).checkpoint_path
    db.dispose()
    processed = [b for b in batches if b.status == BatchStatus.PROCESSED]
    # Initial training happens before the first commit; from the first commit on, every interval
    # between commits is one file's latency and the rows it scored.
    commits = np.array([b.processed_at.timestamp() for b in processed])
    latencies = np.diff(commits)
    rows = sum(b.rows_scored for b in processed[1:])
    timings = [f["seconds"] for f in outcome["processed_files"][1:]]
    driver_cpu, children_cpu = clock.between(commits[0], commits[-1])
    figures = {
        "files": len(processed),
        "rows": rows,
        "rows_per_s": rows / (commits[-1] - commits[0]),
        "p50_s": float(np.percentile(latencies, 50)),
        "p99_s": float(np.percentile(latencies, 99)),
        "stages": {k: float(np.median([t.get(k, 0.0) for t in timings])) for k in STAGES},
        "cpu_per_file": {"driver": driver_cpu / len(latencies), "started": children_cpu / len(latencies)},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_s": wall,
    }
    if per_line:
        figures["model_step"] = model_step_against_per_line(settings, checkpoint, processed[-1])
    return figures


def model_step_against_per_line(settings, checkpoint: str, batch) -> dict:
    """Score + update of one file's lines: the fleet step, and today's loop of one score and
    one update per line, from the same weights and states (the file's archived rows again)."""
    from features import build_features
    from flows.ingest.landing import read_batch
    from flows.ingest.validation import parse_timestamps
    from flows.model.fleet import load_learner
    from flows.storage.work_folder import resolved_path

    spec = settings.feature_spec
    rows = read_batch(resolved_path(settings.workdir, batch.stored_at), settings.log_schema)
    rows[spec.timestamp_column] = parse_timestamps(rows[spec.timestamp_column])
    features, _ = build_features(rows, spec, {})
    base = load_learner(resolved_path(settings.workdir, checkpoint), settings)

    fleet = copy.deepcopy(base)
    u, y, dt, steps = features.tensors()
    tick = time.perf_counter()
    fleet.score(u, y, None, dt, steps)
    fleet.update(u, y, None, dt, steps)
    fleet_s = time.perf_counter() - tick

    looped = copy.deepcopy(base)
    lines = [features.select([index]).tensors() for index in range(len(features.entities))]
    tick = time.perf_counter()
    for lu, ly, ldt, _ in lines:
        looped.score(lu, ly, None, ldt)
        looped.update(lu, ly, None, ldt)
    loop_s = time.perf_counter() - tick
    return {"fleet_s": fleet_s, "per_line_s": loop_s, "lines": len(features.entities)}


def river_half_space_trees(files: list[Path], rows_wanted: int) -> dict:
    """river's HalfSpaceTrees scoring and learning rows one at a time, on the sensors' ranges."""
    from river.anomaly import HalfSpaceTrees

    from flows.ingest.landing import read_batch
    from flows.settings import LogSchema

    schema = LogSchema()
    limits = {s.name: (s.min, s.max) for s in schema.sensors}
    records = []
    for path in files:
        frame = read_batch(path, schema)[schema.sensor_names]
        for row in frame.to_dict("records"):
            records.append({k: v for k, v in row.items() if v == v})  # a missing reading is left out
            if len(records) >= rows_wanted:
                break
        if len(records) >= rows_wanted:
            break
    model = HalfSpaceTrees(seed=0, limits=limits)
    tick = time.perf_counter()
    for record in records:
        model.score_one(record)
        model.learn_one(record)
    seconds = time.perf_counter() - tick
    return {"rows": len(records), "rows_per_s": len(records) / seconds}


def run_profile(label: str, config: Path, files: list[Path], env: dict[str, str | None], per_line: bool) -> dict:
    from flows.settings import load_settings

    landing = load_settings(config).paths.landing
    landing.mkdir(parents=True, exist_ok=True)
    for path in files:
        (landing / path.name).write_bytes(path.read_bytes())
    environment = {key: value for key, value in {**os.environ, **env}.items() if value is not None}
    command = [sys.executable, __file__, "--driver", str(config)] + (["--per-line"] if per_line else [])
    done = subprocess.run(command, env=environment, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{label} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def empty_rss(root: Path) -> float:
    """Peak RSS of a driver that starts, trains on two files of two lines and processes nothing
    more: the fixed cost every profile pays (imports, GE, MLflow, Prefect)."""
    files = simulate_plant(root / "empty-data", 2, 2, 40)
    config = write_config("embedded", root / "empty", {})
    return run_profile("empty", config, files, {"PREFECT_API_URL": None}, False)["peak_rss_mib"]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        lines, _, rows = item.partition("x")
        shapes.append((int(lines), int(rows)))
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="200x40,2000x40,10x5000", help="LINESxROWS per file, comma-separated")
    parser.add_argument("--entities", type=int, default=None, help="one shape: lines (with --rows)")
    parser.add_argument("--rows", type=int, default=None, help="one shape: rows per line per file")
    parser.add_argument("--batches", type=int, default=20, help="measured files (2 more train the model)")
    parser.add_argument("--workers", default="1,2", help="Dask worker counts for the servers profile")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--infra", type=Path, default=Path(".infra"), help="folder of `lru-online infra up`")
    parser.add_argument("--embedded-only", action="store_true", help="skip the servers profile")
    parser.add_argument("--per-line", action="store_true", help="add today's per-line model loop as a baseline")
    parser.add_argument(
        "--as-deployed",
        action="store_true",
        help="add an embedded run as a plant runs the defaults: anomalies, drift answered by retraining, snapshots",
    )
    parser.add_argument("--river-rows", type=int, default=50_000, help="rows for the HalfSpaceTrees yardstick")
    parser.add_argument("--driver", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        print(json.dumps(run_driver(args.driver, args.per_line)))
        return

    import torch

    shapes = parse_shapes(args.shapes)
    if args.entities or args.rows:
        shapes = [(args.entities or 200, args.rows or 40)]
    servers = not args.embedded_only
    started_services = False
    if servers:
        from infra import services

        running = services.status(args.infra)
        started_services = not all(running[name] == "up" for name in ("postgres", "s3", "mlflow", "prefect"))
    with work_folder(args.workdir, "lru-scale-") as root:
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
            f"{platform.processor() or platform.machine()}, Python {platform.python_version()}; work in {root}"
        )
        if servers and not started_services:
            print(f"note: the services of {args.infra} were up already and ran beside the embedded runs")
        startup_rss = empty_rss(root)
        results: list[tuple[str, str, dict]] = []
        yardsticks: dict[str, dict] = {}
        plants: dict[str, list[Path]] = {}
        for lines, rows in shapes:
            shape = f"{lines}x{rows}"
            files = plants[shape] = simulate_plant(root / f"data-{shape}", lines, args.batches + 2, rows)
            print(f"{shape}: {len(files)} files of {lines * rows:,} rows", flush=True)
            yardsticks[shape] = river_half_space_trees(files, args.river_rows)
            clean = {"PREFECT_API_URL": None}  # the embedded driver starts its own local API
            config = write_config("embedded", root / f"embedded-{shape}", {})
            results.append((shape, "embedded", run_profile("embedded", config, files, clean, args.per_line)))
            if args.as_deployed:
                deployed = simulate_plant(
                    root / f"data-deployed-{shape}", lines, args.batches + 2, rows, anomalies=True
                )
                config = write_config("embedded", root / f"deployed-{shape}", AS_DEPLOYED)
                results.append(
                    (shape, "embedded, as deployed", run_profile("as deployed", config, deployed, clean, False))
                )
            if args.per_line and lines <= 500:
                config = write_config("embedded", root / f"per-line-{shape}", {"update": {"lines_per_step": 1}})
                results.append((shape, "embedded, 1 line/step", run_profile("1/step", config, files, clean, False)))
        if servers:
            try:
                if started_services:
                    print(f"starting the services in {args.infra}", flush=True)
                    services.up(args.infra)
                for shape, files in plants.items():
                    results += servers_runs(shape, files, args, root)
            finally:
                if started_services:
                    services.down(args.infra)
        print_table(results, yardsticks, startup_rss, shapes)


def servers_runs(shape: str, files: list[Path], args, root: Path) -> list[tuple[str, str, dict]]:
    from distributed import LocalCluster

    from infra import services

    runs = []
    api = services.urls()["prefect_api_url"]
    for workers in [int(w) for w in args.workers.split(",")]:
        label = f"servers, {workers} Dask worker{'s' if workers > 1 else ''}"
        name = f"scale-{workers}w-{uuid.uuid4().hex[:6]}"
        os.environ["PREFECT_API_URL"] = api
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
            config = write_config(
                "servers",
                root / f"servers-{workers}-{shape}",
                {
                    "database_url": services.create_database("lru_bench"),
                    "pipeline": name,
                    "tracking": {**OVERRIDES["tracking"], "experiment": name, "model_name": name},
                    "prefect": {"dask_address": cluster.scheduler_address},
                },
            )
            runs.append((shape, label, run_profile(label, config, files, {}, False)))
        del os.environ["PREFECT_API_URL"]
    return runs


def print_table(results, yardsticks, startup_rss: float, shapes) -> None:
    header = (
        f"{'lines x rows':<13}{'profile':<24}{'rows/s':>9}{'vs emb.':>8}{'p50 s':>7}{'p99 s':>7}"
        + "".join(f"{s[:8]:>9}" for s in STAGES)
        + f"{'cpu drv':>9}{'cpu oth':>9}{'RSS MiB':>9}{'MiB/1k lines':>13}"
    )
    print()
    print(
        "per file: rows/s from the first commit to the last; p50/p99 s between commits; stages: driver median s;"
        " cpu: CPU s per file of the driver and of the processes it started"
    )
    print(header)
    print("-" * len(header))
    order = [f"{lines}x{rows}" for lines, rows in shapes]
    for shape, label, r in sorted(results, key=lambda item: order.index(item[0])):
        lines = int(shape.split("x")[0])
        base = next(x for s, p, x in results if s == shape and p == "embedded")["rows_per_s"]
        growth = (r["peak_rss_mib"] - startup_rss) / lines * 1000
        print(
            f"{shape:<13}{label:<24}{r['rows_per_s']:>9.0f}{r['rows_per_s'] / base:>7.2f}x"
            f"{r['p50_s']:>7.2f}{r['p99_s']:>7.2f}"
            + "".join(f"{r['stages'][s]:>9.3f}" for s in STAGES)
            + f"{r['cpu_per_file']['driver']:>9.2f}{r['cpu_per_file']['started']:>9.2f}"
            + f"{r['peak_rss_mib']:>9.0f}{growth:>13.1f}"
        )
    for shape, figures in yardsticks.items():
        print(f"{shape:<13}{'river HST, row by row':<24}{figures['rows_per_s']:>9.0f}   ({figures['rows']:,} rows)")
    print(f"empty run (2 lines, initial training only): peak RSS {startup_rss:.0f} MiB")
    model_steps = [(shape, r["model_step"]) for shape, label, r in results if "model_step" in r]
    if model_steps:
        print()
        print("score + update of one file, same weights: fleet step vs today's per-line loop")
        print(f"{'lines x rows':<13}{'fleet s':>9}{'per-line s':>12}{'speed-up':>10}")
        for shape, step in model_steps:
            print(
                f"{shape:<13}{step['fleet_s']:>9.3f}{step['per_line_s']:>12.3f}"
                f"{step['per_line_s'] / step['fleet_s']:>9.1f}x"
            )


if __name__ == "__main__":
    main()
