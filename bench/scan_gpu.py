"""The LRU scan on a CUDA GPU: our Triton kernel against the memory floor and the peers, one table.

    python bench/scan_gpu.py [--shapes 16x256x4096,16x256x65536,1x256x65536,64x512x2048]
                             [--tiling 16x256x4] [--sweep 16x256x4,16x128x2,8x256x4,...] [--json FILE]

Per shape (B, N, T), complex64, time-invariant lam, with h0, medians of triton.testing.do_bench:
- copy ceiling: the device-to-device copy bandwidth measured here, and the LRU floor at that
  bandwidth, 16 bytes per element (read x, write h);
- ours: forward, and forward + backward (grads of x, lam, h0), with the tiling given
  (chunk x block x warps; otherwise the kernel's own choice for N, tiling_for);
- torch step loop: the `reference` backend (one kernel launch per step), forward only;
- accelerated-scan's complex Triton scan (`accelerated_scan.complex.scan`), forward and
  forward + backward, on its own layout (B, N, T) with the full gate tensor it needs and h0
  folded into the first input, all prepared outside the timing; flash-linear-attention's
  chunk_hgrn, real-valued, on the equivalent width 2N. Rows say "not installed" otherwise.
Then one training step (forward, backward, AdamW) of an LRU model of 4 blocks, d_model 256,
N 256, B 16, T 4096, with our kernel and with the same model's scan swapped for
accelerated-scan's (its layout changes included: that is what using it costs this model).
--sweep times our forward and forward + backward per tiling at every shape, to choose tiling_for's.

Needs a CUDA GPU and triton; it says so and stops otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from unittest import mock

import torch

from lru_online import scan

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


def ours_forward(lam, x, h0, kernel="triton"):
    return lambda: scan(lam, x, h0, backend=kernel)


def forward_backward(run: Callable, leaves: list[torch.Tensor]) -> Callable[[], None]:
    """run(*leaves) -> states, then the gradients of all leaves for a random output gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    grad = torch.randn_like(run(*leaves).detach())

    def step():
        torch.autograd.grad(run(*leaves), leaves, grad)

    return step


def ours_forward_backward(lam, x, h0, kernel="triton"):
    return forward_backward(lambda *leaves: scan(*leaves, backend=kernel)[0], [lam, x, h0])


def step_loop_ms(lam, x, h0) -> float:
    """One timed run: the step loop is too slow for repeated medians at long T."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    scan(lam, x, h0, backend="reference")
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - started)


def accelerated_layout(lam, x, h0=None):
    """accelerated-scan's inputs: gates and tokens (B, N, T), h0 folded into the first token
    (h_0 = lam_0 h0 + x_0); differentiable, so the model's training step can use it too."""
    gates = lam.expand_as(x).transpose(1, 2).contiguous()
    tokens = x.transpose(1, 2)
    if h0 is not None:
        tokens = torch.cat([tokens[:, :, :1] + gates[:, :, :1] * h0.unsqueeze(-1), tokens[:, :, 1:]], dim=2)
    return gates, tokens.contiguous()


def peer_accelerated_scan(lam, x, h0):
    from accelerated_scan.complex import scan as accelerated

    gates, tokens = accelerated_layout(lam, x, h0)
    return lambda: accelerated(gates, tokens)


def peer_accelerated_scan_backward(lam, x, h0):
    from accelerated_scan.complex import scan as accelerated

    return forward_backward(accelerated, list(accelerated_layout(lam, x, h0)))


def scan_on_accelerated(lam, x, h0=None, backend=None):
    """The scan function computed by accelerated-scan, for the model's training step."""
    from accelerated_scan.complex import scan as accelerated

    states = accelerated(*accelerated_layout(lam, x, h0)).transpose(1, 2)
    return states, states[:, -1]


def peer_chunk_hgrn(lam, x, h0):
    """flash-linear-attention's chunk_hgrn on the real-valued width 2N, if installed."""
    from fla.ops.hgrn import chunk_hgrn

    real = torch.view_as_real(x).flatten(-2).contiguous()
    log_gate = torch.log(lam.abs()).repeat_interleave(2).expand_as(real).contiguous()
    start = torch.view_as_real(h0).flatten(-2).contiguous()
    return lambda: chunk_hgrn(real, log_gate, initial_state=start, output_final_state=True)


def training_step(kernel: str = "triton") -> Callable[[], None]:
    """One AdamW step of the 4-block model, with whatever `lru_online.layer.scan` is when it runs."""
    from lru_online import LRUForecaster, ModelConfig

    model = LRUForecaster(
        ModelConfig(n_inputs=256, n_targets=256, d_model=256, d_state=256, n_layers=4, scan_backend=kernel)
    ).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    u = torch.randn(16, 4096, 256, device="cuda")

    def step():
        forecast, _ = model(u)
        loss = forecast.square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def peer_ms(make: Callable[[], Callable[[], object]]) -> float | str:
    """The median of the peer's run that make() sets up, or why there is none (not installed, or
    its API is not what this bench expects)."""
    try:
        return median_ms(make())
    except ImportError:
        return "not installed"
    except Exception as error:
        return f"failed: {type(error).__name__}"


