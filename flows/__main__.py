"""`python -m flows ...` is `lru-online ...`."""

from flows.orchestrate.cli import app

app()
