"""Run by test_scan_triton.py in a fresh interpreter with TRITON_INTERPRET=1: the Triton scan's
kernels on CPU tensors against the complex128 references, printed as JSON {case: error}."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lru_online.scan import dispatch, triton_backend  # noqa: E402
from tests.lru_online.reference import numpy_scan, random_decay, relative_error  # noqa: E402

# The kernels under the interpreter, reached through the same dispatch and autograd rule as on CUDA.
dispatch.register_backend(replace(triton_backend.BACKEND, devices=frozenset({"cpu"})))
# The interpreter runs a program step by step: short chunks keep the padding of the last one small.
triton_backend.CHUNK = 32


def inputs(batch, length, channels, time_varying, with_h0, seed):
    gen = torch.Generator().manual_seed(seed)
    lam = random_decay(channels, 0.9999, gen, (batch, length, channels) if time_varying else None)
    x = torch.randn(batch, length, channels, dtype=torch.complex128, generator=gen)
    h0 = torch.randn(batch, channels, dtype=torch.complex128, generator=gen) if with_h0 else None
    return lam, x, h0


def gradient_errors(lam, x, h0) -> dict[str, float]:
    """Gradients of a random real loss of h and h_last: the kernel in complex64 against the
    step loop in complex128."""
    gen = torch.Generator().manual_seed(99)
    weight = torch.randn(x.shape, dtype=torch.complex128, generator=gen)
    last_weight = torch.randn(x[:, 0].shape, dtype=torch.complex128, generator=gen)

    def grads(backend, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (lam, x, h0) if t is not None]
        h, h_last = (
            dispatch.scan(*leaves, backend=backend) if h0 is not None else dispatch.scan(*leaves, None, backend=backend)
        )
        loss = (h * weight.to(dtype)).real.sum() + (h_last * last_weight.to(dtype)).imag.sum()
        return torch.autograd.grad(loss, leaves)

    names = ["lam", "x", "h0"][: 3 if h0 is not None else 2]
    fast, slow = grads("triton", torch.complex64), grads("reference", torch.complex128)
    return {name: relative_error(f, s.numpy()) for name, f, s in zip(names, fast, slow, strict=True)}


def main() -> None:
    results: dict[str, float] = {}
    for length in (1, 7, 70):  # 70: two full chunks of 32 and a ragged one
        for time_varying in (False, True):
            for with_h0 in (False, True):
                case = f"T={length} {'time-varying' if time_varying else 'time-invariant'} h0={with_h0}"
                lam, x, h0 = inputs(2, length, 20, time_varying, with_h0, seed=length)
                c64 = [t.to(torch.complex64) if t is not None else None for t in (lam, x, h0)]
                poisoned = torch.full(x.shape, float("nan"), dtype=torch.complex64)
                h = triton_backend.linear_scan(*c64, out=poisoned)
                results[f"forward {case}"] = relative_error(h, numpy_scan(lam, x, h0))
                # Other chunks and channel blocks: a ragged last block of channels.
                h = triton_backend.linear_scan(*c64, chunk=16, block=16)
                results[f"forward chunk 16 {case}"] = relative_error(h, numpy_scan(lam, x, h0))
                if length > 1:
                    for leaf, error in gradient_errors(lam, x, h0).items():
                        results[f"grad {leaf} {case}"] = error
    # Chunk invariance: the state carried across a cut gives the uncut scan.
    lam, x, h0 = inputs(2, 100, 20, False, True, seed=5)
    c64 = [t.to(torch.complex64) for t in (lam, x, h0)]
    whole, _ = dispatch.scan(*c64, backend="triton")
    carried, parts = c64[2], []
    for lo, hi in ((0, 37), (37, 64), (64, 100)):
        part, carried = dispatch.scan(c64[0], c64[1][:, lo:hi], carried, backend="triton")
        parts.append(part)
    results["chunk invariance"] = relative_error(torch.cat(parts, 1), whole.numpy().astype(np.complex128))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
