"""Soak test: thousands of mixed good and bad batches through `continual_update`, with the
process SIGKILLed at random stages, on the embedded profile.

    python bench/soak.py [--batches 10000] [--rows 40] [--per-run 500] [--kill-rate 0.5] [--workdir DIR]

`--workdir DIR` keeps the work folder for a look after; without it a temporary one is removed.

Files land in rounds of --per-run: good batches of several lines, with broken files
(wrong schema, NaN bursts, out-of-range values, unsorted times, binary junk), exact duplicates
and all-late batches mixed in. Each round is one `lru-online run` in a fresh process; with
probability --kill-rate it gets LRU_ONLINE_KILL_AT=<random stage> after a random number of
passes and is killed there, and the next round carries on. A Prefect server on 127.0.0.1 is
started once for all rounds. At the end: rows received / scored / quarantined / late (they must
balance), the batches, peak RSS of each round (it must stay flat), and throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import work_folder

STAGES = ("ledger", "validated", "features", "scored", "updated", "in_commit", "committed")


def good_batch(entity: str, start: pd.Timestamp, rows: int, rng: np.random.Generator) -> pd.DataFrame:
    load = rng.uniform(0.3, 1.0)
    stamps = start + pd.to_timedelta(np.cumsum(rng.uniform(2, 18, rows)), unit="s")
    return pd.DataFrame(
        {
            "entity": entity,
            "timestamp": stamps.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "temperature": 40 + 30 * load + rng.normal(0, 0.5, rows),
            "vibration": 2 + 3 * load + rng.normal(0, 0.2, rows),
            "pressure": 2 + 8 * load + rng.normal(0, 0.2, rows),
            "flow": 100 + 250 * load + rng.normal(0, 4, rows),
            "motor_current": 20 + 50 * load + rng.normal(0, 1, rows),
            "anomaly": 0,
        }
    )


def land_round(landing: Path, first: int, count: int, rows: int, clocks: dict, rng: np.random.Generator) -> dict:
    """Writes `count` files; returns how many of each kind and the rows they hold."""
    kinds = {"good": 0, "broken": 0, "duplicate": 0, "late": 0}
    written: list[Path] = []
    for index in range(first, first + count):
        entity = f"line-{index % 8}"
        draw = rng.random()
        name = landing / f"{entity}_{index:06d}.csv"
        if draw < 0.05 and written:  # the same bytes again, under another name
            shutil.copy(written[int(rng.integers(len(written)))], landing / f"dup-{index:06d}.csv")
            kinds["duplicate"] += 1
            continue
        start = clocks.get(entity, pd.Timestamp("2026-01-01T00:00:00Z"))
        frame = good_batch(entity, start, rows, rng)
        if draw < 0.10:  # all rows older than what this line already delivered
            frame = good_batch(entity, start - pd.Timedelta(days=30), rows, rng)
            kinds["late"] += 1
        elif draw < 0.20:
            kind = rng.choice(["schema", "nan", "range", "unsorted", "binary"])
            if kind == "schema":
                frame = frame.drop(columns=["pressure"])
            elif kind == "nan":
                frame.loc[: rows - 2, "temperature"] = np.nan
            elif kind == "range":
                frame.loc[3, "flow"] = 1e6
            elif kind == "unsorted":
                frame = frame.iloc[::-1]
            if kind == "binary":
                name.write_bytes(rng.bytes(512))
            else:
                frame.to_csv(name, index=False)
            kinds["broken"] += 1
            written.append(name)
            continue
        else:
            clocks[entity] = pd.Timestamp(frame["timestamp"].iloc[-1]) + pd.Timedelta(seconds=1)
            kinds["good"] += 1
        frame.to_csv(name, index=False)
        written.append(name)
    return kinds


class PeakRSS(threading.Thread):
    """Samples a process's resident memory from /proc until it exits."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_kb = pid, 0

    def run(self) -> None:
        status = Path(f"/proc/{self.pid}/status")
        while True:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.2)


