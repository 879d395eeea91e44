"""Distribution-shift statistics that need no framework: PSI and the two-sample KS statistic.

The reference side is summarised once (quantile bin edges and fractions, plus a sample) so a
batch is compared against it without keeping the training data around.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

_EPS = 1e-4


@dataclass
class Reference:
    edges: list[float]  # interior quantile edges; bins are (-inf, e0], (e0, e1], ..., (e_last, inf)
    fractions: list[float]
    sample: list[float]  # sorted, for the KS statistic
    mean: float
    std: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Reference:
        return cls(**data)


def summarise(values: np.ndarray, bins: int = 10, sample_size: int = 2000, seed: int = 0) -> Reference:
    """Reference summary of finite values: quantile bins, their fractions, a sorted sample."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        raise ValueError("cannot summarise a reference without finite values")
    edges = np.unique(np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1]))
    fractions = _fractions(finite, edges)
    rng = np.random.default_rng(seed)
    sample = finite if finite.size <= sample_size else rng.choice(finite, sample_size, replace=False)
    return Reference(
        edges.tolist(),
        fractions.tolist(),
        np.sort(sample).tolist(),
        float(finite.mean()),
        float(finite.std()),
    )


def _fractions(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    counts = np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)
    return counts / max(values.size, 1)


def psi(reference: Reference, values: np.ndarray) -> float:
    """Population stability index of `values` against the reference bins (NaN if no values)."""
    current = np.asarray(values, dtype=np.float64)
    current = current[np.isfinite(current)]
    if current.size == 0:
        return float("nan")
    expected = np.maximum(np.asarray(reference.fractions), _EPS)
    actual = np.maximum(_fractions(current, np.asarray(reference.edges)), _EPS)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def ks_statistic(reference: Reference, values: np.ndarray) -> float:
    """sup |F_ref - F_batch| between the reference sample and the batch (NaN if no values)."""
    current = np.sort(np.asarray(values, dtype=np.float64)[np.isfinite(values)])
    if current.size == 0:
        return float("nan")
    sample = np.asarray(reference.sample)
    grid = np.concatenate([sample, current])
    cdf_ref = np.searchsorted(sample, grid, side="right") / sample.size
    cdf_cur = np.searchsorted(current, grid, side="right") / current.size
    return float(np.max(np.abs(cdf_ref - cdf_cur)))
