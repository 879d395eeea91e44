"""Chooses the forecast mixture's members and settings on many series at once, from the
outputs backfills stored: seconds per setting, not a backfill per setting and series.

    python bench/mixture_tune.py --workdir WORK [--workdir WORK ...] [--config FILE ...]
                                 [--half-lives 3,6,12,24,48] [--temperatures 0,2,4,8,16,32]
                                 [--members lru+persistence,lru+persistence+linear]
                                 [--lookbacks 8,24,48] [--linear-steps 0.1,0.5,1]
                                 [--tuning-share 0.5]

The grid is every combination of the member sets (default: the folders' own), the `linear`
member's lookback and step (for sets that hold it; default: the folders' own) and the
half-lives and temperatures; the folders' own setup is always in it, first.

Each WORK is a work folder a backfill filled with the mixture on (the default); `--config`, given
once per WORK in the same order, is the config it ran with (the embedded defaults otherwise).
Every line of every folder is one series.

Why a replay is enough: the mixture feeds nothing the model learns (the model learns from its
own loss) and nothing the alarms judge unless the model blew up, so under other mixture settings
the model would have forecast the same rows the same way. Each output row holds the reading
(`target_*`) and the model's own one-step residual (`alarm_residual_*`; it is the combined one
only on rows where the model blew up), so the model's forecast of a row is the reading minus
that residual. Per line, in time order (each file its own run with `log_schema.file_is_run`),
those forecasts and the other members (persistence, and the `linear` member, which learns from
the readings alone) go through `forecast_mixture.residuals_from_a_fresh_mixture` under each
setting. Not in the output, and so not replayed exactly: the model's forecast of a
missing reading (the latest reading stands in: no loss is charged there, but the real forecast
may have lain outside the line's seen range, which marks the model diverged on that row), a
model that blew up, and a retraining a different mixture would have judged differently. As a
check, the folder's own setting replayed beside the stored `residual_*` is printed.

The rule, fixed before any figure was seen: per series, the mixture's one-step MSE over its
tuning rows (the first `--tuning-share` of each line's rows) divided by the better of the model's
alone and persistence's MSE on the same entries, whatever the members: 1 is as good as knowing
the better of the two in advance, below 1 better than either, so member sets compare on one
scale. The setting with the lowest median of that
ratio over the series is chosen (the work folders' own setting first among equals). Printed per
setting: the median, the 90th percentile and the worst series on the tuning rows; then the chosen
setting's and the folders' own setting's spread across series on the report rows (the rest of
each line), and the series where the chosen one does worst.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.common import library_versions
from bench.forgetting import processed_outputs, sequences
from flows.model.forecast_mixture import (
    MixtureSetup,
    forecasts_from_residuals,
    latest_readings,
    residuals_from_a_fresh_mixture,
)
from flows.settings import Settings, load_settings
from lru_online.mixture import MixtureConfig
from lru_online.online_linear import OnlineLinearConfig


@dataclass
class SeriesSet:
    """One work folder's lines as the mixture saw them: padded (B, T, S) tensors."""

    name: str
    series: list[str]  # "folder/line" per sequence's line (a line's runs share its name)
    targets: torch.Tensor  # (B, T, S) readings on the model's standardised scale
    model_forecast: torch.Tensor  # (B, T, 1, S) the model's forecast made at each row for the next
    steps: torch.Tensor  # (B, T)
    latest: torch.Tensor  # (B, T, S) each line's latest reading at each row: persistence's forecast
    stored: torch.Tensor  # (B, T, S) the stored (mixed) one-step residuals
    tuning: torch.Tensor  # (B, T) rows in their line's tuning share
    setup: MixtureSetup


