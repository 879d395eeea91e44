"""`scan(lam, x, h0)`: argument checks, backend choice and the custom autograd rule.

Backends compute only the forward states and, where they have one, a fused adjoint. The
backward pass is the reverse scan a_t = g_t + conj(lam_{t+1}) a_{t+1}; from it
grad_x = a, grad_h0 = conj(lam_0) a_0 and grad_lam_t = a_t conj(h_{t-1}) (summed over batch
and time when lam is time-invariant).
"""

from __future__ import annotations

import torch

from lru_online.linear_scan import chunked, cpu
from lru_online.linear_scan.backend import ForwardFn, ScanBackend, grad_h0
from lru_online.linear_scan.reference import reference_scan

_BACKENDS: dict[str, ScanBackend] = {}


def register_backend(backend: ScanBackend) -> None:
    """Plugs a backend in (the GPU kernel registers itself here when Triton is present)."""
    _BACKENDS[backend.name] = backend


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    device_type = torch.device(device).type
    _load_gpu_backend(device_type)
    names = [name for name, b in _BACKENDS.items() if device_type in b.devices]
    return ["reference", *names]


def _default_backend(device_type: str, dtype: torch.dtype) -> str:
    """The fastest backend for the device that computes in dtype (Triton: complex64 only)."""
    _load_gpu_backend(device_type)
    preferred = _BACKENDS.get({"cpu": "cpu", "cuda": "triton"}.get(device_type, ""))
    if preferred is not None and dtype in preferred.dtypes:
        return preferred.name
    return "chunked"


def _load_gpu_backend(device_type: str) -> None:
    if device_type != "cuda" or "triton" in _BACKENDS:
        return
    try:
        from lru_online.linear_scan import triton_backend
    except ImportError:
        return
    register_backend(triton_backend.BACKEND)


def _adjoint_from_forward(
    forward: ForwardFn,
    lam: torch.Tensor,
    h: torch.Tensor,
    h0: torch.Tensor | None,
    grad_h: torch.Tensor,
    grad_last: torch.Tensor | None,
    need_lam: bool,
    need_h0: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The backward pass of a backend that has no fused one: its own forward on reversed time."""
    time_varying = lam.dim() == 3
    grad_reversed = grad_h.flip(1)
    if grad_last is not None:
        grad_reversed[:, 0] += grad_last
    if time_varying:
        # Step k of the reversed scan multiplies by conj(lam_{T-k}); step 0 starts from zero.
        decay = torch.cat([torch.ones_like(lam[:, :1]), lam[:, 1:].conj().flip(1)], dim=1)
    else:
        decay = lam.conj()
    adjoint = forward(decay.contiguous(), grad_reversed, None).flip(1)
    return gradients_from_adjoint(lam, h, h0, adjoint, need_lam, need_h0)


def gradients_from_adjoint(
    lam: torch.Tensor,
    h: torch.Tensor,
    h0: torch.Tensor | None,
    adjoint: torch.Tensor,
    need_lam: bool,
    need_h0: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(grad_x, grad_lam, grad_h0) from the adjoint a: grad_x = a, grad_h0 = conj(lam_0) a_0,
    grad_lam_t = a_t conj(h_{t-1}), summed over batch and time for a time-invariant lam."""
    time_varying = lam.dim() == 3
    grad_lam = None
    if need_lam:
        start = h0 if h0 is not None else torch.zeros_like(h[:, 0])
        previous = torch.cat([start.unsqueeze(1), h[:, :-1]], dim=1)
        if time_varying:
            grad_lam = adjoint * previous.conj()
        else:
            grad_lam = torch.einsum("btn,btn->n", adjoint, previous.conj())
    return adjoint, grad_lam, grad_h0(lam, adjoint) if need_h0 else None


class _ScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: ScanBackend, lam, x, h0):  # type: ignore[override]
        h = backend.forward(lam, x, h0)
        ctx.backend = backend
        ctx.save_for_backward(lam, h, h0)
        return h, h[:, -1].clone()

    @staticmethod
    def backward(ctx, grad_h, grad_last):  # type: ignore[override]
        lam, h, h0 = ctx.saved_tensors
        backend: ScanBackend = ctx.backend
        _, need_lam, _, need_h0 = ctx.needs_input_grad
        args = (lam, h, h0, grad_h.contiguous(), grad_last.contiguous(), need_lam, need_h0)
        if backend.backward is not None:
            grad_x, grad_lam, grad_h0 = backend.backward(*args)
        else:
            grad_x, grad_lam, grad_h0 = _adjoint_from_forward(backend.forward, *args)
        return None, grad_lam, grad_x, grad_h0


