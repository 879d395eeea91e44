"""Stage timings of the continual-learning pipeline for one line's batches of 10k and 100k rows.

    python bench/pipeline.py [--rows 10000,100000] [--workdir DIR]

For each batch size, a fresh embedded-profile work folder gets simulated batches of that size;
the first trains the initial model, the next ones go through the same code as a
`continual_update` run (ledger, GE validation, features, score, update, drift detectors, output, commit,
MLflow tracking), and each stage is timed. The model update is the work the pipeline
exists for, so it is the baseline: overhead = everything else, as a share of the update.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

STAGES = ["validate", "features", "score", "update", "drift", "output", "commit", "tracking"]


def run_size(rows: int, root: Path, measured: int) -> dict[str, float]:
    from flows.ingest.simulator import SimulationConfig, simulate
    from flows.model.initial_training import train_initial
    from flows.monitor.tracking import track_pending
    from flows.orchestrate.pipeline import Pipeline
    from flows.settings import load_settings

    workdir = root / f"rows-{rows}"
    settings = load_settings(workdir=workdir, initial_training={"batches": 1, "epochs": 1})
    settings.ensure_folders()
    config = SimulationConfig(
        entities=1,
        batches=measured + 2,
        rows_per_batch=rows,
        broken_batches={},
        gradual_drift_start=10**6,
        abrupt_drift_batch=10**6,
    )
    simulate(settings.paths.landing, workdir / "truth.json", config, settings.log_schema)
    pipeline = Pipeline(settings)
    pipeline.discover()
    train_initial(pipeline.live, pipeline.tracker, pipeline.initial_frames())
    started = datetime.now(UTC)
    samples: list[dict[str, float]] = []
    for index, batch_id in enumerate(pipeline.ledger.pending()):
        result = pipeline.process(batch_id)
        tick = time.perf_counter()
        track_pending(pipeline.db, pipeline.tracker, settings.pipeline, started)
        tracking = time.perf_counter() - tick
        if index == 0:
            continue  # warm-up: first-use costs of GE, MLflow and the allocator
        samples.append({**{k: result.timings.get(k, 0.0) for k in STAGES}, "tracking": tracking})
    pipeline.close()
    return {stage: statistics.median(s[stage] for s in samples) for stage in STAGES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="10000,100000")
    parser.add_argument("--measured", type=int, default=2, help="measured batches per size (after a warm-up)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="lru-bench-pipeline-"))
    sizes = [int(v) for v in args.rows.split(",")]
    results = {rows: run_size(rows, root, args.measured) for rows in sizes}

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.measured} batches; seconds")
    header = f"{'rows':>8} " + " ".join(f"{s:>9}" for s in STAGES) + f" {'total':>9} {'overhead':>9} {'rows/s':>9}"
    print(header)
    print("-" * len(header))
    for rows, stages in results.items():
        total = sum(stages.values())
        overhead = (total - stages["update"]) / stages["update"]
        print(
            f"{rows:>8} "
            + " ".join(f"{stages[s]:>9.3f}" for s in STAGES)
            + f" {total:>9.3f} {overhead:>8.1%} {rows / total:>9.0f}"
        )
    print("overhead = (total - update) / update: the pipeline's cost beside the model update it exists for")


if __name__ == "__main__":
    main()