def load_set(settings: Settings, share: float) -> SeriesSet:
    """Every processed row of the work folder, per line (per line and file with file_is_run)."""
    spec = settings.feature_spec
    frames = []
    for number, parts in enumerate(processed_outputs(settings)):
        frame = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
        if spec.entity_column not in frame:  # a one-line log without a line column
            frame[spec.entity_column] = settings.log_schema.single_line
        frames.append(frame.assign(file_number=number))
    rows = pd.concat(frames, ignore_index=True)
    if f"alarm_residual_{spec.sensors[0]}" not in rows:
        raise SystemExit(f"{settings.workdir}: no alarm_residual_* columns: it ran with the mixture off")
    rows = rows.sort_values([spec.entity_column, "file_number", spec.timestamp_column], kind="stable")
    position = rows.groupby(spec.entity_column, sort=False).cumcount()
    length = rows.groupby(spec.entity_column, sort=False)[spec.timestamp_column].transform("size")
    rows["tuning"] = position < np.ceil(share * length)
    batch, ordered = sequences(rows, spec, settings.log_schema.file_is_run)
    _, targets, _, steps = batch.tensors()
    targets = targets.double()

    def padded(columns: list[str]) -> torch.Tensor:
        return torch.from_numpy(batch.padded(ordered[columns].to_numpy(np.float64), fill=np.nan))

    model_forecast = forecasts_from_residuals(targets, padded([f"alarm_residual_{s}" for s in spec.sensors]))
    tuning = torch.from_numpy(batch.padded(ordered["tuning"].to_numpy(), fill=False))
    line_of = ordered[spec.entity_column].astype(str).to_numpy()[batch.offsets[:-1]]
    folder = f"{settings.workdir.parent.name}/{settings.workdir.name}"  # benches name theirs OUT/work
    return SeriesSet(
        name=folder,
        series=[f"{folder}/{line}" for line in line_of],
        targets=targets,
        model_forecast=model_forecast,
        latest=latest_readings(targets),
        steps=steps,
        stored=padded([f"residual_{s}" for s in spec.sensors]),
        tuning=tuning,
        setup=settings.mixture.setup(),
    )


@dataclass(frozen=True)
class SeriesErrors:
    """One series' summed squared one-step errors over the same entries."""

    mixture: float
    model: float
    persistence: float
    entries: int

    @property
    def ratio(self) -> float:
        """The mixture's MSE over the better member's (NaN without entries)."""
        better = min(self.model, self.persistence)
        return self.mixture / better if self.entries and better > 0 else float("nan")


def series_errors(
    found: SeriesSet, setup: MixtureSetup, rows: torch.Tensor
) -> tuple[dict[str, SeriesErrors], torch.Tensor]:
    """Per series, the mixture's and its members' errors over the given rows (B, T), on the
    entries all three forecast; and the replayed residuals (B, T, S)."""
    mixed = residuals_from_a_fresh_mixture(setup, found.model_forecast, found.targets, found.steps)

    def one_step(made: torch.Tensor) -> torch.Tensor:  # each row's reading minus the row before's forecast
        return found.targets - torch.cat([torch.full_like(made[:, :1], np.nan), made[:, :-1]], 1)

    model, persistence = one_step(found.model_forecast[:, :, 0]), one_step(found.latest)
    both = torch.isfinite(mixed) & torch.isfinite(model) & torch.isfinite(persistence) & rows[..., None]
    sums: dict[str, np.ndarray] = {}
    for index, name in enumerate(found.series):  # a line's runs add up to its series
        used = both[index]
        squares = [float((r[index][used] ** 2).sum()) for r in (mixed, model, persistence)]
        sums[name] = sums.get(name, np.zeros(4)) + np.array([*squares, float(used.sum())])
    return {name: SeriesErrors(*total[:3], int(total[3])) for name, total in sums.items()}, mixed


