"""The Linear Recurrent Unit of Orvieto et al. 2023 (arXiv 2303.06349).

h_t = Λ h_{t-1} + exp(γ_log) ⊙ (B u_t),   y_t = Re(C h_t) + D ⊙ u_t,
Λ = diag(exp(-exp(ν_log) + i·exp(θ_log))), so |λ| = exp(-exp(ν_log)) < 1 for every parameter
value. With irregular sampling a step of length Δt decays by Λ^Δt = exp(Δt · log Λ).

A step mask (B, T) marks the real events of right-padded sequences of different lengths: at a
masked step the state decays by 1 and takes no input, so it leaves the step as it entered and a
line's last state is its state at its own last event.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lru_online.linear_scan import scan

# Λ^Δt per distinct spacing (`LRU.decay`) from this many steps on, where there are at least
# this many steps per distinct spacing (a sort of the steps is the price).
REPEATED_SPACINGS_MIN_STEPS = 1024
STEPS_PER_DISTINCT_SPACING = 8


class LRU(nn.Module):
    """One LRU layer mapping (B, T, H) to (B, T, H) through a complex diagonal state of size N."""

    def __init__(
        self,
        d_model: int,
        d_state: int,
        r_min: float = 0.0,
        r_max: float = 1.0,
        max_phase: float = 2 * math.pi,
        scan_backend: str | None = None,
        readout: bool = True,
    ) -> None:
        """readout=False builds the recurrence alone (no C, D), for a caller that reads out the
        states itself through `states` and `next_state`."""
        super().__init__()
        if not 0.0 <= r_min < r_max <= 1.0:
            raise ValueError(f"LRU ring needs 0 <= r_min < r_max <= 1, got r_min={r_min}, r_max={r_max}")
        if max_phase <= 0:
            raise ValueError(f"LRU max_phase must be positive, got {max_phase}")
        self.d_model = d_model
        self.d_state = d_state
        self.scan_backend = scan_backend
        self.has_readout = readout

        # Ring initialisation: |λ|² uniform on [r_min², r_max²], phase uniform on [0, max_phase].
        u1 = torch.rand(d_state)
        u2 = torch.rand(d_state)
        radius_sq = u1 * (r_max**2 - r_min**2) + r_min**2
        nu = -0.5 * torch.log(radius_sq.clamp_min(1e-30))
        self.nu_log = nn.Parameter(torch.log(nu.clamp_min(1e-30)))
        self.theta_log = nn.Parameter(torch.log((max_phase * u2).clamp_min(1e-30)))
        modulus = torch.exp(-torch.exp(self.nu_log.detach()))
        self.gamma_log = nn.Parameter(torch.log(torch.sqrt(1 - modulus**2)))

        self.B_re = nn.Parameter(torch.randn(d_state, d_model) / math.sqrt(2 * d_model))
        self.B_im = nn.Parameter(torch.randn(d_state, d_model) / math.sqrt(2 * d_model))
        if readout:
            self.C_re = nn.Parameter(torch.randn(d_model, d_state) / math.sqrt(d_state))
            self.C_im = nn.Parameter(torch.randn(d_model, d_state) / math.sqrt(d_state))
            self.D = nn.Parameter(torch.randn(d_model))

    @property
    def state_dtype(self) -> torch.dtype:
        return torch.complex128 if self.nu_log.dtype == torch.float64 else torch.complex64

    def decay(self, dt: torch.Tensor | None = None) -> torch.Tensor:
        """Λ as (N,), or Λ^Δt as (B, T, N) (or (B, N) for a single step) when dt is given.

        Built as modulus and angle, exp(-Δt·ν) e^{iΔt·θ}: on CPU a complex exp of a (B, T, N)
        tensor costs about four times as much.
        """
        nu, theta = torch.exp(self.nu_log), torch.exp(self.theta_log)
        if dt is None:
            return torch.polar(torch.exp(-nu), theta)
        steps = dt.to(self.nu_log.dtype)
        if steps.device.type == "cpu" and steps.numel() >= REPEATED_SPACINGS_MIN_STEPS:
            # Logged times are rounded (to 0.1 s, to the second), so a file's spacings repeat:
            # Λ^Δt for each distinct Δt, then read out per step, costs a third of the exp and
            # polar over (B, T, N) (forward and backward) on CPU and gives the same values (the
            # gradients summed per spacing first: equal to rounding). Not on a GPU, where the
            # elementwise ops are cheap and unique's size waits for the device.
            spacings, which = torch.unique(steps, return_inverse=True)
            if spacings.numel() * STEPS_PER_DISTINCT_SPACING <= steps.numel():
                return self._powers(spacings, nu, theta)[which]
        return self._powers(steps, nu, theta)

    @staticmethod
    def _powers(steps: torch.Tensor, nu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Λ^Δt, (..., N), for Δt (...)."""
        steps = steps.unsqueeze(-1)
        return torch.polar(torch.exp(-steps * nu), steps * theta)

    def input_drive(self, u: torch.Tensor) -> torch.Tensor:
        """exp(γ_log) ⊙ (B u), complex (..., N)."""
        # One matmul into interleaved (real, imaginary) pairs, read as complex without a copy.
        scale = torch.exp(self.gamma_log)[:, None, None]
        weights = (torch.stack([self.B_re, self.B_im], dim=1) * scale).flatten(0, 1)  # (2N, H)
        drive = u @ weights.T
        return torch.view_as_complex(drive.unflatten(-1, (self.d_state, 2)))

    def readout(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Re(C h) + D ⊙ u."""
        if not self.has_readout:
            raise RuntimeError("this LRU was built with readout=False: read its states out yourself")
        # Re(C h) = C_re h_re − C_im h_im as one matmul over h's interleaved (real, imaginary)
        # pairs: h.real and h.imag are strided views, each a copy before a matmul.
        weights = torch.stack([self.C_re, -self.C_im], dim=-1).flatten(-2)  # (H, 2N)
        return torch.view_as_real(h).flatten(-2) @ weights.T + self.D * u

    def zero_state(self, batch: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.zeros(batch, self.d_state, dtype=self.state_dtype, device=device)

    def states(
        self,
        u: torch.Tensor,
        h0: torch.Tensor | None = None,
        dt: torch.Tensor | None = None,
        steps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every state h_t (B, T, N) of the sequence u (B, T, H), and the last one (B, N).

        steps: optional (B, T) bool, False at padding, where the state is carried unchanged.
        """
        drive = self.input_drive(u)
        if steps is not None:
            drive = drive.masked_fill(~steps.unsqueeze(-1), 0)
            if dt is None:  # Λ where a step is real, 1 where it is padding
                dt = steps.to(self.nu_log.dtype)
            else:
                dt = dt.masked_fill(~steps, 0)  # Λ^0 = 1
        if dt is not None:
            flat = dt.reshape(-1)
            if flat.numel() and bool((flat == flat[0]).all()):
                # Evenly spaced rows and no padding (a plant's file, typically): one Λ^Δt, (N,),
                # for every step instead of a (B, T, N) tensor of the same values.
                return scan(self.decay(flat[0]), drive, h0, backend=self.scan_backend)
        return scan(self.decay(dt), drive, h0, backend=self.scan_backend)

    def next_state(self, u_t: torch.Tensor, h: torch.Tensor, dt_t: torch.Tensor | None = None) -> torch.Tensor:
        """The state after one event u_t (B, H) from h (B, N)."""
        return self.decay(dt_t) * h + self.input_drive(u_t)

    def forward(
        self,
        u: torch.Tensor,
        h0: torch.Tensor | None = None,
        dt: torch.Tensor | None = None,
        steps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """u: (B, T, H); h0: (B, N) complex; dt: optional (B, T) step lengths; steps: optional
        (B, T) bool, False at padding.

        Returns y (B, T, H) and the last state (B, N).
        """
        h, h_last = self.states(u, h0, dt, steps)
        return self.readout(h, u), h_last

    def step(
        self, u_t: torch.Tensor, h: torch.Tensor, dt_t: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One event: u_t (B, H), h (B, N), dt_t optional (B,). Returns y_t and the new state."""
        h_new = self.next_state(u_t, h, dt_t)
        return self.readout(h_new, u_t), h_new
