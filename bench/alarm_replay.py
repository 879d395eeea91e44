"""Re-judges a work folder's stored residuals under other alarm settings: seconds, not a backfill.

    python bench/alarm_replay.py --workdir WORK [--config FILE] [--set FIELD=V1,V2 ...]
                                 [--labels simulator | nab=DIR | skab=DIR]

The alarms feed neither the model nor drift, and every output row holds the residuals the
alarms judged (`residual_*`, or `alarm_residual_*` with the forecast mixture on) and the readings
the consistency check reads, as the model of its time made them. Judging them again, file
part by file part in the order the ledger processed them, through the pipeline's own
`flows.model.file_step.judge_lines`, from fresh alarm states carried on as the pipeline carries
them (a new run per file with `log_schema.file_is_run`), gives back the pipeline's `anomaly`
flags row for row under the same settings (tests/bench/test_alarm_replay.py). Under other
`alarms:` settings it gives the flags a backfill with them would have given, so a grid of alarm
settings costs a pass over the outputs each, not a backfill each (on SKAB's tuning split, 13
minutes of backfills against seconds).

`--set FIELD=V1,V2` (repeatable) names an `alarms:` field and its values; the grid is their
product, the work folder's own settings first. `--labels` scores each setting: `simulator` (the
work folder's ground_truth.json, as `lru-online demo` scores itself), `nab=DIR` (a nab-aws-style
folder, by the benchmark's rules as bench/nab.py, `--tuning` files apart), `skab=DIR` (SKAB's
valve files by their labels after each file's first 400 rows, and anomaly-free.csv's false
alarms). Without labels: alarmed rows and onsets only.
"""

from __future__ import annotations

import argparse
import fnmatch
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from bench.common import library_versions
from bench.forgetting import processed_outputs, sequences
from flows.settings import Settings, load_settings
from lru_online.alarms import AlarmConfig


@dataclass
class Replay:
    rows: pd.DataFrame  # entity, timestamp, anomaly (bool): every scored row, in processed order
    onsets: pd.DataFrame  # entity, timestamp: the first row of each alarm episode


def _part_index(path: Path) -> int:
    """k of batch-<id>-part-<k>[-group-<g>].parquet."""
    return int(path.stem.split("-part-")[1].split("-")[0])


def replay(settings: Settings, config: AlarmConfig) -> Replay:
    """The `anomaly` flags and episode onsets of every processed row under `config`."""
    from flows.model.file_step import ScoredLines, judge_lines

    spec = settings.feature_spec
    states: dict[str, bytes | None] = {}
    rows, onsets = [], []
    for parts in processed_outputs(settings):
        for part in sorted({_part_index(p) for p in parts}):
            if part == 0 and settings.log_schema.file_is_run:
                states = {}  # each file a run of its lines: they start afresh
            frame = pd.concat([pd.read_parquet(p) for p in parts if _part_index(p) == part], ignore_index=True)
            if spec.entity_column not in frame:  # a one-line log without a line column
                if settings.log_schema.single_line is None:
                    raise ValueError(
                        f"{parts[0]} has no line column {spec.entity_column!r}: replay the work folder with the "
                        "config it ran with (--config)"
                    )
                frame[spec.entity_column] = settings.log_schema.single_line
            # Each line's rows together in time order, as the pipeline judged them.
            features, frame = sequences(frame, spec, file_is_run=False)
            # With the mixture on, the alarms judged `alarm_residual_*` (file_step.ScoredLines).
            judged = "alarm_residual" if f"alarm_residual_{spec.sensors[0]}" in frame else "residual"
            scored = ScoredLines(
                forecast=np.zeros((len(features), 0, len(spec.sensors))),
                residuals=frame[[f"{judged}_{s}" for s in spec.sensors]].to_numpy(np.float64),
                scores=np.zeros(len(features)),
                hidden={},
                update_index=0,
            )
            judged = judge_lines(features, scored, states, config)
            states.update(judged.states)
            line_names = np.repeat(np.asarray(features.entities, dtype=object), features.lengths)
            judged_rows = {"entity": line_names, "timestamp": features.timestamps, "anomaly": judged.alarms}
            rows.append(pd.DataFrame(judged_rows))
            onsets += [(e["entity"], pd.Timestamp(e["start_ts"])) for e in judged.episodes if not e["continues"]]
    return Replay(
        pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["entity", "timestamp", "anomaly"]),
        pd.DataFrame(onsets, columns=["entity", "timestamp"]),
    )


def simulator_figures(result: Replay, workdir: Path) -> dict:
    from flows.monitor.alarm_scoring import flag_scores

    truth = json.loads((workdir / "ground_truth.json").read_text())
    return flag_scores(result.rows, truth["anomalies"])


