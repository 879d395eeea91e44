"""The GPU scan in Triton: h_t = lam_t * h_{t-1} + x_t, parallel over batch, channels and time.

Reduce-then-scan over chunks of time, three launches:
1. `_chunk_pass` with SUMMARY: every chunk, scanned from a zero state, gives its end state and
   the product of its decays (reads x once, writes nothing per step);
2. `_chunk_carries`: one sequential pass over the chunk summaries gives each chunk's incoming
   state, starting from h0;
3. `_chunk_pass` without: every chunk scans again from its incoming state and writes h.
So x is read twice and h written once (24 bytes per complex64 element), and a single long
stream (B = 1) still spreads over T / CHUNK programs per channel block.

The backward pass runs the same kernels in reverse time on the conjugate decays (the adjoint
a_t = g_t + conj(lam_{t+1}) a_{t+1}); the gradient of lam is a_t conj(h_{t-1}), reduced over
batch and time when lam is time-invariant.

Triton has no complex type: tensors are viewed as interleaved float32 (re, im) pairs. Importing
this module needs triton; `lru_online.scan.dispatch` imports it only for CUDA tensors, and the
tests run the kernels on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lru_online.scan.dispatch import ScanBackend, gradients_from_adjoint

BLOCK_N = 32  # channels per program
CHUNK = 128  # time steps per program


@triton.jit
def _load_decay(lam_ptr, b, t, n, T, N, n_mask, TIME_VARYING: tl.constexpr, CONJ: tl.constexpr):
    """The decay lam_t (time-varying: element (b, t, n); else lam_n), 1 outside [0, T)."""
    if TIME_VARYING:
        tt = n * 0 + t
        inside = n_mask & (tt >= 0) & (tt < T)
        offset = ((b * T + t) * N + n) * 2
        re = tl.load(lam_ptr + offset, mask=inside, other=1.0)
        im = tl.load(lam_ptr + offset + 1, mask=inside, other=0.0)
    else:
        re = tl.load(lam_ptr + n * 2, mask=n_mask, other=1.0)
        im = tl.load(lam_ptr + n * 2 + 1, mask=n_mask, other=0.0)
    if CONJ:
        im = -im
    return re, im


@triton.jit
def _decay_at(lam_ptr, b, t, n, T, N, mask, REVERSE: tl.constexpr):
    """The time-varying decay of step t: lam_t forward; conj(lam_{t+1}) in reverse time (the
    adjoint's), 1 past the end."""
    if REVERSE:
        return _load_decay(lam_ptr, b, t + 1, n, T, N, mask, True, True)
    return _load_decay(lam_ptr, b, t, n, T, N, mask, True, False)


@triton.jit
def _step_time(chunk, i, CHUNK_SIZE: tl.constexpr, REVERSE: tl.constexpr):
    """Time index of the i-th step of a chunk, walking forward or backward in time."""
    if REVERSE:
        return (chunk + 1) * CHUNK_SIZE - 1 - i
    return chunk * CHUNK_SIZE + i


@triton.jit
def _chunk_pass(
    lam_ptr, x_ptr, carry_ptr, h_ptr, end_ptr, prod_ptr, T, N, n_chunks,
    SUMMARY: tl.constexpr, TIME_VARYING: tl.constexpr, REVERSE: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One chunk of time for one block of channels. SUMMARY: from a zero state, store only the
    end state and the product of the decays; otherwise from the chunk's carry, store every h_t."""
    b, nb, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = nb * BLOCK + tl.arange(0, BLOCK)
    n_mask = n < N
    here = ((b * n_chunks + chunk) * N + n) * 2
    if SUMMARY:
        h_re = tl.zeros((BLOCK,), tl.float32)
        h_im = tl.zeros((BLOCK,), tl.float32)
    else:
        h_re = tl.load(carry_ptr + here, mask=n_mask, other=0.0)
        h_im = tl.load(carry_ptr + here + 1, mask=n_mask, other=0.0)
    p_re = tl.full((BLOCK,), 1.0, tl.float32)
    p_im = tl.zeros((BLOCK,), tl.float32)
    if not TIME_VARYING:
        d_re, d_im = _load_decay(lam_ptr, b, 0, n, T, N, n_mask, False, REVERSE)
    for i in range(CHUNK_SIZE):
        t = _step_time(chunk, i, CHUNK_SIZE, REVERSE)
        inside = n_mask & (n * 0 + t < T)  # t as a block: a scalar mask breaks the interpreter
        if TIME_VARYING:
            d_re, d_im = _decay_at(lam_ptr, b, t, n, T, N, inside, REVERSE)
        offset = ((b * T + t) * N + n) * 2
        x_re = tl.load(x_ptr + offset, mask=inside, other=0.0)
        x_im = tl.load(x_ptr + offset + 1, mask=inside, other=0.0)
        # Outside [0, T) the step must leave state and product alone.
        s_re = tl.where(inside, d_re, 1.0)
        s_im = tl.where(inside, d_im, 0.0)
        h_re, h_im = s_re * h_re - s_im * h_im + x_re, s_re * h_im + s_im * h_re + x_im
        if SUMMARY:
            p_re, p_im = s_re * p_re - s_im * p_im, s_re * p_im + s_im * p_re
        else:
            tl.store(h_ptr + offset, h_re, mask=inside)
            tl.store(h_ptr + offset + 1, h_im, mask=inside)
    if SUMMARY:
        tl.store(end_ptr + here, h_re, mask=n_mask)
        tl.store(end_ptr + here + 1, h_im, mask=n_mask)
        tl.store(prod_ptr + here, p_re, mask=n_mask)
        tl.store(prod_ptr + here + 1, p_im, mask=n_mask)


@triton.jit
def _chunk_carries(
    end_ptr, prod_ptr, h0_ptr, carry_ptr, N, n_chunks,
    HAS_H0: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b, nb = tl.program_id(0), tl.program_id(1)
    n = nb * BLOCK + tl.arange(0, BLOCK)
    n_mask = n < N
    if HAS_H0:
        c_re = tl.load(h0_ptr + (b * N + n) * 2, mask=n_mask, other=0.0)
        c_im = tl.load(h0_ptr + (b * N + n) * 2 + 1, mask=n_mask, other=0.0)
    else:
        c_re = tl.zeros((BLOCK,), tl.float32)
        c_im = tl.zeros((BLOCK,), tl.float32)
    for k in range(n_chunks):
        if REVERSE:
            chunk = n_chunks - 1 - k
        else:
            chunk = k
        offset = ((b * n_chunks + chunk) * N + n) * 2
        tl.store(carry_ptr + offset, c_re, mask=n_mask)
        tl.store(carry_ptr + offset + 1, c_im, mask=n_mask)
        p_re = tl.load(prod_ptr + offset, mask=n_mask, other=1.0)
        p_im = tl.load(prod_ptr + offset + 1, mask=n_mask, other=0.0)
        e_re = tl.load(end_ptr + offset, mask=n_mask, other=0.0)
        e_im = tl.load(end_ptr + offset + 1, mask=n_mask, other=0.0)
        c_re, c_im = p_re * c_re - p_im * c_im + e_re, p_re * c_im + p_im * c_re + e_im


def _floats(z: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(z.contiguous())


def linear_scan(
    lam: torch.Tensor,
    x: torch.Tensor,
    h0: torch.Tensor | None = None,
    *,
    reverse: bool = False,
    out: torch.Tensor | None = None,
    chunk: int | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """All states of the scan, complex64 (B, T, N).

    reverse=True runs the adjoint recurrence h_t = conj(lam_{t+1}) h_{t+1} + x_t from h_T = h0
    (time-invariant lam: conj(lam)), the backward pass's scan. `out` receives the states when
    given (the tests hand in a poisoned buffer to catch unwritten elements).
    """
    if x.dtype != torch.complex64:
        raise TypeError(f"the Triton scan computes in complex64, got {x.dtype}")
    chunk, block = chunk or CHUNK, block or BLOCK_N
    batch, length, channels = x.shape
    time_varying = lam.dim() == 3
    n_chunks = triton.cdiv(length, chunk)
    n_blocks = triton.cdiv(channels, block)
    ends = torch.empty((batch, n_chunks, channels), dtype=x.dtype, device=x.device)
    prods = torch.empty_like(ends)
    carries = torch.empty_like(ends)
    lam_f, x_f, ends_f, prods_f, carries_f = map(_floats, (lam, x, ends, prods, carries))
    h0_f = _floats(h0) if h0 is not None else x_f  # a placeholder pointer when HAS_H0 is off
    h = out if out is not None else torch.empty_like(x)
    h_f = torch.view_as_real(h)
    pointers = (lam_f, x_f, carries_f, h_f, ends_f, prods_f, length, channels, n_chunks)
    options = dict(TIME_VARYING=time_varying, REVERSE=reverse, CHUNK_SIZE=chunk, BLOCK=block)
    _chunk_pass[(batch, n_blocks, n_chunks)](*pointers, SUMMARY=True, **options)
    _chunk_carries[(batch, n_blocks)](
        ends_f, prods_f, h0_f, carries_f, channels, n_chunks,
        HAS_H0=h0 is not None, REVERSE=reverse, BLOCK=block,
    )  # fmt: skip
    _chunk_pass[(batch, n_blocks, n_chunks)](*pointers, SUMMARY=False, **options)
    return h


def triton_forward(lam: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    return linear_scan(lam, x, h0)


def triton_backward(
    lam: torch.Tensor,
    h: torch.Tensor,
    h0: torch.Tensor | None,
    grad_h: torch.Tensor,
    grad_last: torch.Tensor | None,
    need_lam: bool,
    need_h0: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    grad = grad_h.clone()
    if grad_last is not None:
        grad[:, -1] += grad_last
    adjoint = linear_scan(lam, grad, None, reverse=True)
    return gradients_from_adjoint(lam, h, h0, adjoint, need_lam, need_h0)


BACKEND = ScanBackend(
    name="triton",
    forward=triton_forward,
    backward=triton_backward,
    devices=frozenset({"cuda"}),
)
