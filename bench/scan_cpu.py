"""CPU scan benchmark: step loop, torch-ops chunked scan and the compiled CPU scan, beside a
plain copy of the same bytes, all measured in one run.

    python bench/scan_cpu.py [--shapes 1x256x65536,16x256x65536,16x256x4096] [--repeats 5]

"fwd" is the scan alone; "fwd+bwd" adds the backward pass for x, lam and h0 from a random
upstream gradient on every state. The copy yardstick is x.clone() (read 8 B, write 8 B per
complex64 element): the scan moves the same bytes, so its ratio to the copy shows how close it
runs to the memory bandwidth. For fwd+bwd the yardstick is two copies (the backward pass reads
the gradient and writes grad_x, and the fused kernel reads h once more for grad_lam).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from lru_online import available_backends, scan


def measure(fn, repeats: int) -> float:
    # Warm-up: thread pool, and the allocator and page tables settling for buffers this size
    # (the first few calls of a shape pay extra page faults that a long-running update does not).
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_shape(batch: int, channels: int, length: int, repeats: int, loop_repeats: int) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(batch, length, channels, dtype=torch.complex64)
    lam = torch.polar(0.5 + 0.4999 * torch.rand(channels), torch.pi * torch.rand(channels))
    h0 = torch.randn(batch, channels, dtype=torch.complex64)
    grad = torch.randn_like(x)

    def forward(backend):
        return lambda: scan(lam, x, h0, backend=backend)

    def forward_backward(backend):
        def run():
            leaves = [t.detach().requires_grad_() for t in (lam, x, h0)]
            h, h_last = scan(*leaves, backend=backend)
            torch.autograd.backward([h, h_last], [grad, torch.zeros_like(h_last)])

        return run

    copy_time = measure(lambda: x.clone(), repeats)
    rows = [{"method": "copy (yardstick)", "fwd": copy_time, "fwd+bwd": 2 * copy_time}]
    names = {"reference": "step loop", "chunked": "chunked torch ops", "cpu": "compiled CPU scan"}
    for backend in ["reference", "chunked", "cpu"]:
        if backend not in available_backends("cpu"):
            continue
        count = loop_repeats if backend == "reference" else repeats
        rows.append(
            {
                "method": names[backend],
                "fwd": measure(forward(backend), count),
                "fwd+bwd": measure(forward_backward(backend), count),
            }
        )
        gc.collect()
    loop = next(r for r in rows if r["method"] == "step loop")
    for row in rows:
        row["vs copy fwd"] = row["fwd"] / rows[0]["fwd"]
        row["vs copy fwd+bwd"] = row["fwd+bwd"] / rows[0]["fwd+bwd"]
        row["speedup vs loop fwd"] = loop["fwd"] / row["fwd"]
        row["speedup vs loop fwd+bwd"] = loop["fwd+bwd"] / row["fwd+bwd"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1x256x65536,16x256x65536,16x256x4096", help="BxNxT list")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-repeats", type=int, default=1)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, complex64, median of {args.repeats}")
    columns = ["fwd ms", "fwd+bwd ms", "fwd/copy", "f+b/copy", "loop/fwd", "loop/f+b"]
    header = f"{'B':>3} {'N':>4} {'T':>6}  {'method':<20} " + " ".join(f"{c:>10}" for c in columns)
    print(header)
    print("-" * len(header))
    for shape in args.shapes.split(","):
        batch, channels, length = (int(v) for v in shape.lower().split("x"))
        for row in run_shape(batch, channels, length, args.repeats, args.loop_repeats):
            figures = [
                f"{row['fwd'] * 1e3:>10.1f}",
                f"{row['fwd+bwd'] * 1e3:>10.1f}",
                f"{row['vs copy fwd']:>10.2f}",
                f"{row['vs copy fwd+bwd']:>10.2f}",
                f"{row['speedup vs loop fwd']:>10.1f}",
                f"{row['speedup vs loop fwd+bwd']:>10.1f}",
            ]
            print(f"{batch:>3} {channels:>4} {length:>6}  {row['method']:<20} " + " ".join(figures))
        print()


if __name__ == "__main__":
    main()
