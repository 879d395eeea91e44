"""Prefect flows and deployments (the only Prefect code), the per-file driver that takes each
landed file through the model step and its commit, the execution of per-line work in the driver
or on Dask workers, and the `lru-online` command line."""
