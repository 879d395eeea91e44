"""Real services for the `servers` profile, started on this machine (see services.py)."""
