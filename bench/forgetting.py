"""What the pipeline's model forgot over a stream: the first fifth of each line's online rows,
re-scored by the final live model (frozen), beside the error it made on them while streaming.

    python bench/forgetting.py --workdir WORK [--config FILE] [--share 0.2]

WORK is a work folder a backfill (or any runs) filled: its ledger names the processed files
and their output Parquet files, which hold every scored row's model inputs, targets and
one-step residuals as the model of that time made them. Per line, the rows of its online files
(not those of initial training, which the first model was fitted on) are ordered by time and
the first `--share` of them re-scored by the live model: each line's sequence is run from a
fresh state through its initial-training rows and on into those rows (each file from a fresh
state where `log_schema.file_is_run` makes every file a run), as it was streamed, so only the
weights differ. With the forecast mixture on (`mixture.enabled`) the streamed residuals are
the mixture's, so the frozen model's forecasts go through the same mixture, started afresh on
each sequence as it was on the line: the figure is then the forecaster a user gets. Printed:
the mean squared one-step residual over those rows (targets on the model's standardised scale,
entries both scored) while streaming and by the final model, and their ratio: above 1 the
final model does worse on the early stream than the model of that time did (forgetting), below
1 it still gained on it (backward transfer). The same figure as bench/ett.py's `fifth:stream` /
`fifth:frozen`, for the product's own forecaster.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.common import library_versions
from features import FeatureBatch, FeatureSpec
from flows.model.forecast_mixture import residuals_from_a_fresh_mixture
from flows.settings import Settings, load_settings


@dataclass(frozen=True)
class Forgetting:
    lines: int
    rows: int  # rows re-scored (the first share of each line's online rows)
    streaming_mse: float
    frozen_mse: float

    @property
    def ratio(self) -> float:
        return self.frozen_mse / self.streaming_mse if self.streaming_mse > 0 else float("nan")


def processed_outputs(settings: Settings) -> list[list[Path]]:
    """The output files of every processed file (all its parts and groups), in the order the
    files were processed."""
    from sqlalchemy import select

    from flows.storage.database import Database
    from flows.storage.models import Batch
    from flows.storage.work_folder import resolved_path

    db = Database(settings.database_url)
    try:
        with db.session() as session:
            stored = session.scalars(
                select(Batch.output_path)
                .where(Batch.status == "processed", Batch.output_path.is_not(None))
                .order_by(Batch.processed_at, Batch.id)
            ).all()
    finally:
        db.dispose()
    outputs = []
    for name in stored:
        path = resolved_path(settings.workdir, name)
        # batch-<id>-part-<k>[-group-<g>].parquet: every part and group of the file
        outputs.append(sorted(path.parent.glob(f"{path.stem.split('-part')[0]}-*.parquet")) or [path])
    return outputs


def _read(files: list[Path], file_number: int) -> pd.DataFrame:
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    frame["file_number"] = file_number
    return frame


def sequences(rows: pd.DataFrame, spec: FeatureSpec, file_is_run: bool) -> tuple[FeatureBatch, pd.DataFrame]:
    """The rows as the model's sequences (one per line, or one per line and file for runs),
    and the rows in the batch's flat order."""
    keys = [spec.entity_column, "file_number"] if file_is_run else [spec.entity_column]
    rows = rows.sort_values([*keys, spec.timestamp_column], kind="stable")
    # Sorted by the keys, each sequence's rows are contiguous: it starts where the keys change.
    codes = rows.groupby(keys, sort=False).ngroup().to_numpy()
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    names = rows[keys].iloc[starts].astype(str).agg("/".join, axis=1).tolist()
    targets = rows[[f"target_{s}" for s in spec.sensors]].to_numpy(np.float32)
    stretch = [f"level_stretch_{s}" for s in spec.sensors]  # absent from outputs written before it
    batch = FeatureBatch(
        entities=names,
        offsets=np.append(starts, len(rows)).astype(np.int64),
        timestamps=pd.DatetimeIndex(rows[spec.timestamp_column]),
        inputs=rows[spec.input_names].to_numpy(np.float32),
        targets=targets,
        dt=rows["dt"].to_numpy(np.float32),
        raw=targets.astype(np.float64),
        labels=None,
        level_stretch=rows[stretch].to_numpy(np.float32) if set(stretch) <= set(rows.columns) else None,
    )
    return batch, rows


def measure(settings: Settings, share: float = 0.2) -> Forgetting:
    """The first `share` of each line's online rows: streamed and frozen residuals (see above)."""
    from flows.model.live import LiveModel
    from flows.storage.database import Database

    spec = settings.feature_spec
    outputs = processed_outputs(settings)
    # Initial training fits the first model on the first valid files, then processes them
    # first: their scores are in-sample, so they are context here, not measured.
    trained_on = settings.initial_training.batches
    if len(outputs) <= trained_on:
        raise SystemExit(f"{settings.workdir}: no file processed after initial training; nothing to measure")
    frames = [_read(files, number) for number, files in enumerate(outputs)]
    initial, online = frames[:trained_on], pd.concat(frames[trained_on:], ignore_index=True)
    online = online.sort_values([spec.entity_column, spec.timestamp_column], kind="stable")
    position = online.groupby(spec.entity_column, sort=False).cumcount()
    length = online.groupby(spec.entity_column, sort=False)[spec.timestamp_column].transform("size")
    early = online[position < np.ceil(share * length)].copy()
    early["measured"] = True
    context = pd.concat([*initial, early], ignore_index=True)
    context["measured"] = context["measured"].fillna(False).astype(bool)

    batch, ordered = sequences(context, spec, settings.log_schema.file_is_run)
    db = Database(settings.database_url)
    try:
        learner = LiveModel(settings, db).load()
    finally:
        db.dispose()
    u, y, dt, steps = batch.tensors()
    with torch.no_grad():
        scored = learner.score(u, y, None, dt, steps)
        residuals = scored.residuals
        mixture = settings.mixture.setup()
        if mixture is not None:
            # The stored residuals are the mixture's: the frozen model's forecasts go through a
            # mixture started afresh on each sequence, as the streamed one started on the line.
            residuals = residuals_from_a_fresh_mixture(mixture, scored.forecast, y, steps)
        frozen = batch.flat(residuals.float().numpy())
    measured = ordered["measured"].to_numpy()
    streamed = ordered[[f"residual_{s}" for s in spec.sensors]].to_numpy(np.float64)[measured]
    frozen = frozen[measured].astype(np.float64)
    both = np.isfinite(streamed) & np.isfinite(frozen)
    return Forgetting(
        lines=int(early[spec.entity_column].nunique()),
        rows=int(measured.sum()),
        streaming_mse=float(np.mean(streamed[both] ** 2)),
        frozen_mse=float(np.mean(frozen[both] ** 2)),
    )


def report(result: Forgetting, share: float) -> str:
    return (
        f"forgetting: first {share:.0%} of each line's online rows ({result.rows:,} rows, {result.lines} lines), "
        f"one-step MSE while streaming {result.streaming_mse:.4f}, by the final model (frozen) "
        f"{result.frozen_mse:.4f}: {result.ratio:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=None, help="the config the work folder ran with")
    parser.add_argument("--share", type=float, default=0.2)
    args = parser.parse_args()
    if not 0 < args.share <= 1:
        raise SystemExit(f"--share must be in (0, 1], got {args.share}")
    torch.set_num_threads(1)
    settings = load_settings(args.config, args.workdir)
    print(f"torch {torch.__version__}, 1 thread, {library_versions()}; work folder {settings.workdir}")
    print(report(measure(settings, args.share), args.share))


if __name__ == "__main__":
    main()
