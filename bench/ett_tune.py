"""Chooses the `lru` ensemble's combination settings on the tuning split of an ETT file.

    python bench/ett_tune.py [--data ../shared/data/ett/ETTh1.csv] [--horizons 1,24,48]
                             [--half-lives 2,3,6,12,24,96] [--temperatures 0,1,2,4,8,16]

The tuning split is the first 20 % of the online stream (windows starting at rows 3600-5759);
bench/ett.py reports the rest apart. Each member of configs/ett.yaml's ensemble runs once per
protocol and horizon through the tuning windows only, its forecasts recorded; the combination is
then replayed for every setting pair (the members do not depend on it). A pair's score is its
MSE ÷ persistence's, averaged over both protocols and the horizons. The best pair is printed,
to be copied into configs/ett.yaml by hand.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch

from bench.ett import TUNING_END, Protocol, ensemble, load_series, run_stream
from flows.model.series_ensemble import replay_combination
from lru_online.mixture import MixtureConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/ett/ETTh1.csv")
    parser.add_argument("--horizons", default="1,24,48")
    parser.add_argument("--half-lives", default="2,3,6,12,24,96")
    parser.add_argument("--temperatures", default="0,1,2,4,8,16")
    args = parser.parse_args()
    horizons = [int(h) for h in args.horizons.split(",")]
    grid = list(
        itertools.product(
            [float(v) for v in args.half_lives.split(",")], [float(v) for v in args.temperatures.split(",")]
        )
    )
    series = load_series(args.data).values
    print(
        f"{args.data.name}, tuning windows starting at rows 3600-{TUNING_END - 1}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )

    ratios: dict[tuple[float, float], list[float]] = {pair: [] for pair in grid}
    for name, horizon in itertools.product(("fsnet", "delayed"), horizons):
        protocol = Protocol(name, horizon)
        started = time.perf_counter()
        method = ensemble(record=True)
        result = run_stream(method, series, protocol, forgetting=False, until=TUNING_END)
        starts = result.start
        persistence = float(np.mean((series[starts - 1][:, None] - result.true) ** 2))
        configured = replay_combination(
            method.recorded,
            method.starting_losses,
            series,
            horizon,
            protocol.window_to_learn,
            method.mixture.config,
        )
        np.testing.assert_allclose(configured, result.pred, rtol=1e-5, atol=1e-6)  # the replay is the ensemble
        members = np.stack([forecasts for _, forecasts in method.recorded], axis=1)  # (K, n, H, C)
        alone = {m: float(np.mean((members[k] - result.true) ** 2)) / persistence for k, m in enumerate(method.members)}
        print(
            f"{name:<8}H={horizon:<3} persistence MSE {persistence:.3f}; members ÷persist: "
            + ", ".join(f"{m} {r:.3f}" for m, r in alone.items())
            + f"  ({time.perf_counter() - started:.0f} s)"
        )
        for pair in grid:
            combined = replay_combination(
                method.recorded, method.starting_losses, series, horizon, protocol.window_to_learn, MixtureConfig(*pair)
            )
            ratios[pair].append(float(np.mean((combined - result.true) ** 2)) / persistence)

    print(
        "\nensemble MSE ÷ persistence on the tuning split, "
        + ", ".join(f"{p} H={h}" for p, h in itertools.product(("fsnet", "delayed"), horizons))
        + ", mean"
    )
    for pair, values in ratios.items():
        print(
            f"half_life {pair[0]:>5.0f} temperature {pair[1]:>5.1f}: "
            + " ".join(f"{v:.3f}" for v in values)
            + f"   mean {np.mean(values):.4f}"
        )
    best = min(grid, key=lambda pair: np.mean(ratios[pair]))
    print(f"\nchosen: half_life {best[0]:g}, temperature {best[1]:g} (mean ÷persist {np.mean(ratios[best]):.4f})")


if __name__ == "__main__":
    main()
