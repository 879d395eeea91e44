"""The Triton scan against complex128 references, printed as JSON {case: relative error}.

    TRITON_INTERPRET=1 python -m tests.lru_online.triton_check    # CPU, small shapes (CI)
    python -m tests.lru_online.triton_check --device cuda          # a GPU: issue 4's shapes
    python -m tests.lru_online.triton_check --device cuda --shapes 1x256x65537,64x512x2048

Forward states and the adjoint (the gradient of x) land in NaN-poisoned buffers, so an element
the kernel never wrote fails the comparison; lam's gradient is written by the same programs
under the same masks as the adjoint. Gradients are compared with autograd through the step
loop in complex128; states with a NumPy loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

import numpy as np
import torch

from lru_online.linear_scan import dispatch, triton_backend
from tests.lru_online.reference import numpy_scan, random_decay, relative_error

# (B, N, T): every length at the benchmark's two widths of N = 256, then its widest shape.
GPU_SHAPES = [*((batch, 256, length) for batch in (16, 1) for length in (1, 7, 1000, 4096, 65537)), (64, 512, 2048)]
# The interpreter calls the scan's combine function once per element pair, slowly: tiny tiles,
# still with several chunks and channel blocks, a ragged last one of each.
CPU_SHAPES = [(2, 3, 1), (2, 3, 7), (2, 3, 37)]
CPU_TILING = triton_backend.Tiling(chunk=8, block=2, num_warps=1)
# Once with the tiling a GPU gets (tiling_for: 16 steps, 64 channels): ragged in time and
# channels. The interpreter works through whole 64-channel blocks, so few channels cost less.
CPU_DEFAULT_TILING_SHAPE = (1, 5, 20)


def inputs(shape, time_varying, with_h0, device, seed):
    batch, channels, length = shape
    gen = torch.Generator().manual_seed(seed)
    lam = random_decay(channels, 0.9999, gen, (batch, length, channels) if time_varying else None)
    x = torch.randn(batch, length, channels, dtype=torch.complex128, generator=gen)
    h0 = torch.randn(batch, channels, dtype=torch.complex128, generator=gen) if with_h0 else None
    return [t.to(device) if t is not None else None for t in (lam, x, h0)]


def error(actual: torch.Tensor, expected: np.ndarray) -> float:
    """Relative error; absolute where the expected values are all zero (lam's gradient at T = 1
    from a zero h0)."""
    if not np.abs(expected).any():
        return float(np.abs(actual.detach().cpu().numpy()).max())
    return relative_error(actual, expected)


def single(tensors):
    return [t.to(torch.complex64) if t is not None else None for t in tensors]


def poisoned(like: torch.Tensor) -> torch.Tensor:
    return torch.full(like.shape, float("nan"), dtype=torch.complex64, device=like.device)


def gradient_errors(lam, x, h0, tiling) -> dict[str, float]:
    """Gradients for random output gradients of h and h_last: the kernel in complex64, through
    the same autograd rule as a model uses, against autograd through the complex128 step loop."""
    gen = torch.Generator().manual_seed(99)
    grad_h = torch.randn(x.shape, dtype=torch.complex128, generator=gen).to(x.device)
    grad_last = torch.randn(x[:, 0].shape, dtype=torch.complex128, generator=gen).to(x.device)
    present = [t for t in (lam, x, h0) if t is not None]

    def grads(backend, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in present]
        h, h_last = dispatch.scan(*leaves, backend=backend)  # (lam, x) or (lam, x, h0)
        return torch.autograd.grad((h, h_last), leaves, (grad_h.to(dtype), grad_last.to(dtype)))

    # The kernels through the same dispatch and autograd rule as a model uses (on CPU under the
    # interpreter, declared a CPU backend).
    kernel = replace(triton_backend.with_tiling(tiling), devices=frozenset({x.device.type}))
    expected = grads("reference", torch.complex128)
    errors = {
        f"grad {name}": error(ours, reference.cpu().numpy())
        for name, ours, reference in zip(("lam", "x", "h0"), grads(kernel, torch.complex64), expected, strict=False)
    }
    lam32, grad_h32, grad_last32 = single((lam, grad_h, grad_last))
    adjoint, _ = triton_backend.adjoint_scan(lam32, grad_h32, grad_last32, out=poisoned(x), tiling=tiling)
    errors["adjoint"] = error(adjoint, expected[1].cpu().numpy())
    return errors


def shape_errors(shape, device, tiling=None) -> dict[str, float]:
    results = {}
    for time_varying in (False, True):
        for with_h0 in (False, True):
            case = f"B={shape[0]} N={shape[1]} T={shape[2]} {'varying' if time_varying else 'invariant'} h0={with_h0}"
            lam, x, h0 = inputs(shape, time_varying, with_h0, device, seed=sum(shape))
            expected = numpy_scan(lam, x, h0)
            h = triton_backend.linear_scan(*single((lam, x, h0)), out=poisoned(x), tiling=tiling)
            results[f"forward {case}"] = relative_error(h, expected)
            # Tiles that publish no prefix: every look-back composes aggregates back to h0.
            h = triton_backend.linear_scan(*single((lam, x, h0)), out=poisoned(x), tiling=tiling, publish_prefix=False)
            results[f"forward look-back only {case}"] = relative_error(h, expected)
            for name, error in gradient_errors(lam, x, h0, tiling).items():
                results[f"{name} {case}"] = error
    return results


def chunk_invariance(device, tiling=None) -> float:
    """The state carried across cuts gives the uncut scan."""
    lam, x, h0 = single(inputs((2, 3, 40), False, True, device, seed=5))
    whole = triton_backend.linear_scan(lam, x, h0, tiling=tiling)
    carried, parts = h0, []
    for lo, hi in ((0, 13), (13, 24), (24, 40)):
        part = triton_backend.linear_scan(lam, x[:, lo:hi].contiguous(), carried, tiling=tiling)
        parts.append(part)
        carried = part[:, -1].contiguous()
    return relative_error(torch.cat(parts, 1), whole.cpu().numpy().astype(np.complex128))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shapes", default=None, help="BxNxT,... instead of the device's default list")
    args = parser.parse_args()
    device = args.device
    tiling = None
    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("on CPU the kernels run only under Triton's interpreter: set TRITON_INTERPRET=1")
        tiling, shapes = CPU_TILING, CPU_SHAPES
    else:
        shapes = GPU_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    results = {}
    for shape in shapes:
        results |= shape_errors(shape, device, tiling)
    results["chunk invariance"] = chunk_invariance(device, tiling)
    if device == "cpu":
        default_tiling = shape_errors(CPU_DEFAULT_TILING_SHAPE, device)
        results |= {f"default tiling {case}": error for case, error in default_tiling.items()}
    json.dump(results, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
