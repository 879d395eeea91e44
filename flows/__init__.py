"""The pipeline around the core: files land, are validated, learned from, watched, and the
whole is orchestrated by Prefect.

    ingest/       landing files: discovery, reading, Great Expectations validation, the simulator
    storage/      the pipeline's own database: tables, migrations, the ledger, carried line states
    model/        the fleet model's life: building, the per-file step, initial training, retraining
    monitor/      what is watched and reported: drift statistics and detectors, MLflow, status
    orchestrate/  Prefect flows and deployments, the per-file driver, Dask, the command line

Imports go down that list only (orchestrate uses everything, ingest only the settings); Prefect
is imported in orchestrate alone. `settings.py` is the one typed configuration of all of it;
`log_schema.py`, its part that says what a log file holds, stands alone so that reading and
validating files needs no torch.
"""
