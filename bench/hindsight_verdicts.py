"""Would hindsight confirm or retract the online alarms well? An offline check before the pipeline
does it (issue 39): a work folder's alarm episodes judged from both sides once later rows exist.

    python bench/hindsight_verdicts.py --workdir WORK [--config FILE] [--margin 128]
                                       [--null-spans 64] [--retract-below 0.9] [--seed 0]

From a work folder a run or backfill filled (outputs with `target_*`, `dt`, `anomaly` and the
label column, as the demo's and SKAB's streams carry): a `lru_online.hindsight.HindsightModel`
is trained on the rows of the initial-training files (as initial training would), with random
spans of rows hidden from its input so that it learns to bridge them. Then each online alarm
episode of a later file (a line's alarmed rows, runs fewer than 4 quiet rows apart merged) is
judged with its own rows hidden: every row of the episode is predicted from `--margin` rows
before its onset and after its end, and the episode's score is the mean over its rows of the
mean squared standardised residual. The same is done for `--null-spans` spans of the same length
drawn from that line's normal rows (not alarmed, not labelled: the labels are only read to score
at the end) of the training files, or with `--null-rows N` from the N rows before its onset that
did not alarm (the line's current regime); the episode is retracted when its score lies below the
`--retract-below` quantile of theirs, confirmed otherwise. Printed: precision, recall, F1 and
false alarms per 1,000 normal rows of the online alarms and of the confirmed ones, on the
labelled rows of the files after initial training.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.common import library_versions
from bench.demo_alarms import counts
from bench.forgetting import processed_outputs
from flows.settings import Settings, load_settings
from lru_online.hindsight import HindsightConfig, HindsightModel

WINDOW = 256  # rows per training window
MERGE_ROWS = 4  # alarmed runs of a line fewer quiet rows apart are one episode


@dataclass
class Line:
    values: np.ndarray  # (T, S) standardised readings, NaN where absent
    dt: np.ndarray  # (T,)
    alarm: np.ndarray  # (T,) bool, the online flags
    label: np.ndarray  # (T,) bool
    training: np.ndarray  # (T,) bool: rows of the initial-training files


def load_lines(settings: Settings) -> dict[str, Line]:
    spec = settings.feature_spec
    frames = []
    for number, parts in enumerate(processed_outputs(settings)):
        frame = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
        frame["file_number"] = number
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True)
    if spec.entity_column not in rows:
        rows[spec.entity_column] = settings.log_schema.single_line
    label = next((c for c in rows if c.startswith("label_anomaly")), None)
    if label is None:
        raise SystemExit(f"{settings.workdir}: the outputs carry no label_anomaly column to score against")
    rows = rows.sort_values([spec.entity_column, spec.timestamp_column], kind="stable")
    first_online = settings.initial_training.batches
    lines = {}
    for entity, part in rows.groupby(spec.entity_column, sort=True):
        files = part["file_number"].to_numpy()
        lines[str(entity)] = Line(
            values=part[[f"target_{s}" for s in spec.sensors]].to_numpy(np.float64),
            dt=part["dt"].to_numpy(np.float64),
            alarm=part["anomaly"].to_numpy().astype(bool),
            label=part[label].fillna(0).to_numpy().astype(bool),
            training=np.isin(files, np.unique(files)[:first_online]) if first_online else np.zeros(len(part), bool),
        )
    return lines


def _batch(windows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, ...]:
    """(values, dt, hidden) windows, right-padded: readings, input present, target present, dt, steps."""
    length = max(len(v) for v, _, _ in windows)
    lines, sensors = len(windows), windows[0][0].shape[1]
    values = np.zeros((lines, length, sensors))
    present = np.zeros((lines, length, sensors), bool)
    dt = np.zeros((lines, length))
    steps = np.zeros((lines, length), bool)
    hidden = np.zeros((lines, length), bool)
    for i, (v, d, h) in enumerate(windows):
        values[i, : len(v)] = np.nan_to_num(v)
        present[i, : len(v)] = np.isfinite(v)
        dt[i, : len(v)], steps[i, : len(v)], hidden[i, : len(v)] = d, True, h
    present_t = torch.tensor(present)
    shown = present_t & ~torch.tensor(hidden)[..., None]
    return torch.tensor(values), shown, present_t, torch.tensor(dt), torch.tensor(steps)


def train(model: HindsightModel, lines: dict[str, Line], epochs: int, rng: np.random.Generator) -> list[float]:
    windows = []
    for line in lines.values():
        rows = np.flatnonzero(line.training)
        for start in range(0, len(rows) - WINDOW // 4, WINDOW):
            take = rows[start : start + WINDOW]
            windows.append((line.values[take], line.dt[take]))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(epochs):
        masked = []
        for values, dt in windows:  # hide one to three spans of 1-64 rows: learn to bridge them
            hide = np.zeros(len(values), bool)
            for _ in range(rng.integers(1, 4)):
                width = int(rng.integers(1, 65))
                lo = int(rng.integers(0, max(len(values) - width, 1)))
                hide[lo : lo + width] = True
            masked.append((values, dt, hide))
        readings, shown, present, dt, steps = _batch(masked)
        predicted = model(readings, shown, dt, steps)
        used = present & steps[..., None]
        loss = (torch.where(used, readings - predicted, 0.0) ** 2).sum() / used.sum().clamp(min=1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def episodes(alarm: np.ndarray) -> list[tuple[int, int]]:
    rows = np.flatnonzero(alarm)
    if not len(rows):
        return []
    cuts = np.flatnonzero(np.diff(rows) > MERGE_ROWS)
    starts, ends = np.r_[rows[0], rows[cuts + 1]], np.r_[rows[cuts], rows[-1]]
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def hidden_residuals(model: HindsightModel, line: Line, spans: list[tuple[int, int]], margin: int) -> list[np.ndarray]:
    """Each span's residuals (rows, S) with its own rows hidden from the model's input: its rows
    predicted from `margin` rows before and after it. NaN where a reading is absent."""
    windows, inside = [], []
    for start, end in spans:
        lo, hi = max(start - margin, 0), min(end + margin + 1, len(line.values))
        hide = np.zeros(hi - lo, bool)
        hide[start - lo : end - lo + 1] = True
        windows.append((line.values[lo:hi], line.dt[lo:hi], hide))
        inside.append(hide)
    out = []
    for first in range(0, len(windows), 64):
        readings, shown, present, dt, steps = _batch(windows[first : first + 64])
        with torch.no_grad():
            residual = torch.where(present, readings - model(readings, shown, dt, steps), torch.nan).numpy()
        out += [residual[i, : len(hide)][hide] for i, hide in enumerate(inside[first : first + 64])]
    return out


def span_scores(residuals: list[np.ndarray], scale: np.ndarray) -> np.ndarray:
    """Each span's mean over its rows and sensors of the squared standardised residual."""
    return np.asarray([float(np.nanmean((r / scale) ** 2)) for r in residuals])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--margin", type=int, default=128)
    parser.add_argument("--null-spans", type=int, default=64)
    parser.add_argument("--retract-below", type=float, default=0.9)
    parser.add_argument(
        "--null-rows", type=int, default=0, help="> 0: null spans from this many rows before the onset, not alarmed"
    )
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = args.config or (args.workdir / "config.yaml" if (args.workdir / "config.yaml").exists() else None)
    settings = load_settings(config, workdir=args.workdir)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    lines = load_lines(settings)
    sensors = settings.feature_spec.sensors
    sources: dict[str, list[int]] = {}
    for index, sensor in enumerate(settings.log_schema.sensors):
        sources.setdefault(sensor.source or sensor.name, []).append(index)
    model = HindsightModel(sources, HindsightConfig()).double()
    losses = train(model, lines, args.epochs, rng)
    print(f"{library_versions()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    shape = f"{len(lines)} lines, {len(sensors)} sensors in {len(sources)} sources"
    print(f"{shape}; training loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    online_all, confirmed_all, truth_all = [], [], []
    judged = retracted = 0
    for line in lines.values():
        online = line.alarm & ~line.training
        confirmed = online.copy()
        # Each sensor's scale: its residual on single hidden rows of the training files.
        train_rows = np.flatnonzero(line.training & ~line.alarm)
        sample = rng.choice(train_rows, size=min(512, len(train_rows)), replace=False)
        single = np.concatenate(hidden_residuals(model, line, [(int(r), int(r)) for r in sample], args.margin))
        scale = np.sqrt(np.nanmean(single**2, axis=0))
        normal_rows = np.flatnonzero(line.training & ~line.alarm)
        alarmed_before = np.concatenate([[0], np.cumsum(line.alarm)])
        for start, end in episodes(online):
            width = end - start + 1
            if args.null_rows:  # spans of the rows just before the onset without an alarm
                first = np.arange(max(start - args.null_rows, 0), max(start - width + 1, 0))
                candidates = first[alarmed_before[first + width] == alarmed_before[first]]
            else:
                candidates = normal_rows[(normal_rows + width) < len(line.values)]
            if not len(candidates):
                continue
            starts = rng.choice(candidates, size=args.null_spans)
            null_spans = [(int(s), int(s) + width - 1) for s in starts]
            null = span_scores(hidden_residuals(model, line, null_spans, args.margin), scale)
            score = span_scores(hidden_residuals(model, line, [(start, end)], args.margin), scale)[0]
            judged += 1
            if score < np.nanquantile(null, args.retract_below):
                confirmed[start : end + 1] = False
                retracted += 1
        keep = ~line.training
        online_all.append(online[keep])
        confirmed_all.append(confirmed[keep])
        truth_all.append(line.label[keep])
    truth = np.concatenate(truth_all)
    rows = f"{len(truth)} rows after initial training, {int(truth.sum())} labelled"
    print(f"{judged} episodes judged, {retracted} retracted; {rows}")
    print(f"{'alarms':<22} {'precision':>9} {'recall':>7} {'F1':>6} {'FA/1000 normal':>15}")
    for name, flags in (("online", online_all), ("confirmed", confirmed_all)):
        c = counts(truth, np.concatenate(flags))
        print(f"{name:<22} {c['precision']:>9.3f} {c['recall']:>7.3f} {c['f1']:>6.3f} {c['fa_per_1000']:>15.2f}")


if __name__ == "__main__":
    main()
