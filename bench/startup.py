"""What a `lru-online run` costs before and after its own work, on embedded defaults.

    python bench/startup.py [--runs 3] [--baseline-src DIR] [--workdir DIR]

A trained work folder is made once (three simulated lines, nine files each through a first
run); then, each time in a fresh copy of it, `lru-online run` with nothing landed (the idle
answer) and with one landed file of 240 rows (a new file of one line, as a scheduled run meets
it): first with no Prefect API configured (the command starts Prefect's temporary API, as on
embedded defaults), then against a Prefect API that is already up (as under `lru-online serve`
or on servers; the bench starts one). For a one-file run the file's own work is what the
pipeline records for it (the sum of its stage seconds in `sequence_metrics`: state, features,
score, update, alarms, drift, output; its validation runs ahead in a thread beside them); the
rest of the wall time is start-up and shut-down. `--baseline-src` runs the same commands from
another checkout of the repository (its `flows` first on PYTHONPATH), alternated with this one,
so both columns meet the machine in the same state. Last, each library's import alone in a
fresh interpreter: the floor any process that uses it pays.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, library_versions, run_cli
from flows.orchestrate.temporary_api import TemporaryApi

HELD_FILE = "line-1_batch-0009.parquet"
LIBRARIES = {
    "torch": "torch",
    "prefect": "prefect",
    "Great Expectations": "great_expectations",
    "MLflow": "mlflow",
    "river (ADWIN's core)": "river._river_rust.drift",
}


def _cli(source: Path, work: Path, *arguments: str, api_url: str | None = None) -> tuple[float, str]:
    """`lru-online ARGUMENTS -w WORK` from the checkout `source`, on the defaults (retraining
    beside) and one torch thread, reporting to `api_url` when given: wall seconds and its last
    output line."""
    environment = {"PREFECT_API_URL": api_url} if api_url else None
    started = time.perf_counter()
    output = run_cli([*arguments, "-w", str(work)], work, False, 1, source, environment)
    return time.perf_counter() - started, output.strip().splitlines()[-1]


def trained_folder(root: Path) -> tuple[Path, Path]:
    """A work folder trained on eight files per line and through its ninth, and the held tenth
    file of line-1 (`HELD_FILE`)."""
    work, held = root / "trained", root / "held"
    _cli(ROOT, work, "simulate", "--entities", "3", "--batches", "10")
    held.mkdir()
    for path in (work / "landing").glob("*batch-0009*"):
        shutil.move(path, held / path.name)
    _cli(ROOT, work, "run")
    return work, held / HELD_FILE


def own_work_seconds(work: Path) -> float:
    """The last committed file's stage seconds as the pipeline recorded them."""
    with sqlite3.connect(work / "lru_online.db") as db:
        (metrics,) = db.execute("select metrics from sequence_metrics order by sequence desc limit 1").fetchone()
    return sum(v for k, v in json.loads(metrics).items() if k.startswith("seconds_"))


def _one_file(source: Path, trained: Path, held: Path, work: Path, api_url: str | None) -> tuple[float, float]:
    """A run of the held file in a fresh copy of the trained folder: wall and own-work seconds."""
    shutil.copytree(trained, work)
    shutil.copy(held, work / "landing" / held.name)
    seconds, answer = _cli(source, work, "run", api_url=api_url)
    assert json.loads(answer)["processed"] == 1, answer
    work_seconds = own_work_seconds(work)
    shutil.rmtree(work)
    return seconds, work_seconds


def measure(source: Path, trained: Path, held: Path, scratch: Path, api_url: str) -> dict[str, float]:
    """One idle run, and one run of the held file without and with a running Prefect API."""
    idle_work = scratch / "idle"
    shutil.copytree(trained, idle_work)
    idle_seconds, answer = _cli(source, idle_work, "run")
    assert json.loads(answer).get("idle") == 1, answer
    shutil.rmtree(idle_work)
    file_seconds, work_seconds = _one_file(source, trained, held, scratch / "one-file", None)
    served_seconds, served_work = _one_file(source, trained, held, scratch / "served", api_url)
    return {
        "idle": idle_seconds,
        "file": file_seconds,
        "work": work_seconds,
        "over": file_seconds - work_seconds,
        "served": served_seconds,
        "served_over": served_seconds - served_work,
    }


def import_seconds(module: str) -> float:
    """`import MODULE` alone in a fresh interpreter, timed inside it."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="measurements of each column (medians printed)")
    parser.add_argument("--baseline-src", type=Path, help="another checkout of the repository to run beside this one")
    parser.add_argument("--workdir", type=Path, help="where the folders go (default: a temporary folder)")
    arguments = parser.parse_args()

    sources = {"this checkout": ROOT}
    if arguments.baseline_src:
        sources = {"baseline": arguments.baseline_src.resolve(), **sources}
    print(
        f"Python {platform.python_version()}, {os.cpu_count()} cores, 1 torch thread; {library_versions()}",
        flush=True,
    )
    if arguments.workdir:
        arguments.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=arguments.workdir) as folder:
        root = Path(folder)
        trained, held = trained_folder(root)
        figures: dict[str, list[dict[str, float]]] = {name: [] for name in sources}
        os.environ.pop("PREFECT_API_URL", None)
        os.environ["PREFECT_HOME"] = str(root / "api" / ".prefect")
        with TemporaryApi(root / "api") as api:  # the running API of the last rows
            api.ready()
            os.environ.pop("PREFECT_API_URL", None)  # set by TemporaryApi; only the served runs get it
            for _ in range(arguments.runs):
                for name, source in sources.items():  # alternated: both columns meet the same machine
                    figures[name].append(measure(source, trained, held, root / "scratch", api.api_url))
    names = list(sources)
    rows = [
        ("empty run (nothing landed), s", "idle"),
        ("run of one 240-row file, s", "file"),
        ("  of which the file's own work, s", "work"),
        ("  start-up and shut-down, s", "over"),
        ("the same, a Prefect API already up, s", "served"),
        ("  start-up and shut-down, s", "served_over"),
    ]
    print(f"\n{'':36}" + "".join(f"{name:>16}" for name in names) + f"   (median of {arguments.runs}; all runs)")
    for label, key in rows:
        medians = [statistics.median(run[key] for run in figures[name]) for name in names]
        every = "; ".join(" ".join(f"{run[key]:.2f}" for run in figures[name]) for name in names)
        print(f"{label:36}" + "".join(f"{value:16.2f}" for value in medians) + f"   ({every})")
    print("\nimport alone in a fresh interpreter, s")
    for label, module in LIBRARIES.items():
        print(f"  {label:34}{import_seconds(module):16.2f}")


if __name__ == "__main__":
    main()
