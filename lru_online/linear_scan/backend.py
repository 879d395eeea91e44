"""What a scan backend is, and the one gradient formula every backend shares.

A backend computes the forward states and, where it has one, a fused adjoint (the backward
scan a_t = g_t + conj(lam_{t+1}) a_{t+1}); the gradient of the start state follows from the
adjoint the same way for all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
BackwardFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


@dataclass(frozen=True)
class ScanBackend:
    """A way to run the scan: `forward(lam, x, h0) -> h`, optionally a fused `backward`."""

    name: str
    forward: ForwardFn
    backward: BackwardFn | None
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype] = frozenset({torch.complex64, torch.complex128})


def grad_h0(lam: torch.Tensor, adjoint: torch.Tensor) -> torch.Tensor:
    """The start state's gradient: conj(lam_0) a_0 (lam (N,) or (B, T, N), adjoint (B, T, N))."""
    first_decay = lam[:, 0] if lam.dim() == 3 else lam
    return first_decay.conj() * adjoint[:, 0]
