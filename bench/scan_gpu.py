"""The LRU scan on a CUDA GPU: our Triton kernel against the memory floor and the peers, one table.

    python bench/scan_gpu.py [--shapes 16x256x4096,16x256x65536,1x256x65536,64x512x2048] [--json FILE]

Per shape (B, N, T), complex64, time-invariant lam, with h0, medians of triton.testing.do_bench:
- copy ceiling: the device-to-device copy bandwidth measured here, and the LRU floor at that
  bandwidth, 16 bytes per element (read x, write h);
- ours: forward, and forward + backward (grads of x, lam, h0);
- torch step loop: the `reference` backend (one kernel launch per step), forward only;
- accelerated-scan and flash-linear-attention's chunk_hgrn when installed (the peers; rows say
  "not installed" otherwise). chunk_hgrn is real-valued: it runs on the equivalent width 2N.
Then one training step (forward, backward, AdamW) of an LRU model of 4 blocks, d_model 256,
N 256, B 16, T 4096 with our kernel.

Needs a CUDA GPU and triton; it says so and stops otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lru_online import scan  # noqa: E402

DEFAULT_SHAPES = "16x256x4096,16x256x65536,1x256x65536,64x512x2048"
FLOOR_BYTES = 16  # per complex64 element: read x (8), write h (8)


def median_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy of 2 GiB (read + write counted)."""
    source = torch.empty(2**29, dtype=torch.float32, device="cuda")
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source))
    return 2 * source.numel() * 4 / (ms / 1e3)


def inputs(batch: int, channels: int, length: int):
    generator = torch.Generator(device="cuda").manual_seed(0)
    modulus = 0.5 + 0.49 * torch.rand(channels, device="cuda", generator=generator)
    lam = torch.polar(modulus, torch.rand(channels, device="cuda", generator=generator) * 3.14)
    x = torch.randn(batch, length, channels, dtype=torch.complex64, device="cuda", generator=generator)
    h0 = torch.randn(batch, channels, dtype=torch.complex64, device="cuda", generator=generator)
    return lam, x, h0


def ours_forward(lam, x, h0):
    return lambda: scan(lam, x, h0, backend="triton")


def ours_forward_backward(lam, x, h0):
    leaves = [t.detach().clone().requires_grad_() for t in (lam, x, h0)]
    grad = torch.randn_like(x)

    def step():
        h, _ = scan(*leaves, backend="triton")
        torch.autograd.grad(h, leaves, grad)

    return step


def step_loop_ms(lam, x, h0) -> float:
    """One timed run: the step loop is too slow for repeated medians at long T."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    scan(lam, x, h0, backend="reference")
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - started)


def peer_accelerated_scan(lam, x, h0):
    """accelerated-scan's Triton scan, if installed (it takes no h0; gates are a full tensor)."""
    from accelerated_scan.triton import scan as accelerated

    gates = lam.expand_as(x).transpose(1, 2).contiguous()
    tokens = x.transpose(1, 2).contiguous()
    return lambda: accelerated(gates, tokens)


def peer_chunk_hgrn(lam, x, h0):
    """flash-linear-attention's chunk_hgrn on the real-valued width 2N, if installed."""
    from fla.ops.hgrn import chunk_hgrn

    real = torch.view_as_real(x).flatten(-2).contiguous()
    log_gate = torch.log(lam.abs()).repeat_interleave(2).expand_as(real).contiguous()
    start = torch.view_as_real(h0).flatten(-2).contiguous()
    return lambda: chunk_hgrn(real, log_gate, initial_state=start, output_final_state=True)


def training_step_ms() -> float:
    from lru_online import LRUForecaster, ModelConfig

    model = LRUForecaster(
        ModelConfig(n_inputs=256, n_targets=256, d_model=256, d_state=256, n_layers=4, scan_backend="triton")
    ).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    u = torch.randn(16, 4096, 256, device="cuda")

    def step():
        forecast, _ = model(u)
        loss = forecast.square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return median_ms(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/scan_gpu.py needs a CUDA GPU; this machine has none")
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    header = ("B", "N", "T", "floor", "ours fwd", "ours f+b", "step loop", "acc-scan fwd", "hgrn fwd")
    print("".join(f"{h:>13}" for h in header) + "   (ms, medians)")
    rows = []
    for shape in args.shapes.split(","):
        batch, channels, length = (int(v) for v in shape.split("x"))
        lam, x, h0 = inputs(batch, channels, length)
        row = {
            "B": batch,
            "N": channels,
            "T": length,
            "floor_ms": 1e3 * FLOOR_BYTES * x.numel() / bandwidth,
            "ours_forward_ms": median_ms(ours_forward(lam, x, h0)),
            "ours_forward_backward_ms": median_ms(ours_forward_backward(lam, x, h0)),
            "step_loop_ms": step_loop_ms(lam, x, h0),
        }
        for key, peer in (("accelerated_scan_ms", peer_accelerated_scan), ("chunk_hgrn_ms", peer_chunk_hgrn)):
            try:
                row[key] = median_ms(peer(lam, x, h0))
            except ImportError:
                row[key] = "not installed"
            except Exception as error:  # a peer's API differs from what this bench expects
                row[key] = f"failed: {type(error).__name__}"
        rows.append(row)
        cells = [row[k] for k in ("B", "N", "T")] + [
            row[k] for k in ("floor_ms", "ours_forward_ms", "ours_forward_backward_ms", "step_loop_ms",
                             "accelerated_scan_ms", "chunk_hgrn_ms")
        ]  # fmt: skip
        print("".join(f"{c:>13.3f}" if isinstance(c, float) else f"{c!s:>13}" for c in cells))
        torch.cuda.empty_cache()
    train_ms = training_step_ms()
    print(f"training step, LRU 4 blocks d_model 256 N 256, B 16 T 4096, ours: {train_ms:.2f} ms")
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth,
                                         "shapes": rows, "training_step_ms": train_ms}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
