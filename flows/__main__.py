"""`python -m flows ...` is `lru-online ...`."""

from flows.orchestrate.cli import main

# A spawned helper process (the drift report writer) imports this module again under another
# name: only the real entry point runs the command line.
if __name__ == "__main__":
    main()