def start_prefect_server(home: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    import urllib.request

    for _ in range(180):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1)
            return server
        except OSError:
            time.sleep(1)
    raise RuntimeError("the Prefect server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--per-run", type=int, default=500)
    parser.add_argument("--kill-rate", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--port", type=int, default=4299)
    args = parser.parse_args()
    with work_folder(args.workdir, "lru-soak-") as workdir:
        soak(args, workdir)


def soak(args: argparse.Namespace, workdir: Path) -> None:
    """Lands the rounds of files into `workdir`, runs and kills, then prints the balance."""
    rng, chooser = np.random.default_rng(args.seed), random.Random(args.seed)
    config = workdir / "soak.yaml"
    config.write_text(
        "\n".join(
            [
                f"workdir: {workdir}",
                "model: {d_model: 16, d_state: 16, n_layers: 1}",
                "update: {window: 32, replay_capacity: 128, replay_batch: 2}",
                "initial_training: {batches: 8, epochs: 2}",
                "drift: {on_detect: record}",
                "tracking: {snapshot_every: 0}",
            ]
        )
    )
    landing = workdir / "landing"
    landing.mkdir(exist_ok=True)
    server = start_prefect_server(workdir / ".prefect-server", args.port)
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{args.port}/api"}
    landed = {"good": 0, "broken": 0, "duplicate": 0, "late": 0}
    clocks: dict = {}
    rounds = []
    started = time.perf_counter()
    try:
        first = 0
        while first < args.batches or not rounds or rounds[-1]["killed"]:
            count = min(args.per_run, args.batches - first)
            if count > 0:
                for kind, n in land_round(landing, first, count, args.rows, clocks, rng).items():
                    landed[kind] += n
                first += count
            kill = count > 0 and chooser.random() < args.kill_rate
            run_env = dict(env)
            if kill:
                run_env["LRU_ONLINE_KILL_AT"] = chooser.choice(STAGES)
                run_env["LRU_ONLINE_KILL_AFTER"] = str(chooser.randrange(max(count, 1)))
            tick = time.perf_counter()
            process = subprocess.Popen(
                [sys.executable, "-m", "flows", "run", "--config", str(config)],
                env=run_env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            sampler = PeakRSS(process.pid)
            sampler.start()
            code = process.wait()
            sampler.join()
            rounds.append(
                {
                    "round": len(rounds) + 1,
                    "landed_so_far": first,
                    "killed": code == -signal.SIGKILL,
                    "stage": run_env.get("LRU_ONLINE_KILL_AT", "-"),
                    "exit": code,
                    "seconds": time.perf_counter() - tick,
                    "peak_rss_mb": sampler.peak_kb / 1024,
                }
            )
            print(json.dumps(rounds[-1]), flush=True)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
    elapsed = time.perf_counter() - started

    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "flows", "status", "--config", str(config), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    rows, batches = status["rows"], status["batches"]
    print()
    print(f"landed files: {sum(landed.values())} ({landed}); rows per good/late/broken file: {args.rows}")
    peaks = [r["peak_rss_mb"] for r in rounds]
    processed_rows = rows["scored"] + rows["quarantined"] + rows["late"]
    table = {
        "rounds": len(rounds),
        "killed": sum(r["killed"] for r in rounds),
        "seconds": f"{elapsed:.0f}",
        "batches/s": f"{sum(batches.values()) / elapsed:.2f}",
        "rows/s": f"{processed_rows / elapsed:.0f}",
        "RSS first MB": f"{peaks[0]:.0f}",
        "RSS last MB": f"{peaks[-1]:.0f}",
        "RSS max MB": f"{max(peaks):.0f}",
    }
    print(" ".join(f"{k:>13}" for k in table))
    print(" ".join(f"{v!s:>13}" for v in table.values()))
    print(f"batches: {batches}")
    print(f"rows: {rows}; received = scored + quarantined + late: {rows['received'] == processed_rows}")


if __name__ == "__main__":
    main()
