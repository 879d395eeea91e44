"""What the benchmark scripts share: the repository's place, its benchmark configs, matplotlib
without a screen, the cores a run may use, settings run side by side and the real
`lru-online backfill` of a folder."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from flows.cores import usable_cores as usable_cores  # the benches' worker counts follow it

Result = TypeVar("Result")

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str) -> dict[str, Any]:
    """configs/NAME.yaml as a dict (empty when the file is missing)."""
    import yaml

    path = ROOT / "configs" / f"{name}.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def library_versions() -> str:
    """The releases a streamed figure depends on beyond torch: online learning carries float
    rounding forward, so another numpy, pandas or river release moves the third digit."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("numpy", "pandas", "river", "scikit-learn", "scipy"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


@contextmanager
def work_folder(given: Path | None, prefix: str) -> Iterator[Path]:
    """The bench's work folder: `given` (from --workdir) is kept for a look after the run; without
    it a temporary folder is used and removed at the end, so repeated runs do not fill the disk
    (a 2,000-line plant leaves about 260 MB)."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given.resolve()
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        yield Path(folder)


def run_in_scratch_folders(settings: list[dict], run: Callable[[dict, Path], Result], workers: int) -> list[Result]:
    """`run(setting, folder)` for every setting, each in an empty folder of its own that is
    removed after, `workers` at once (threads: each run is a child process of its own). Child
    processes get one torch thread each."""
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(workers) as pool:

        def one(numbered: tuple[int, dict]) -> Result:
            number, setting = numbered
            folder = Path(scratch) / f"setting-{number}"
            folder.mkdir()
            return run(setting, folder)

        return list(pool.map(one, enumerate(settings)))


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# A retraining beside the run is swapped in at the first file after it ends, which depends on the
# machine's speed, and so do the alarms after it. Benches that report figures from a backfill
# retrain inline, so that a figure is the same on the next machine.
REPRODUCIBLE = {"LRU_ONLINE_RETRAIN__BESIDE": "false"}


def run_cli(
    arguments: list[str],
    work: Path,
    reproducible: bool = True,
    threads: int | None = None,
    source: Path = ROOT,
    environment: dict[str, str] | None = None,
) -> str:
    """`lru-online ARGUMENTS` in a child process with its own Prefect home in WORK and quiet
    logs; `reproducible`: retraining inline (`REPRODUCIBLE`); `threads`: its torch threads;
    `source`: the checkout whose `flows` runs (another one goes first on PYTHONPATH);
    `environment`: variables set on top. Its standard output; stops the bench with the
    command's output when it fails."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(work / ".prefect"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        **(REPRODUCIBLE if reproducible else {}),
        **({"PYTHONPATH": str(source)} if source != ROOT else {}),
        **(environment or {}),
    }
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "flows", *arguments]
    # `-m` puts the working folder first on sys.path: it must be the checkout that runs.
    done = subprocess.run(command, cwd=source, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{arguments[0]} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def run_backfill(stream: Path, config: Path, work: Path, threads: int, reproducible: bool = True) -> tuple[float, str]:
    """`lru-online backfill STREAM -c CONFIG -w WORK` on `threads` torch threads (`run_cli`):
    its wall seconds and its last line (the JSON counts)."""
    started = time.perf_counter()
    output = run_cli(["backfill", str(stream), "-c", str(config), "-w", str(work)], work, reproducible, threads)
    return time.perf_counter() - started, output.strip().splitlines()[-1]
