"""CPU scan benchmark: step loop, torch-ops chunked scan and the compiled CPU scan, beside a
plain copy of the same bytes, all measured in one run.

    python bench/scan_cpu.py [--shapes 1x256x65536,16x256x65536,16x256x4096] [--repeats 5]
                             [--threads N]

Each shape runs in a fresh process (the first call of a shape pays page faults and thread
start-up that a warm process does not, and a shape must not inherit another's heap), with
`torch.set_num_threads(--threads)` (default: torch's own choice), and prints the first call
apart from the steady state (median of --repeats calls after two more warm-up calls).

"fwd" is the scan alone; "fwd+bwd" adds the backward pass for x, lam and h0 from a random
upstream gradient on every state. The copy yardstick is x.clone() (read 8 B, write 8 B per
complex64 element): the scan moves the same bytes, so its ratio to the copy shows how close it
runs to the memory bandwidth. For fwd+bwd the yardstick is two copies.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = {"reference": "step loop", "chunked": "chunked torch ops", "cpu": "compiled CPU scan"}


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call, median of `repeats` calls after two warm-up calls), in seconds."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def run_shape(batch: int, channels: int, length: int, repeats: int, loop_repeats: int) -> list[dict]:
    """The child: every method at one shape."""
    import torch

    from lru_online import available_backends, scan

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

    first, steady = timed(lambda: x.clone(), repeats)
    rows = [{"method": "copy (yardstick)", "fwd": (first, steady), "fwd+bwd": (2 * first, 2 * steady)}]
    for backend, name in METHODS.items():
        if backend not in available_backends("cpu"):
            continue
        count = loop_repeats if backend == "reference" else repeats
        rows.append(
            {"method": name, "fwd": timed(forward(backend), count), "fwd+bwd": timed(forward_backward(backend), count)}
        )
        gc.collect()
    return rows


def machine(threads: int | None) -> str:
    import torch

    from lru_online import available_backends

    if threads:
        torch.set_num_threads(threads)
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [
            line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    kernel = "not built (no C compiler): chunked torch ops only"
    if "cpu" in available_backends("cpu"):
        from lru_online import _cscan

        kernel = f"built with gcc {_cscan.compiler}, flags {_cscan.compile_flags}"
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {cpu}; "
        f"Python {platform.python_version()}; CPU kernel {kernel}; complex64"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1x256x65536,16x256x65536,16x256x4096", help="BxNxT list")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child: one shape, JSON out
    args = parser.parse_args()
    if args.one:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        batch, channels, length = (int(v) for v in args.one.lower().split("x"))
        print(json.dumps(run_shape(batch, channels, length, args.repeats, args.loop_repeats)))
        return

    print(machine(args.threads))
    print("each shape in a fresh process; ms; first = the first call, steady = median after warm-up")
    columns = ["fwd first", "fwd steady", "f+b first", "f+b steady", "fwd/copy", "loop/fwd", "loop/f+b"]
    header = f"{'B':>3} {'N':>4} {'T':>6}  {'method':<20} " + " ".join(f"{c:>10}" for c in columns)
    print(header)
    print("-" * len(header))
    for shape in args.shapes.split(","):
        command = [sys.executable, __file__, "--one", shape, "--repeats", str(args.repeats)]
        command += ["--loop-repeats", str(args.loop_repeats)]
        command += ["--threads", str(args.threads)] if args.threads else []
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows = json.loads(done.stdout.strip().splitlines()[-1])
        copy = rows[0]["fwd"][1]
        loop = next((r for r in rows if r["method"] == "step loop"), None)
        batch, channels, length = (int(v) for v in shape.lower().split("x"))
        for row in rows:
            (fwd_first, fwd), (fb_first, fb) = row["fwd"], row["fwd+bwd"]
            versus = [fwd / copy, loop["fwd"][1] / fwd if loop else float("nan")]
            versus.append(loop["fwd+bwd"][1] / fb if loop else float("nan"))
            figures = [f"{v * 1e3:>10.1f}" for v in (fwd_first, fwd, fb_first, fb)]
            figures += [f"{versus[0]:>10.2f}", f"{versus[1]:>10.1f}", f"{versus[2]:>10.1f}"]
            print(f"{batch:>3} {channels:>4} {length:>6}  {row['method']:<20} " + " ".join(figures))
        print()


if __name__ == "__main__":
    main()
