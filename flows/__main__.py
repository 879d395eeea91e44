"""`python -m flows ...` is `lru-online ...`."""

from flows.cli import app

app()
