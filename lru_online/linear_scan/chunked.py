"""Device-agnostic chunked scan in plain torch ops.

Used where no compiled kernel is available (a CPU without the C extension, a GPU without
Triton). Three phases: a short loop inside chunks, vectorised across all chunks; a loop over
chunk carries; one fix-up pass adding each chunk's incoming carry times the decay powers.
"""

from __future__ import annotations

import math

import torch


def _chunk_length(length: int) -> int:
    # Balances the two Python loops (inside chunks, across chunks) at about sqrt(T) each.
    return max(8, math.isqrt(max(length, 1)))


def chunked_forward(lam: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    batch, length, channels = x.shape
    chunk = _chunk_length(length)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    time_varying = lam.dim() == 3
    if pad:
        x = torch.cat([x, x.new_zeros(batch, pad, channels)], dim=1)
        if time_varying:
            lam = torch.cat([lam, lam.new_ones(batch, pad, channels)], dim=1)
    xc = x.reshape(batch, n_chunks, chunk, channels)
    lc = lam.reshape(batch, n_chunks, chunk, channels) if time_varying else lam

    # Phase 1: scan inside every chunk from a zero state.
    local = torch.empty_like(xc)
    acc = xc[:, :, 0].clone()
    local[:, :, 0] = acc
    for step in range(1, chunk):
        decay = lc[:, :, step] if time_varying else lc
        acc = decay * acc + xc[:, :, step]
        local[:, :, step] = acc

    # Decay from a chunk's start to each of its steps: prod of lam over [start, step].
    if time_varying:
        powers = torch.cumprod(lc, dim=2)
    else:
        powers = torch.cumprod(lam.expand(chunk, channels), dim=0)

    # Phase 2: the state entering each chunk.
    incoming = x.new_zeros(batch, n_chunks, channels)
    carry = h0 if h0 is not None else x.new_zeros(batch, channels)
    for index in range(n_chunks):
        incoming[:, index] = carry
        whole_chunk_decay = powers[:, index, -1] if time_varying else powers[-1]
        carry = local[:, index, -1] + whole_chunk_decay * carry

    # Phase 3: add the incoming state, decayed, to every step.
    local += powers * incoming.unsqueeze(2)
    return local.reshape(batch, n_chunks * chunk, channels)[:, :length]
