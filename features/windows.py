"""Windowing of feature sequences into (B, T, H) training tensors."""

from __future__ import annotations

import numpy as np
import torch

from features.builder import FeatureBatch


def concatenate(batches: list[FeatureBatch]) -> FeatureBatch:
    """One entity's consecutive batches as one sequence."""
    if not batches:
        raise ValueError("concatenate needs at least one batch")
    entities = {b.entity for b in batches}
    if len(entities) != 1:
        raise ValueError(f"concatenate takes one entity's batches, got {sorted(entities)}")
    labels = [b.labels for b in batches]
    return FeatureBatch(
        entity=batches[0].entity,
        timestamps=batches[0].timestamps.append([b.timestamps for b in batches[1:]]),
        inputs=np.concatenate([b.inputs for b in batches]),
        targets=np.concatenate([b.targets for b in batches]),
        dt=np.concatenate([b.dt for b in batches]),
        raw=np.concatenate([b.raw for b in batches]),
        labels=np.concatenate(labels) if all(lab is not None for lab in labels) else None,
    )


def sliding_windows(
    sequences: list[FeatureBatch], length: int, stride: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cuts sequences into windows of `length` events (stride defaults to length).

    Returns inputs (B, length, H), targets (B, length, S) and dt (B, length); sequences
    shorter than one window contribute nothing.
    """
    stride = stride or length
    inputs, targets, dts = [], [], []
    for seq in sequences:
        for start in range(0, len(seq) - length + 1, stride):
            inputs.append(seq.inputs[start : start + length])
            targets.append(seq.targets[start : start + length])
            dts.append(seq.dt[start : start + length])
    if not inputs:
        raise ValueError(f"no sequence holds a full window of {length} events")
    return (
        torch.from_numpy(np.stack(inputs)),
        torch.from_numpy(np.stack(targets)),
        torch.from_numpy(np.stack(dts)),
    )
