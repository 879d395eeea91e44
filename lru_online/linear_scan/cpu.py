"""Compiled CPU scan: the C kernels of csrc/scan.c, split over threads.

With at least as many batch rows as threads, each thread scans whole rows: one pass over
memory, like a copy. With fewer rows (one machine's long history) and three threads or more,
time is cut into one stretch per thread; each stretch is scanned from a zero state in parallel,
the states entering the stretches are chained in a tiny sequential step, and a fix-up adds each
carried-in state times the decay products. That fix-up is a second pass as costly as the scan,
so the critical path is 2T/threads: on two threads no better than one, and one thread scans
alone there. (Splitting channels instead was tried: the threads then fault in the same pages of
the fresh output and ran slower than one.) The backward pass is the same plan in reverse time.
Threads own contiguous memory, which matters: first-touch page faults of a fresh output
dominate a scan on this hardware, and they only run in parallel on disjoint pages.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from lru_online.linear_scan.backend import grad_h0

try:
    from lru_online import _cscan
except ImportError:  # built at install time when a C compiler is present
    _cscan = None

# Below this many elements a thread hand-off costs more than it saves.
_PARALLEL_MIN_ELEMENTS = 1 << 16
# Shorter stretches of time are not worth a fix-up pass.
_MIN_STRETCH = 1024
# A split in time costs a second pass (the fix-up): it pays off from three threads on.
_MIN_STRETCH_THREADS = 3

# Outputs this large are advised onto transparent huge pages before their first touch.
_HUGE_PAGE_MIN_BYTES = 8 << 20

_pool: ThreadPoolExecutor | None = None


def is_available() -> bool:
    return _cscan is not None


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool._max_workers < threads:
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lru-scan")
    return _pool


def _run(calls: list[tuple]) -> None:
    """Runs (kernel, *args) calls, in parallel when there are several."""
    if len(calls) == 1:
        kernel, *args = calls[0]
        kernel(*args)
        return
    pool = _executor(len(calls))
    for future in [pool.submit(*call) for call in calls]:
        future.result()


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    bounds = [round(i * total / parts) for i in range(parts + 1)]
    return [(lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False) if hi > lo]


@dataclass(frozen=True)
class _Plan:
    rows: list[tuple[int, int]]  # one thread per row range, each over all of time ...
    stretches: list[tuple[int, int]]  # ... or one thread per stretch of time, over all rows


def _plan(batch: int, length: int, channels: int) -> _Plan:
    threads = _threads()
    if threads == 1 or batch * length * channels < _PARALLEL_MIN_ELEMENTS:
        return _Plan([(0, batch)], [(0, length)])
    if batch >= threads:
        return _Plan(_split(batch, threads), [(0, length)])
    if threads < _MIN_STRETCH_THREADS:
        return _Plan([(0, batch)], [(0, length)])
    stretches = min(threads, max(1, length // _MIN_STRETCH))
    return _Plan([(0, batch)], _split(length, stretches))


def _fresh_like(tensor: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(tensor)
    if out.nbytes >= _HUGE_PAGE_MIN_BYTES:
        _cscan.advise_huge_pages(out.data_ptr(), out.nbytes)
    return out


def _ptr(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _stretch_decay(lam: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Product of lam over steps [lo, hi): (N,) or (B, N)."""
    if lam.dim() == 3:
        return torch.prod(lam[:, lo:hi], dim=1)
    return lam ** (hi - lo)


def cpu_forward(lam: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    batch, length, channels = x.shape
    h = _fresh_like(x)
    plan = _plan(batch, length, channels)
    head = (x.dtype == torch.complex128, _ptr(lam), lam.dim() == 3)
    shape = (batch, length, channels)
    _run(
        [
            (
                _cscan.forward,
                *head,
                _ptr(x),
                _ptr(h),
                _ptr(h0 if t0 == 0 else None),
                *shape,
                b0,
                b1,
                0,
                channels,
                t0,
                t1,
            )
            for b0, b1 in plan.rows
            for t0, t1 in plan.stretches
        ]
    )
    if len(plan.stretches) > 1:
        # State entering each later stretch: the previous stretch's zero-start end state plus
        # the state entering that stretch, decayed across it.
        carries, entering = [], h[:, plan.stretches[0][1] - 1]
        for (lo, hi), _ in zip(plan.stretches[1:], plan.stretches[2:] + [None], strict=False):
            carries.append(entering.contiguous())
            entering = h[:, hi - 1] + _stretch_decay(lam, lo, hi) * entering
        _run(
            [
                (
                    _cscan.fixup_forward,
                    *head,
                    _ptr(h),
                    _ptr(carry),
                    *shape,
                    0,
                    batch,
                    0,
                    channels,
                    t0,
                    t1,
                )
                for (t0, t1), carry in zip(plan.stretches[1:], carries, strict=True)
            ]
        )
    return h


def cpu_backward(
    lam: torch.Tensor,
    h: torch.Tensor,
    h0: torch.Tensor | None,
    grad_h: torch.Tensor,
    grad_last: torch.Tensor | None,
    need_lam: bool,
    need_h0: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    batch, length, channels = grad_h.shape
    time_varying = lam.dim() == 3
    plan = _plan(batch, length, channels)
    grad_x = _fresh_like(grad_h)
    # Time-invariant lam: one (B, N) partial sum per stretch, reduced at the end.
    grad_lam = None
    if need_lam:
        grad_lam = torch.empty_like(lam) if time_varying else grad_h.new_empty(len(plan.stretches), batch, channels)

    def lam_buffer(index: int) -> int:
        if grad_lam is None:
            return 0
        return grad_lam.data_ptr() if time_varying else grad_lam[index].data_ptr()

    head = (grad_h.dtype == torch.complex128, _ptr(lam), time_varying)
    shape = (batch, length, channels)
    saved_h = (_ptr(h), _ptr(h0)) if need_lam else (0, 0)
    last = len(plan.stretches) - 1
    _run(
        [
            (
                _cscan.backward,
                *head,
                _ptr(grad_h),
                _ptr(grad_last if index == last else None),
                *saved_h,
                _ptr(grad_x),
                lam_buffer(index),
                *shape,
                b0,
                b1,
                0,
                channels,
                t0,
                t1,
            )
            for b0, b1 in plan.rows
            for index, (t0, t1) in enumerate(plan.stretches)
        ]
    )
    if last > 0:
        # Adjoint entering each earlier stretch from the one after it, chained backwards.
        carries: list[torch.Tensor] = []
        entering = grad_x[:, plan.stretches[last][0]]
        for index in range(last - 1, -1, -1):
            carries.insert(0, entering.contiguous())
            if index > 0:
                lo, hi = plan.stretches[index]
                decay = _stretch_decay(lam, lo + 1, hi + 1).conj()
                entering = grad_x[:, lo] + decay * entering
        _run(
            [
                (
                    _cscan.fixup_backward,
                    *head,
                    _ptr(grad_x),
                    _ptr(carry),
                    *saved_h,
                    lam_buffer(index),
                    *shape,
                    0,
                    batch,
                    0,
                    channels,
                    t0,
                    t1,
                )
                for index, ((t0, t1), carry) in enumerate(zip(plan.stretches[:-1], carries, strict=True))
            ]
        )
    if grad_lam is not None and not time_varying:
        grad_lam = grad_lam.sum(dim=(0, 1))
    return grad_x, grad_lam, grad_h0(lam, grad_x) if need_h0 else None