def _check(lam: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"scan: x must be a (B, T, N) tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in (torch.complex64, torch.complex128):
        raise TypeError(f"scan: x must be complex64 or complex128, got {x.dtype}")
    batch, length, channels = x.shape
    if length < 1:
        raise ValueError("scan: x has T = 0 time steps; the scan needs at least one")
    if lam.dtype != x.dtype:
        raise TypeError(f"scan: lam has dtype {lam.dtype} but x has {x.dtype}; they must match")
    if tuple(lam.shape) not in ((channels,), (batch, length, channels)):
        raise ValueError(
            f"scan: lam must have shape (N,) = ({channels},) or (B, T, N) = "
            f"{(batch, length, channels)}, got {tuple(lam.shape)}"
        )
    if lam.device != x.device:
        raise ValueError(f"scan: lam is on {lam.device} but x is on {x.device}")
    if h0 is not None:
        if tuple(h0.shape) != (batch, channels):
            raise ValueError(f"scan: h0 must have shape (B, N) = {(batch, channels)}, got {tuple(h0.shape)}")
        if h0.dtype != x.dtype or h0.device != x.device:
            raise TypeError(f"scan: h0 must be {x.dtype} on {x.device}, got {h0.dtype} on {h0.device}")


def scan(
    lam: torch.Tensor,
    x: torch.Tensor,
    h0: torch.Tensor | None = None,
    *,
    backend: str | ScanBackend | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solves h_t = lam_t * h_{t-1} + x_t for all t.

    Args:
        lam: complex (N,) time-invariant decay, or (B, T, N) per-step decay.
        x: complex (B, T, N) inputs, T >= 1.
        h0: complex (B, N) state before the first step; zeros when None.
        backend: force "reference", "chunked", "cpu" or "triton", or hand in a ScanBackend
            (the Triton kernel with another tiling, say: `triton_backend.with_tiling`); by
            default the fastest backend for x's device.

    Returns:
        All states (B, T, N) and the last state (B, N), differentiable in lam, x and h0.
    """
    _check(lam, x, h0)
    if isinstance(backend, ScanBackend):
        chosen, name = backend, backend.name
    else:
        name = backend or _default_backend(x.device.type, x.dtype)
        if name == "reference":
            return reference_scan(lam, x, h0)
        _load_gpu_backend(x.device.type)
        chosen = _BACKENDS.get(name)
    if chosen is None:
        raise ValueError(f"scan: unknown or unavailable backend {name!r}; have {available_backends(x.device)}")
    if x.device.type not in chosen.devices:
        raise ValueError(f"scan: backend {name!r} does not run on {x.device.type} tensors")
    if x.dtype not in chosen.dtypes:
        raise TypeError(f"scan: backend {name!r} does not compute in {x.dtype}")
    h0 = h0.contiguous() if h0 is not None else None
    return _ScanFunction.apply(chosen, lam.contiguous(), x.contiguous(), h0)


register_backend(
    ScanBackend(
        name="chunked",
        forward=chunked.chunked_forward,
        backward=None,
        devices=frozenset({"cpu", "cuda", "mps", "xpu"}),
    )
)
if cpu.is_available():
    register_backend(
        ScanBackend(
            name="cpu",
            forward=cpu.cpu_forward,
            backward=cpu.cpu_backward,
            devices=frozenset({"cpu"}),
        )
    )