def parse_tiling(text: str):
    from lru_online.linear_scan.triton_backend import Tiling

    chunk, block, warps = (int(v) for v in text.split("x"))
    return Tiling(chunk=chunk, block=block, num_warps=warps)


def print_row(cells: list) -> None:
    print("".join(f"{c:>14.3f}" if isinstance(c, float) else f"{c!s:>14}" for c in cells))


def accelerated_disagreement(lam, x, h0) -> float | str:
    """max |peer - ours| / max |ours| of the forward states: the peer is wired to the same problem."""
    try:
        from accelerated_scan.complex import scan as accelerated
    except ImportError:
        return "not installed"
    ours, _ = scan(lam, x, h0, backend="triton")
    theirs = accelerated(*accelerated_layout(lam, x, h0)).transpose(1, 2)
    return float((theirs - ours).abs().max() / ours.abs().max())


def sweep(shapes: list[tuple[int, int, int]], tilings: list[str]) -> list[dict]:
    """Our forward and forward + backward per tiling (chunk x block x warps) at every shape."""
    from lru_online.linear_scan import triton_backend

    print("sweep: ours per tiling (ms, medians)")
    print("".join(f"{h:>14}" for h in ("B", "N", "T", "tiling", "fwd", "f+b")))
    rows = []
    for batch, channels, length in shapes:
        lam, x, h0 = inputs(batch, channels, length)
        for text in tilings:
            kernel = triton_backend.with_tiling(parse_tiling(text))
            row = {"B": batch, "N": channels, "T": length, "tiling": text,
                   "forward_ms": median_ms(ours_forward(lam, x, h0, kernel)),
                   "forward_backward_ms": median_ms(ours_forward_backward(lam, x, h0, kernel))}  # fmt: skip
            rows.append(row)
            print_row(list(row.values()))
        del lam, x, h0
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES)
    parser.add_argument("--tiling", default=None, help="chunk x block x warps for our kernel, e.g. 16x256x4")
    parser.add_argument("--sweep", default=None, help="tilings to time first, comma-separated")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/scan_gpu.py needs a CUDA GPU; this machine has none")
    from dataclasses import replace

    from lru_online.linear_scan import dispatch, triton_backend

    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["sweep"] = sweep(shapes, args.sweep.split(",")) if args.sweep else []
    kernel = "triton"
    if args.tiling:
        # The chosen tiling under its own name, so the model's layers can ask for it too.
        tiling = parse_tiling(args.tiling)
        kernel = "triton-" + args.tiling
        dispatch.register_backend(replace(triton_backend.with_tiling(tiling), name=kernel))
        report["tiling"] = vars(tiling)
    else:
        report["tiling"] = {f"N={n}": vars(triton_backend.tiling_for(n)) for n in sorted({s[1] for s in shapes})}
    bandwidth = report["copy_bandwidth"] = copy_bandwidth()
    print(f"{report['device']}, torch {torch.__version__}; copy bandwidth {bandwidth / 1e12:.2f} TB/s; "
          f"our tiling {report['tiling']}")  # fmt: skip
    header = ("B", "N", "T", "floor", "ours fwd", "ours f+b", "ours TB/s", "step loop",
              "acc-scan fwd", "acc-scan f+b", "hgrn fwd", "acc-scan diff")  # fmt: skip
    print("".join(f"{h:>14}" for h in header))
    print("(ms, medians; TB/s: our forward at 16 B/element; acc-scan diff: max |theirs - ours| / max |ours|)")
    rows = report["shapes"] = []
    for batch, channels, length in shapes:
        lam, x, h0 = inputs(batch, channels, length)
        forward_ms = median_ms(ours_forward(lam, x, h0, kernel))
        row = {
            "B": batch,
            "N": channels,
            "T": length,
            "floor_ms": 1e3 * FLOOR_BYTES * x.numel() / bandwidth,
            "ours_forward_ms": forward_ms,
            "ours_forward_backward_ms": median_ms(ours_forward_backward(lam, x, h0, kernel)),
            "ours_forward_tb_per_s": FLOOR_BYTES * x.numel() / (forward_ms / 1e3) / 1e12,
            "step_loop_ms": step_loop_ms(lam, x, h0),
            "accelerated_scan_ms": peer_ms(partial(peer_accelerated_scan, lam, x, h0)),
            "accelerated_scan_forward_backward_ms": peer_ms(partial(peer_accelerated_scan_backward, lam, x, h0)),
            "chunk_hgrn_ms": peer_ms(partial(peer_chunk_hgrn, lam, x, h0)),
            "accelerated_scan_disagreement": accelerated_disagreement(lam, x, h0),
        }
        rows.append(row)
        print_row(list(row.values()))
        del lam, x, h0
        torch.cuda.empty_cache()
    ours_ms = report["training_step_ms"] = median_ms(training_step(kernel))
    with mock.patch("lru_online.layer.scan", scan_on_accelerated):
        peer = report["training_step_accelerated_scan_ms"] = peer_ms(training_step)
    peer_text = f"{peer:.2f}" if isinstance(peer, float) else peer
    print(f"training step, LRU 4 blocks d_model 256 N 256, B 16 T 4096 (ms, median): ours {ours_ms:.2f}, "
          f"on accelerated-scan {peer_text}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
