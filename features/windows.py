"""Joining consecutive feature batches into longer per-line sequences."""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.builder import FeatureBatch


def concatenate(batches: list[FeatureBatch]) -> FeatureBatch:
    """Consecutive batches (oldest first) as one batch: each line's rows of every batch, in
    batch order; lines sorted by id."""
    if not batches:
        raise ValueError("concatenate needs at least one batch")
    entities = sorted(set().union(*(b.entities for b in batches)))
    rank = {entity: index for index, entity in enumerate(entities)}
    line = np.concatenate([np.array([rank[e] for e in b.entities], dtype=np.int64)[b.line_index] for b in batches])
    batch = np.concatenate([np.full(len(b), index) for index, b in enumerate(batches)])
    position = np.concatenate([b.positions for b in batches])
    order = np.lexsort((position, batch, line))
    counts = np.bincount(line, minlength=len(entities))
    labels = [b.labels for b in batches]
    same_labels = len({b.label_names for b in batches}) == 1

    def joined(name: str) -> np.ndarray:
        return np.concatenate([getattr(b, name) for b in batches])[order]

    return FeatureBatch(
        entities=entities,
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        timestamps=pd.DatetimeIndex(
            np.concatenate([b.timestamps.as_unit("ns").asi8 for b in batches])[order]
        ).tz_localize("UTC"),
        inputs=joined("inputs"),
        targets=joined("targets"),
        dt=joined("dt"),
        raw=joined("raw"),
        labels=np.concatenate(labels)[order] if all(lab is not None for lab in labels) and same_labels else None,
        label_names=batches[0].label_names,
        level_stretch=joined("level_stretch") if all(b.level_stretch is not None for b in batches) else None,
    )
