"""The linear-recurrence scan h_t = lam_t * h_{t-1} + x_t, behind one entry point."""

from lru_online.linear_scan.dispatch import available_backends, scan

__all__ = ["available_backends", "scan"]
