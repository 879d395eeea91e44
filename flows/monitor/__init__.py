"""What the pipeline watches and reports: drift statistics (PSI, KS) and each line's detectors,
drift reports, the MLflow adapter (runs, metrics per committed file, registry and aliases) and
the accounting of a work folder."""
