"""The GPU scan in Triton: h_t = lam_t * h_{t-1} + x_t in one pass over memory.

Each program scans one tile, `chunk` steps of one batch row by `block` channels, in registers
(`tl.associative_scan` over the steps h -> lam h + x), and learns the state entering its tile by
decoupled look-back (Merrill and Garland, "Single-pass parallel prefix scan with decoupled
look-back", 2016): it publishes its tile's aggregate (the end state from zero, and the product
of the decays when lam varies in time; otherwise every tile's is lam^chunk) straight away, then
walks back over the tiles before it, composing their aggregates, until it meets one that has
published its inclusive prefix (the state leaving it). Then it publishes its own prefix and
writes h. The start state (h0, or in reverse the gradient of the last state) enters as the
first step's input. x is read once and h written once:
16 bytes per complex64 element, the memory floor, and a single long stream (B = 1) still spreads
over T / chunk programs per block of channels.

A program takes its tile from an atomic ticket, not from its program id, and only ever waits on
tiles with lower tickets, whose programs have already started: waiting cannot deadlock in
whatever order the GPU runs programs. Tickets run chunk-major (every sequence's first chunk,
then every second one, ...), so a tile's predecessor was handed out a whole row of sequences
earlier and has usually finished.

The backward pass is the same kernel run in reverse time on the conjugate decays, the adjoint
a_t = g_t + conj(lam_{t+1}) a_{t+1} entering from the gradient of the last state; in the same
pass it forms the gradient of lam, a_t conj(h_{t-1}), from the saved states: per step for a
time-varying lam, summed per tile for a time-invariant one (the tiles' sums are added in torch).
So it reads the output gradient and the states and writes the adjoint: 24 bytes per element.

Triton has no complex type: tensors are viewed as interleaved float32 (re, im) pairs. Importing
this module needs triton; `lru_online.linear_scan.dispatch` imports it only for CUDA tensors, and the
tests run the kernels on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lru_online.linear_scan.backend import ScanBackend, grad_h0


@dataclass(frozen=True)
class Tiling:
    """How the kernel cuts the work: time steps and channels per tile, warps per program."""

    chunk: int
    block: int
    num_warps: int


def tiling_for(channels: int) -> Tiling:
    """The tiling for `channels` channels: every time step of a tile within one thread.

    A tile is loaded as rows of interleaved floats, four (two channels, 16 bytes) per thread, so a
    warp's 32 threads cover 64 channels. With 64 channels per warp and the warps side by side,
    Triton keeps each thread's `chunk` steps in its own registers: the scan over time is a
    sequential loop there, with no warp shuffles or shared memory. A narrower block puts threads
    along time instead: compiled for sm_90 by Triton 3.6, 64 steps x 32 channels x 8 warps took
    ~230 instructions per element forward and ~265 backward, where 16 x 256 x 4 takes ~38 and
    ~60 (the issue rate of an H100 allows ~190 per element at 1.7 ms for 16 x 256 x 65536).
    16 steps: at 32 the registers spill.
    """
    block = min(256, max(32, triton.next_power_of_2(channels)))
    return Tiling(chunk=16, block=block, num_warps=max(1, block // 64))


# A tile's status word: 0 until it publishes its aggregate, then its inclusive prefix as well.
_AGGREGATE = tl.constexpr(1)
_PREFIX = tl.constexpr(2)


@triton.jit
def _mul(a_re, a_im, b_re, b_im):
    return a_re * b_re - a_im * b_im, a_re * b_im + a_im * b_re


@triton.jit
def _then(a1_re, a1_im, b1_re, b1_im, a2_re, a2_im, b2_re, b2_im):
    """The step h -> a1 h + b1 followed by h -> a2 h + b2."""
    a_re, a_im = _mul(a2_re, a2_im, a1_re, a1_im)
    b_re, b_im = _mul(a2_re, a2_im, b1_re, b1_im)
    return a_re, a_im, b_re + b2_re, b_im + b2_im


@triton.jit
def _pair_offsets(rows, rows_mask, b, nb, T, N, BLOCK: tl.constexpr):
    """Offsets and mask of the floats (re, im interleaved) of rows `rows` of batch row b,
    channels of block nb, in a complex (B, T, N) tensor: whole rows, so neighbouring lanes
    read neighbouring bytes."""
    cols = nb * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    offsets = (b * T + rows[:, None]) * (2 * N) + cols[None, :]
    return offsets, rows_mask[:, None] & (cols < 2 * N)[None, :]


@triton.jit
def _load_pairs(ptr, rows, rows_mask, b, nb, T, N, CHUNK_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    """(re, im) tiles (CHUNK_SIZE, BLOCK) of those rows; zero where masked."""
    offsets, mask = _pair_offsets(rows, rows_mask, b, nb, T, N, BLOCK)
    pairs = tl.load(ptr + offsets, mask=mask, other=0.0)
    return tl.split(tl.reshape(pairs, (CHUNK_SIZE, BLOCK, 2)))


@triton.jit
def _store_pairs(ptr, re, im, rows, rows_mask, b, nb, T, N, CHUNK_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    offsets, mask = _pair_offsets(rows, rows_mask, b, nb, T, N, BLOCK)
    tl.store(ptr + offsets, tl.reshape(tl.join(re, im), (CHUNK_SIZE, 2 * BLOCK)), mask=mask)


@triton.jit
def _load_state(ptr, b, n, N, n_mask):
    """(re, im) of channels n of batch row b of a complex (B, N) state."""
    offsets = (b * N + n) * 2
    return tl.load(ptr + offsets, mask=n_mask, other=0.0), tl.load(ptr + offsets + 1, mask=n_mask, other=0.0)


@triton.jit
def _scan_tiles(
    lam_ptr, x_ptr, out_ptr, start_ptr, states_ptr, states_start_ptr, lam_grad_ptr,
    status_ptr, aggregate_ptr, prefix_ptr, T, N, n_seqs, n_chunks, n_blocks,
    TIME_VARYING: tl.constexpr, REVERSE: tl.constexpr, HAS_START: tl.constexpr,
    LAM_GRAD: tl.constexpr, HAS_STATES_START: tl.constexpr, PUBLISH_PREFIX: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One tile of the scan. Forward: out = h from x, starting at `start` (h0). REVERSE: out =
    the adjoint from the gradient x = g, starting at `start` (the gradient of the last state);
    with LAM_GRAD it also writes lam's gradient from the forward `states`."""
    ticket = tl.atomic_add(status_ptr + n_seqs * n_chunks, 1)  # the counter sits after the statuses
    chunk = ticket // n_seqs
    seq = ticket % n_seqs
    b = (seq // n_blocks).to(tl.int64)
    nb = seq % n_blocks
    n = nb * BLOCK + tl.arange(0, BLOCK)
    n_mask = n < N
    step = chunk * CHUNK_SIZE + tl.arange(0, CHUNK_SIZE)  # in scan order
    if REVERSE:
        t = T - 1 - step
    else:
        t = step
    in_time = step < T
    x_re, x_im = _load_pairs(x_ptr, t, in_time, b, nb, T, N, CHUNK_SIZE, BLOCK)

    # The decay of each step. A time-invariant lam decays every row, even past the data, so that
    # every tile's decay product is lam^CHUNK_SIZE and readers need not be sent it. A time-varying
    # one decays by 1 outside the data and, in reverse, at the first step (t = T - 1).
    if TIME_VARYING:
        if REVERSE:
            decay_t = t + 1
        else:
            decay_t = t
        has_decay = in_time & (decay_t < T)
        d_re, d_im = _load_pairs(lam_ptr, decay_t, has_decay, b, nb, T, N, CHUNK_SIZE, BLOCK)
        d_re = tl.where(has_decay[:, None] & n_mask[None, :], d_re, 1.0)
    else:
        lam_re = tl.load(lam_ptr + n * 2, mask=n_mask, other=1.0)
        lam_im = tl.load(lam_ptr + n * 2 + 1, mask=n_mask, other=0.0)
        d_re = tl.broadcast_to(lam_re[None, :], (CHUNK_SIZE, BLOCK))
        d_im = tl.broadcast_to(lam_im[None, :], (CHUNK_SIZE, BLOCK))
    if REVERSE:
        d_im = -d_im

    # The start enters as the first step's input: forward h_0 = lam_0 h0 + x_0, in reverse
    # a_{T-1} = g_{T-1} + the gradient of h_{T-1}. Every other tile then starts from the tiles
    # before it alone.
    if HAS_START and chunk == 0:
        start_re, start_im = _load_state(start_ptr, b, n, N, n_mask)
        if not REVERSE:
            if TIME_VARYING:
                lam0_re, lam0_im = _load_state(lam_ptr, b * T, n, N, n_mask)  # lam[b, 0]
            else:
                lam0_re, lam0_im = lam_re, lam_im
            start_re, start_im = _mul(lam0_re, lam0_im, start_re, start_im)
        first = (step == 0)[:, None]
        x_re += tl.where(first, start_re[None, :], 0.0)
        x_im += tl.where(first, start_im[None, :], 0.0)

    # Within the tile from a zero state: a = product of the decays so far, s = the state.
    a_re, a_im, s_re, s_im = tl.associative_scan((d_re, d_im, x_re, x_im), axis=0, combine_fn=_then)

    # The tile's last row is its aggregate. Time runs within each thread (see tiling_for), so these
    # sums stay in registers; with time spread over threads they would be cross-warp reductions.
    tile = seq * n_chunks + chunk
    lane = tl.arange(0, BLOCK)
    last_row = (tl.arange(0, CHUNK_SIZE) == CHUNK_SIZE - 1)[:, None]
    tile_a_re = tl.sum(tl.where(last_row, a_re, 0.0), axis=0)
    tile_a_im = tl.sum(tl.where(last_row, a_im, 0.0), axis=0)
    tile_b_re = tl.sum(tl.where(last_row, s_re, 0.0), axis=0)
    tile_b_im = tl.sum(tl.where(last_row, s_im, 0.0), axis=0)
    # A time-invariant tile's decay product is lam^CHUNK_SIZE, the same as its readers' own.
    AGGREGATE_WIDTH: tl.constexpr = 4 if TIME_VARYING else 2  # floats per channel
    aggregate = aggregate_ptr + tile.to(tl.int64) * AGGREGATE_WIDTH * BLOCK + lane
    tl.store(aggregate, tile_b_re)
    tl.store(aggregate + BLOCK, tile_b_im)
    if TIME_VARYING:
        tl.store(aggregate + 2 * BLOCK, tile_a_re)
        tl.store(aggregate + 3 * BLOCK, tile_a_im)
    tl.debug_barrier()  # every thread's store before the status that announces them
    tl.atomic_xchg(status_ptr + tile, _AGGREGATE, sem="release")

    # Look back: the state entering this tile is acc_a * (state leaving tile j) + acc_b.
    acc_a_re = tl.full((BLOCK,), 1.0, tl.float32)
    acc_a_im = tl.zeros((BLOCK,), tl.float32)
    acc_b_re = tl.zeros((BLOCK,), tl.float32)
    acc_b_im = tl.zeros((BLOCK,), tl.float32)
    j = chunk - 1
    while j >= 0:
        earlier = seq * n_chunks + j
        status = tl.atomic_add(status_ptr + earlier, 0, sem="acquire")
        if status == _PREFIX:
            prefix = prefix_ptr + earlier.to(tl.int64) * 2 * BLOCK + lane
            p_re = tl.load(prefix, cache_modifier=".cg")
            p_im = tl.load(prefix + BLOCK, cache_modifier=".cg")
            m_re, m_im = _mul(acc_a_re, acc_a_im, p_re, p_im)
            acc_b_re += m_re
            acc_b_im += m_im
            j = j * 0 - 1  # nothing before tile j matters any more
        elif status == _AGGREGATE:
            earlier_aggregate = aggregate_ptr + earlier.to(tl.int64) * AGGREGATE_WIDTH * BLOCK + lane
            g_b_re = tl.load(earlier_aggregate, cache_modifier=".cg")
            g_b_im = tl.load(earlier_aggregate + BLOCK, cache_modifier=".cg")
            if TIME_VARYING:
                g_a_re = tl.load(earlier_aggregate + 2 * BLOCK, cache_modifier=".cg")
                g_a_im = tl.load(earlier_aggregate + 3 * BLOCK, cache_modifier=".cg")
            else:
                g_a_re, g_a_im = tile_a_re, tile_a_im
            acc_a_re, acc_a_im, acc_b_re, acc_b_im = _then(
                g_a_re, g_a_im, g_b_re, g_b_im, acc_a_re, acc_a_im, acc_b_re, acc_b_im
            )
            j -= 1
        # Status 0: tile j has not published yet; ask again.

    # acc_b is now the state entering the tile.
    c_re, c_im = _mul(a_re, a_im, acc_b_re[None, :], acc_b_im[None, :])
    h_re = s_re + c_re
    h_im = s_im + c_im
    if PUBLISH_PREFIX:
        # The state leaving the tile: its aggregate applied to the state entering it.
        p_re, p_im = _mul(tile_a_re, tile_a_im, acc_b_re, acc_b_im)
        prefix = prefix_ptr + tile.to(tl.int64) * 2 * BLOCK + lane
        tl.store(prefix, p_re + tile_b_re)
        tl.store(prefix + BLOCK, p_im + tile_b_im)
        tl.debug_barrier()
        tl.atomic_xchg(status_ptr + tile, _PREFIX, sem="release")
    _store_pairs(out_ptr, h_re, h_im, t, in_time, b, nb, T, N, CHUNK_SIZE, BLOCK)

    if LAM_GRAD:
        # d loss / d lam_t = a_t conj(h_{t-1}), h_{-1} being the forward's start state.
        prev_re, prev_im = _load_pairs(states_ptr, t - 1, in_time & (t >= 1), b, nb, T, N, CHUNK_SIZE, BLOCK)
        if HAS_STATES_START:
            first = (in_time & (t == 0))[:, None] & n_mask[None, :]
            s0_re, s0_im = _load_state(states_start_ptr, b, n, N, n_mask)
            prev_re = tl.where(first, s0_re[None, :], prev_re)
            prev_im = tl.where(first, s0_im[None, :], prev_im)
        g_re = h_re * prev_re + h_im * prev_im
        g_im = h_im * prev_re - h_re * prev_im
        if TIME_VARYING:
            _store_pairs(lam_grad_ptr, g_re, g_im, t, in_time, b, nb, T, N, CHUNK_SIZE, BLOCK)
        else:
            partial = ((b * n_chunks + chunk) * N + n) * 2
            tl.store(lam_grad_ptr + partial, tl.sum(g_re, axis=0), mask=n_mask)
            tl.store(lam_grad_ptr + partial + 1, tl.sum(g_im, axis=0), mask=n_mask)


def _floats(z: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(z.contiguous())


def _launch(
    lam: torch.Tensor,
    inputs: torch.Tensor,
    start: torch.Tensor | None,
    out: torch.Tensor,
    *,
    reverse: bool,
    states: torch.Tensor | None = None,
    states_start: torch.Tensor | None = None,
    lam_grad: torch.Tensor | None = None,
    tiling: Tiling,
    publish_prefix: bool,
) -> None:
    if inputs.dtype != torch.complex64:
        raise TypeError(f"the Triton scan computes in complex64, got {inputs.dtype}")
    chunk, block = tiling.chunk, tiling.block
    batch, length, channels = inputs.shape
    n_chunks = triton.cdiv(length, chunk)
    n_blocks = triton.cdiv(channels, block)
    n_seqs = batch * n_blocks
    n_tiles = n_seqs * n_chunks
    # Per call: the statuses must start empty, and the ticket counter (last) at zero.
    status = torch.zeros(n_tiles + 1, dtype=torch.int32, device=inputs.device)
    aggregates = torch.empty(n_tiles * (4 if lam.dim() == 3 else 2) * block, dtype=torch.float32, device=inputs.device)
    prefixes = torch.empty(n_tiles * 2 * block, dtype=torch.float32, device=inputs.device)
    x_f = _floats(inputs)
    placeholder = x_f  # a pointer for arguments a constexpr switch leaves unread

    def pointer(tensor: torch.Tensor | None) -> torch.Tensor:
        return _floats(tensor) if tensor is not None else placeholder

    _scan_tiles[(n_tiles,)](
        _floats(lam), x_f, torch.view_as_real(out), pointer(start), pointer(states),
        pointer(states_start), pointer(lam_grad), status, aggregates, prefixes,
        length, channels, n_seqs, n_chunks, n_blocks,
        TIME_VARYING=lam.dim() == 3, REVERSE=reverse, HAS_START=start is not None,
        LAM_GRAD=lam_grad is not None, HAS_STATES_START=states_start is not None,
        PUBLISH_PREFIX=publish_prefix, CHUNK_SIZE=chunk, BLOCK=block, num_warps=tiling.num_warps,
    )  # fmt: skip


def linear_scan(
    lam: torch.Tensor,
    x: torch.Tensor,
    h0: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    tiling: Tiling | None = None,
    publish_prefix: bool = True,
) -> torch.Tensor:
    """All states of the scan, complex64 (B, T, N).

    `out` receives the states when given (the tests hand in a poisoned buffer to catch unwritten
    elements). `tiling` overrides the default (the interpreter's tests).
    publish_prefix=False is for the tests: tiles then publish only their aggregates,
    so every look-back walks to the start of its sequence, which under the interpreter's
    in-order programs would otherwise never happen.
    """
    h = out if out is not None else torch.empty_like(x)
    tiling = tiling or tiling_for(x.shape[-1])
    _launch(lam, x, h0, h, reverse=False, tiling=tiling, publish_prefix=publish_prefix)
    return h


def adjoint_scan(
    lam: torch.Tensor,
    grad_h: torch.Tensor,
    grad_last: torch.Tensor | None,
    states: torch.Tensor | None = None,
    h0: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    tiling: Tiling | None = None,
    publish_prefix: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The adjoint a_t = grad_h_t + conj(lam_{t+1}) a_{t+1}, entering from grad_last, which is
    also the gradient of x; with the forward `states` (and its h0) also the gradient of lam."""
    adjoint = out if out is not None else torch.empty_like(grad_h)
    batch, length, channels = grad_h.shape
    tiling = tiling or tiling_for(channels)
    lam_grad = None
    if states is not None:
        if lam.dim() == 3:
            lam_grad = torch.empty_like(lam)
        else:
            n_chunks = triton.cdiv(length, tiling.chunk)
            lam_grad = torch.empty((batch, n_chunks, channels), dtype=grad_h.dtype, device=grad_h.device)
    _launch(
        lam, grad_h, grad_last, adjoint, reverse=True, states=states, states_start=h0,
        lam_grad=lam_grad, tiling=tiling, publish_prefix=publish_prefix,
    )  # fmt: skip
    if lam_grad is not None and lam.dim() == 1:
        lam_grad = lam_grad.sum(dim=(0, 1))  # the tiles' sums
    return adjoint, lam_grad


def with_tiling(tiling: Tiling | None = None) -> ScanBackend:
    """The Triton backend with a fixed tiling (None: `tiling_for` the channels), to hand to
    `scan(..., backend=...)`: the benchmark's sweep and the interpreter's tests time or check
    other tilings through the autograd path this way."""

    def forward(lam: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
        return linear_scan(lam, x, h0, tiling=tiling)

    def backward(
        lam: torch.Tensor,
        h: torch.Tensor,
        h0: torch.Tensor | None,
        grad_h: torch.Tensor,
        grad_last: torch.Tensor | None,
        need_lam: bool,
        need_h0: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        adjoint, grad_lam = adjoint_scan(lam, grad_h, grad_last, h if need_lam else None, h0, tiling=tiling)
        return adjoint, grad_lam, grad_h0(lam, adjoint) if need_h0 else None

    return ScanBackend(
        name="triton",
        forward=forward,
        backward=backward,
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.complex64}),
    )


BACKEND = with_tiling(None)