def nab_figures(result: Replay, data: Path, tuning: str, alpha: float) -> dict:
    from bench.nab import judge_series, load_series
    from bench.nab_scoring import CorpusScore

    series = load_series(data)
    by_line = dict(tuple(result.rows.groupby("entity")))
    onsets = dict(tuple(result.onsets.groupby("entity")))
    figures = {
        s.name: judge_series(
            s,
            by_line.get(s.name, result.rows.iloc[:0]),
            list(onsets[s.name]["timestamp"]) if s.name in onsets else [],
        )
        for s in series
    }
    corpus = CorpusScore({name: f.outcome for name, f in figures.items()})
    tuned = sorted(n for n in figures if fnmatch.fnmatch(n, tuning))
    out = {}
    for group, names in (("tuning", tuned), ("report", sorted(set(figures) - set(tuned))), ("all", sorted(figures))):
        part = corpus.subset(names)
        normal = sum(figures[n].normal_rows for n in names)
        rate = sum(figures[n].normal_alarmed for n in names) / normal if normal else 0.0
        out[group] = {
            "standard": round(part.normalised("standard"), 1),
            "hit": f"{part.detected}/{part.windows}",
            "false_positives": part.false_positives,
            "normal_rate_x_alpha": round(rate / alpha, 2),
        }
    out["worst_stream_x_alpha"] = round(max(f.normal_rate for f in figures.values()) / alpha, 2)
    out["tuning_worst_x_alpha"] = round(max((figures[n].normal_rate for n in tuned), default=0.0) / alpha, 2)
    return out


def skab_figures(result: Replay, data: Path, alpha: float) -> dict:
    from bench.skab import TRAIN_ROWS, load_folder
    from bench.skab_pipeline import Counts

    flags = result.rows.set_index(pd.DatetimeIndex(result.rows["timestamp"]))["anomaly"]
    files, normal = load_folder(data)
    test = Counts()
    for item in files:
        scored = flags.reindex(item.frame.index.tz_localize("UTC"))
        if scored.isna().all():  # not streamed in this work folder
            continue
        alarm = scored.fillna(False).to_numpy(dtype=int)
        test.add(item.anomaly[TRAIN_ROWS:], alarm[TRAIN_ROWS:])
    out = {"valve test rows": test.figures()}
    if normal is not None:
        free = flags.reindex(normal.frame.index.tz_localize("UTC")).fillna(False).to_numpy(dtype=bool)
        out["anomaly-free x alpha"] = round(free.mean() / alpha, 2)
    return out


def grid(settings: Settings, choices: list[str]) -> list[dict]:
    """Every combination of the `FIELD=V1,V2` choices as `alarms:` overrides, values read as YAML."""
    axes = []
    for choice in choices:
        field, _, values = choice.partition("=")
        if field not in type(settings.alarms).model_fields or not values:
            raise SystemExit(f"--set {choice!r}: expected FIELD=V1[,V2...] with FIELD an alarms: field")
        axes.append([(field, yaml.safe_load(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def load_work_settings(workdir: Path, config: Path | None) -> tuple[Settings, Path | None]:
    """The settings a work folder ran with: `config`, else its own config.yaml, else the
    embedded defaults; and which config that was (None: the defaults)."""
    if config is None and (workdir / "config.yaml").exists():
        config = workdir / "config.yaml"
    return load_settings(config, workdir=workdir), config


def setting_figures(settings: Settings, overrides: dict, labels: str | None, tuning: str) -> dict:
    """The work folder's flags replayed under its `alarms:` settings with `overrides`, scored by
    `labels` (simulator, nab=DIR, skab=DIR; None: counts only)."""
    alarms = settings.alarms.model_copy(update=overrides)
    result = replay(settings, alarms.config())
    figures = {"rows": len(result.rows), "alarmed": int(result.rows["anomaly"].sum()), "onsets": len(result.onsets)}
    kind, _, folder = (labels or "").partition("=")
    if kind == "simulator":
        figures |= simulator_figures(result, settings.workdir)
    elif kind == "nab":
        figures |= nab_figures(result, Path(folder), tuning, alarms.false_alarm_rate)
    elif kind == "skab":
        figures |= skab_figures(result, Path(folder), alarms.false_alarm_rate)
    elif kind:
        raise SystemExit(f"--labels {labels!r}: expected simulator, nab=DIR or skab=DIR")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=None, help="the config the work folder ran with")
    parser.add_argument("--set", action="append", default=[], dest="choices", metavar="FIELD=V1,V2")
    parser.add_argument("--labels", default=None, help="simulator, nab=DIR or skab=DIR")
    parser.add_argument("--tuning", default="ec2_cpu_utilization_*", help="nab: the declared tuning files")
    args = parser.parse_args()
    settings, config = load_work_settings(args.workdir, args.config)
    print(f"{library_versions()}; work folder {args.workdir}, config {config or 'embedded defaults'}")
    for overrides in grid(settings, args.choices) or [{}]:
        try:
            figures = setting_figures(settings, overrides, args.labels, args.tuning)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        print(json.dumps({"alarms": overrides or "as run"} | figures))


if __name__ == "__main__":
    main()
