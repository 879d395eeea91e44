import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lru_online import available_backends, scan
from tests.lru_online.reference import numpy_scan, random_decay, relative_error

FAST_BACKENDS = [name for name in available_backends("cpu") if name != "reference"]
ALL_BACKENDS = available_backends("cpu")
TOLERANCE = {torch.complex64: 1e-4, torch.complex128: 1e-12}


COMPILED = "cpu" in FAST_BACKENDS
needs_kernel = pytest.mark.skipif(not COMPILED, reason="the compiled CPU kernel is not built (no C compiler)")


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: the package installs without the kernel")
def test_compiled_cpu_backend_is_built():
    # CI and every install with a C compiler build the kernel; without it only "chunked" runs.
    assert COMPILED


def _inputs(batch, length, channels, dtype, time_varying, with_h0, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, length, channels) if time_varying else None
    lam = random_decay(channels, 0.9999, gen, shape).to(dtype)
    x = torch.randn(batch, length, channels, dtype=torch.complex128, generator=gen).to(dtype)
    h0 = torch.randn(batch, channels, dtype=torch.complex128, generator=gen).to(dtype) if with_h0 else None
    return lam, x, h0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("time_varying", [False, True])
@pytest.mark.parametrize("length", [1, 2, 7, 100, 1001])
@pytest.mark.parametrize("with_h0", [False, True])
def test_scan_matches_float64_loop(backend, dtype, time_varying, length, with_h0):
    lam, x, h0 = _inputs(3, length, 19, dtype, time_varying, with_h0, seed=length)
    h, h_last = scan(lam, x, h0, backend=backend)
    expected = numpy_scan(lam, x, h0)
    assert h.shape == x.shape and h.dtype == dtype
    assert relative_error(h, expected) <= TOLERANCE[dtype]
    assert relative_error(h_last, expected[:, -1]) <= TOLERANCE[dtype]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("time_varying", [False, True])
def test_scan_long_sequence(backend, dtype, time_varying):
    # 65,536 steps with |λ| up to 0.9999: errors have time to accumulate.
    lam, x, h0 = _inputs(2, 65_536, 8, dtype, time_varying, True, seed=7)
    h, h_last = scan(lam, x, h0, backend=backend)
    expected = numpy_scan(lam, x, h0)
    assert relative_error(h, expected) <= TOLERANCE[dtype]
    assert relative_error(h_last, expected[:, -1]) <= TOLERANCE[dtype]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_scan_odd_lengths_and_wide_channels(backend):
    # Lengths that are not multiples of any chunk, channel counts above the kernel's block.
    for length, channels in [(65_537, 3), (4_099, 600)]:
        lam, x, h0 = _inputs(1, length, channels, torch.complex64, False, True, seed=length)
        h, _ = scan(lam, x, h0, backend=backend)
        assert relative_error(h, numpy_scan(lam, x, h0)) <= 1e-4


@needs_kernel
@pytest.mark.parametrize("threads", [2, 3, 5])
@pytest.mark.parametrize("time_varying", [False, True])
def test_time_split_plan_forward_and_gradients(threads, time_varying):
    # One row and a long stream: the compiled backend cuts time into one stretch per thread
    # and chains the carries, forward and backward.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lam, x, h0 = _inputs(1, 12_345, 6, torch.complex128, time_varying, True, seed=threads)
        gen = torch.Generator().manual_seed(9)
        weight = torch.randn(x.shape, dtype=torch.complex128, generator=gen)
        results = {}
        for name in ("cpu", "chunked"):
            leaves = [t.detach().clone().requires_grad_() for t in (lam, x, h0)]
            h, h_last = scan(*leaves, backend=name)
            loss = (h * weight.conj()).real.sum() + h_last.abs().sum()
            results[name] = (h, *torch.autograd.grad(loss, leaves))
        assert relative_error(results["cpu"][0], numpy_scan(lam, x, h0)) <= 1e-12
        for fast, independent in zip(results["cpu"], results["chunked"], strict=True):
            assert (fast - independent).abs().max() / independent.abs().max() <= 1e-10
    finally:
        torch.set_num_threads(previous)


