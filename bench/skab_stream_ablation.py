"""What a stream needs to tell SKAB's faults apart: the bench's `lru` with one ingredient taken away.

    python bench/skab_stream_ablation.py [--data ../shared/data/skab] [--workers 2]

The pipeline's stream (`bench/skab_pipeline.py`) alarms on SKAB's logs at chance, where the
bench's `lru` does not. Both carry one model through the files; this isolates what else differs.
Every variant runs the bench's `lru` under the `continual` protocol on the tuning split of
`configs/skab.yaml` (anomaly-free.csv first, then valve1 0-7; the report split is never run),
with the model trained once, on anomaly-free.csv, and never re-fitted on a file's first rows
(`adapt_epochs` and `refit_epochs` 0): it learns only online, from the chunks it does not alarm
on, as the pipeline does. What a variant changes is how a file's rows are measured:

- `per-run baseline`: the bench's `lru` as it is: each file is standardised by its own first 400
  rows, held fixed after; the detector is recalibrated on them; slow sensors enter as changes;
- `baseline of the first run`: the standardisation of anomaly-free.csv kept for every file;
- `running per run`: each file standardised by the running mean and spread of its rows up to
  each row (river's StandardScaler, restarted per file), not held fixed;
- `running over the stream`: the same, never restarted (the pipeline's one line);
- `held after the first rows`: running per file over its first 400 rows (so its training part
  is measured causally, as a stream must), then held;
- `calibrated once`: the detector calibrated on anomaly-free.csv only;
- `slow sensors as levels`: no sensor enters as its change.

Printed per variant: F1, FAR, MAR and NAB on the files' test rows (400 to the end), and the ROC
AUC of the per-row forecast error against the labels, per file (0.5: no better than chance).
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.anomaly_metrics import roc_auc
from bench.common import load_config, usable_cores
from bench.skab import (
    TRAIN_ROWS,
    LruDetectorConfig,
    LruForecastResidual,
    configured_lru,
    in_tuning_split,
    load_folder,
    run_method,
)

SCALINGS = ("per-run", "first-run", "running-per-run", "running-stream", "held-per-run")


class AblatedLru(LruForecastResidual):
    """The bench's `lru` with its per-run baseline, its recalibration or its slow sensors changed."""

    def __init__(self, config: LruDetectorConfig, scaling: str, recalibrate: bool) -> None:
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
        super().__init__(config)
        self.scaling, self.recalibrate = scaling, recalibrate
        self.seen_rows: np.ndarray | None = None  # what a running standardisation has learned from

    def _set_baseline(self, rows: np.ndarray) -> None:
        first_run = self.seen_rows is None
        if first_run or self.scaling != "first-run":
            super()._set_baseline(rows)  # the slow sensors and their change's scale, at least
        if first_run or self.scaling in ("running-per-run", "held-per-run"):
            self.seen_rows = np.empty((0, rows.shape[1]))

    def adapt(self, rows: np.ndarray) -> None:
        calibrated = self.alarm_state
        super().adapt(rows)
        if not self.recalibrate and calibrated is not None:
            self.alarm_state = calibrated

    def _tensor(self, rows: np.ndarray) -> torch.Tensor:
        if self.scaling in ("per-run", "first-run"):
            return super()._tensor(rows)
        # Row t measured by the mean and spread of everything seen up to and including it
        # (held: of the run's first TRAIN_ROWS rows, once it has seen them).
        history = np.concatenate([self.seen_rows, rows])
        count = np.arange(1, len(history) + 1)[:, None]
        mean = np.cumsum(history, axis=0) / count
        spread = np.sqrt(np.maximum(np.cumsum(history**2, axis=0) / count - mean**2, 0.0))
        if self.scaling == "held-per-run":
            mean[TRAIN_ROWS:], spread[TRAIN_ROWS:] = mean[TRAIN_ROWS - 1], spread[TRAIN_ROWS - 1]
        mean, spread = mean[-len(rows) :], np.where(spread[-len(rows) :] > 0, spread[-len(rows) :], 1.0)
        z = (rows - mean) / spread
        if self.slow.any():
            before = z[0] if self.previous_row is None else (self.previous_row - mean[0]) / spread[0]
            change = np.diff(np.concatenate([before[None], z]), axis=0)
            z[:, self.slow] = change[:, self.slow] / self.change_scale[self.slow]
        self.previous_row = rows[-1]
        self.seen_rows = history
        return torch.tensor(z, dtype=torch.float32)[None]


VARIANTS: dict[str, dict] = {
    "per-run baseline": {"scaling": "per-run", "recalibrate": True},
    "baseline of the first run": {"scaling": "first-run", "recalibrate": True},
    "running per run": {"scaling": "running-per-run", "recalibrate": True},
    "running over the stream": {"scaling": "running-stream", "recalibrate": True},
    "held after the first rows": {"scaling": "held-per-run", "recalibrate": True},
    "calibrated once": {"scaling": "per-run", "recalibrate": False},
    "slow sensors as levels": {"scaling": "per-run", "recalibrate": True, "slow_as_levels": True},
}


def run_variant(name: str, data: Path) -> tuple[str, dict, list[float]]:
    torch.set_num_threads(1)
    files, normal = load_folder(data)
    if normal is None:
        raise SystemExit(f"{data}: no anomaly-free.csv; the stream's model trains on it")
    files = [f for f in files if in_tuning_split(f, load_config("skab").get("tuning_files", []))]
    variant = VARIANTS[name]
    base = configured_lru()
    config = replace(base, adapt_epochs=0, refit_epochs=0)
    if variant.get("slow_as_levels"):
        config = replace(config, slow_autocorrelation=np.inf)

    def make() -> AblatedLru:
        return AblatedLru(config, variant["scaling"], variant["recalibrate"])

    result = run_method("lru", files, normal, "continual", None, make=make)
    aucs = [
        roc_auc(item.anomaly[TRAIN_ROWS:], np.nan_to_num(d.scores))
        for item, d in zip(files, result.detections, strict=True)
    ]
    return name, result.figures(), aucs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/skab")
    parser.add_argument("--workers", type=int, default=min(2, usable_cores()))
    args = parser.parse_args()
    print(
        f"tuning split of configs/skab.yaml, protocol continual; torch {torch.__version__}, "
        f"{args.workers} workers of 1 thread"
    )
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(run_variant, VARIANTS, [args.data] * len(VARIANTS)))
    print(f"{'variant':<28}{'F1':>7}{'FAR %':>8}{'MAR %':>8}{'NAB':>7}   forecast-error AUC per file")
    for name, f, aucs in results:
        cells = " ".join(f"{a:.2f}" for a in aucs)
        print(f"{name:<28}{f['f1']:>7}{f['far_percent']:>8}{f['mar_percent']:>8}{f['nab_standard']:>7}   {cells}")


if __name__ == "__main__":
    main()
