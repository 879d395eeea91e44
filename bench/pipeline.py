"""Stage timings of the continual-learning pipeline for one line's batches of 10k and 100k rows.

    python bench/pipeline.py [--rows 10000,100000] [--workdir DIR]

`--workdir DIR` keeps the work folder for a look after; without it a temporary one is removed.

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
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.common import work_folder

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
    validation = validation_costs(pipeline, workdir)
    pipeline.close()
    return {**{stage: statistics.median(s[stage] for s in samples) for stage in STAGES}, **validation}


def validation_costs(pipeline, workdir: Path) -> dict[str, float]:
    """What GE validation costs beside the stage timing: building the validator (once per
    process, from the suite file) and quarantining a failing file (a detailed run, its result
    stored and its Data Docs page built)."""
    from flows.ingest.expectations import load_suite
    from flows.ingest.landing import read_batch
    from flows.ingest.validation import BatchValidator

    settings = pipeline.settings
    tick = time.perf_counter()
    validator = BatchValidator(settings.log_schema, load_suite(pipeline.suite_file))
    build = time.perf_counter() - tick
    archived = sorted(p for p in settings.paths.archive.rglob("*") if p.is_file())[0]
    frame = read_batch(archived, settings.log_schema)
    frame.loc[frame.index[::100], "temperature"] = 1e6  # 1 % of rows out of range
    tick = time.perf_counter()
    outcome = validator.validate(frame, "broken.parquet")
    validate_failing = time.perf_counter() - tick
    tick = time.perf_counter()
    pipeline.validation_docs.record(outcome.result)
    record = time.perf_counter() - tick
    return {"context": build, "failing": validate_failing, "docs": record}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="10000,100000")
    parser.add_argument("--measured", type=int, default=2, help="measured batches per size (after a warm-up)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    sizes = [int(v) for v in args.rows.split(",")]
    with work_folder(args.workdir, "lru-bench-pipeline-") as root:
        results = {rows: run_size(rows, root, args.measured) for rows in sizes}

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.measured} batches; seconds")
    header = f"{'rows':>8} " + " ".join(f"{s:>9}" for s in STAGES) + f" {'total':>9} {'overhead':>9} {'rows/s':>9}"
    print(header)
    print("-" * len(header))
    for rows, stages in results.items():
        total = sum(stages[s] for s in STAGES)
        overhead = (total - stages["update"]) / stages["update"]
        print(
            f"{rows:>8} "
            + " ".join(f"{stages[s]:>9.3f}" for s in STAGES)
            + f" {total:>9.3f} {overhead:>8.1%} {rows / total:>9.0f}"
        )
    print("overhead = (total - update) / update: the pipeline's cost beside the model update it exists for")
    print()
    print("GE validation, seconds (per 10k rows: validate / rows * 10k)")
    header = f"{'rows':>8} {'pass':>9} {'pass/10k':>9} {'fail':>9} {'fail/10k':>9} {'store+docs':>11} {'context':>9}"
    print(header)
    print("-" * len(header))
    for rows, stages in results.items():
        per = 10_000 / rows
        print(
            f"{rows:>8} {stages['validate']:>9.3f} {stages['validate'] * per:>9.3f} {stages['failing']:>9.3f} "
            f"{stages['failing'] * per:>9.3f} {stages['docs']:>11.3f} {stages['context']:>9.3f}"
        )
    print("pass: a valid file (stage above); fail: a file with 1 % of rows out of range, detailed run;")
    print("store+docs: its result stored in the work folder's GE project and its Data Docs page built;")
    print("context: building the validator from the suite file, once per process (not per file)")


if __name__ == "__main__":
    main()