@settings(max_examples=25, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=299), max_size=6, unique=True),
    backend=st.sampled_from(ALL_BACKENDS),
    time_varying=st.booleans(),
)
def test_scan_chunk_invariance(cuts, backend, time_varying):
    lam, x, h0 = _inputs(2, 300, 5, torch.complex128, time_varying, True, seed=len(cuts))
    whole, whole_last = scan(lam, x, h0, backend=backend)
    bounds = [0, *sorted(cuts), 300]
    carried, pieces = h0, []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        piece_lam = lam[:, lo:hi] if time_varying else lam
        h, carried = scan(piece_lam, x[:, lo:hi], carried, backend=backend)
        pieces.append(h)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(carried, whole_last, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("time_varying", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
def test_gradcheck(backend, time_varying, with_h0):
    lam, x, h0 = _inputs(2, 9, 3, torch.complex128, time_varying, with_h0, seed=3)
    lam.requires_grad_()
    x.requires_grad_()
    inputs = (lam, x, h0.requires_grad_()) if with_h0 else (lam, x)
    assert torch.autograd.gradcheck(lambda *args: scan(*args, backend=backend), inputs)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("time_varying", [False, True])
def test_gradients_equal_step_loop(backend, dtype, time_varying):
    lam, x, h0 = _inputs(3, 257, 11, dtype, time_varying, True, seed=11)
    gen = torch.Generator().manual_seed(5)
    weight_h = torch.randn(x.shape, dtype=torch.complex128, generator=gen).to(dtype)
    weight_last = torch.randn(h0.shape, dtype=torch.complex128, generator=gen).to(dtype)

    def grads(name):
        leaves = [t.detach().clone().requires_grad_() for t in (lam, x, h0)]
        h, h_last = scan(*leaves, backend=name)
        loss = (h * weight_h.conj()).real.sum() + (h_last * weight_last.conj()).real.sum()
        return torch.autograd.grad(loss, leaves)

    tol = 1e-4 if dtype == torch.complex64 else 1e-10
    for fast, slow in zip(grads(backend), grads("reference"), strict=True):
        scale = slow.abs().max()
        assert (fast - slow).abs().max() / scale <= tol


def test_gradient_only_through_last_state():
    lam, x, h0 = _inputs(1, 50, 4, torch.complex128, False, True, seed=1)
    x.requires_grad_()
    _, h_last = scan(lam, x, h0, backend=FAST_BACKENDS[-1])
    (grad_x,) = torch.autograd.grad(h_last.real.sum(), x)
    # d h_last / d x_t = lam^(T-1-t): the conjugate powers under torch's convention.
    powers = lam.conj() ** torch.arange(49, -1, -1, dtype=torch.float64).unsqueeze(-1)
    torch.testing.assert_close(grad_x[0], powers.to(grad_x.dtype))


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: (torch.ones(4, dtype=torch.complex64), torch.ones(2, 5, 4)),
            "complex64 or complex128",
        ),
        (
            lambda: (
                torch.ones(3, dtype=torch.complex64),
                torch.ones(2, 5, 4, dtype=torch.complex64),
            ),
            "lam must have shape",
        ),
        (
            lambda: (
                torch.ones(4, dtype=torch.complex128),
                torch.ones(2, 5, 4, dtype=torch.complex64),
            ),
            "dtype",
        ),
        (
            lambda: (
                torch.ones(4, dtype=torch.complex64),
                torch.ones(2, 0, 4, dtype=torch.complex64),
            ),
            "T = 0",
        ),
        (
            lambda: (torch.ones(4, dtype=torch.complex64), torch.ones(5, 4, dtype=torch.complex64)),
            "(B, T, N)",
        ),
    ],
)
def test_bad_arguments_are_named(make, message):
    lam, x = make()
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        scan(lam, x)


def test_bad_h0_and_backend_are_named():
    lam, x, _ = _inputs(2, 5, 4, torch.complex64, False, False, seed=0)
    with pytest.raises(ValueError, match="h0 must have shape"):
        scan(lam, x, torch.zeros(3, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="unknown or unavailable backend 'nope'"):
        scan(lam, x, backend="nope")


@needs_kernel
def test_the_plan_splits_time_only_where_it_can_win():
    """A split in time costs a second pass (the fix-up), so its critical path is 2T/threads:
    no better than one thread on two. Rows are split whenever there are enough of them."""
    from lru_online.linear_scan import cpu

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu._plan(1, 65_536, 256) == cpu._Plan([(0, 1)], [(0, 65_536)])
        assert cpu._plan(4, 65_536, 256).rows == [(0, 2), (2, 4)]
        torch.set_num_threads(4)
        assert len(cpu._plan(1, 65_536, 256).stretches) == 4
    finally:
        torch.set_num_threads(previous)


@needs_kernel
def test_a_fix_up_that_decays_to_nothing_still_gives_the_scan():
    """Carried-in states decay into subnormal numbers within a stretch (here after ~100 steps);
    the fix-up flushes them to zero and stops, and the states still equal the step loop."""
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        gen = torch.Generator().manual_seed(3)
        lam = torch.polar(torch.full((8,), 0.3, dtype=torch.float64), torch.rand(8, generator=gen, dtype=torch.float64))
        x = torch.randn(1, 20_000, 8, dtype=torch.complex128, generator=gen)
        for dtype in (torch.complex64, torch.complex128):
            h, _ = scan(lam.to(dtype), x.to(dtype), backend="cpu")
            tolerance = TOLERANCE[dtype]
            assert relative_error(h, numpy_scan(lam, x, None)) <= 10 * tolerance
    finally:
        torch.set_num_threads(previous)
