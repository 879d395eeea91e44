"""Independent NumPy references for the tests: plain loops in complex128, no lru_online code."""

from __future__ import annotations

import numpy as np
import torch


def numpy_scan(lam: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None) -> np.ndarray:
    """h_t = lam_t * h_{t-1} + x_t in complex128, one step at a time."""
    lam_np = lam.detach().cpu().numpy().astype(np.complex128)
    x_np = x.detach().cpu().numpy().astype(np.complex128)
    batch, length, channels = x_np.shape
    h = np.zeros((batch, channels), np.complex128) if h0 is None else h0.detach().cpu().numpy().astype(np.complex128)
    out = np.empty_like(x_np)
    for t in range(length):
        decay = lam_np if lam_np.ndim == 1 else lam_np[:, t]
        h = decay * h + x_np[:, t]
        out[:, t] = h
    return out


def relative_error(actual: torch.Tensor, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|."""
    diff = np.abs(actual.detach().cpu().numpy().astype(np.complex128) - expected).max()
    return float(diff / np.abs(expected).max())


def random_decay(channels: int, max_modulus: float, generator: torch.Generator, shape=None) -> torch.Tensor:
    """Random complex decays with modulus up to max_modulus and phase in [-π, π]."""
    size = shape if shape is not None else (channels,)
    modulus = max_modulus * torch.rand(size, generator=generator, dtype=torch.float64) ** 0.25
    phase = (2 * torch.rand(size, generator=generator, dtype=torch.float64) - 1) * torch.pi
    return torch.polar(modulus, phase)