def spread(ratios: dict[str, float]) -> tuple[float, float, float]:
    """The median, 90th percentile and largest of the series' ratios."""
    values = np.array([v for v in ratios.values() if np.isfinite(v)])
    return float(np.median(values)), float(np.quantile(values, 0.9)), float(values.max())


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, action="append", required=True)
    parser.add_argument("--config", type=Path, action="append", default=[])
    parser.add_argument("--half-lives", type=_floats, default=[3, 6, 12, 24, 48])
    parser.add_argument("--temperatures", type=_floats, default=[0, 2, 4, 8, 16, 32])
    parser.add_argument("--tuning-share", type=float, default=0.5)
    parser.add_argument(
        "--members",
        type=lambda text: [tuple(group.split("+")) for group in text.split(",")],
        help="member sets to compare, e.g. lru+persistence,lru+persistence+linear (default: the folders' own)",
    )
    parser.add_argument("--lookbacks", type=lambda t: [int(v) for v in _floats(t)], help="the linear member's")
    parser.add_argument("--linear-steps", type=_floats, help="the linear member's normalised LMS step")
    args = parser.parse_args()
    if args.config and len(args.config) != len(args.workdir):
        raise SystemExit("--config: give one per --workdir, in the same order")
    if not 0 < args.tuning_share < 1:
        raise SystemExit(f"--tuning-share must be in (0, 1), got {args.tuning_share}")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {library_versions()}")

    sets = []
    configs = args.config or [None] * len(args.workdir)
    for workdir, config in zip(args.workdir, configs, strict=True):
        found = load_set(load_settings(config, workdir), args.tuning_share)
        _, replayed = series_errors(found, found.setup, found.steps)
        both = torch.isfinite(replayed) & torch.isfinite(found.stored)
        close = float(((replayed - found.stored).abs() < 1e-4)[both].float().mean())
        print(
            f"{found.name}: {len(set(found.series))} series, {int(found.steps.sum()):,} rows, own setting "
            f"half-life {found.setup.config.half_life:g}, temperature {found.setup.config.temperature:g}; one-step MSE "
            f"stored {float(found.stored[both].pow(2).mean()):.5f}, replayed {float(replayed[both].pow(2).mean()):.5f} "
            f"({close:.1%} of the entries within 1e-4)"
        )
        sets.append(found)
    own = sets[0].setup
    member_sets = args.members or [own.members]
    lookbacks = args.lookbacks or [own.linear.lookback]
    linear_steps = args.linear_steps or [own.linear.step]
    grid = [own]
    for members, lookback, step, half_life, temperature in itertools.product(
        member_sets, lookbacks, linear_steps, args.half_lives, args.temperatures
    ):
        linear = OnlineLinearConfig(lookback, step) if "linear" in members else own.linear
        candidate = MixtureSetup(members, MixtureConfig(half_life=half_life, temperature=temperature), linear)
        if candidate not in grid:
            grid.append(candidate)

    def ratios_of(setup: MixtureSetup, part: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for found in sets:
            rows = found.tuning if part == "tuning" else found.steps & ~found.tuning
            out |= {name: errors.ratio for name, errors in series_errors(found, setup, rows)[0].items()}
        return out

    print(f"\ntuning rows (the first {args.tuning_share:.0%} of each line): mixture MSE / better member's MSE")
    print(f"{'members':<24} {'linear':>10} {'half-life':>9} {'temperature':>11} {'median':>7} {'p90':>7} {'worst':>7}")
    results = []
    for setup in grid:
        median, p90, worst = spread(ratios_of(setup, "tuning"))
        results.append((median, setup))
        print(f"{_describe(setup)} {median:>7.3f} {p90:>7.3f} {worst:>7.3f}")
    chosen = min(results, key=lambda r: r[0])[1]  # min keeps the first (own) among equals
    print(f"\nchosen by the rule: {_describe(chosen)}")

    print("\nreport rows (the rest of each line), not looked at for the choice:")
    for label, setup in (("chosen", chosen), ("own", own)):
        ratios = ratios_of(setup, "report")
        median, p90, worst = spread(ratios)
        name = max((n for n in ratios if np.isfinite(ratios[n])), key=lambda n: ratios[n])
        print(f"{label:>6}: {_describe(setup)}: median {median:.3f}, p90 {p90:.3f}, worst {worst:.3f} ({name})")


def _describe(setup: MixtureSetup) -> str:
    linear = f"{setup.linear.lookback}/{setup.linear.step:g}" if "linear" in setup.members else "-"
    return f"{'+'.join(setup.members):<24} {linear:>10} {setup.config.half_life:>9g} {setup.config.temperature:>11g}"


if __name__ == "__main__":
    main()
