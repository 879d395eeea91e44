"""Validation results of quarantined files in the work folder's GE project, with Data Docs.

The driver stores each failing result through GE's validation results store (JSON under
`gx/uncommitted/validations/`) and builds its Data Docs page (`gx/uncommitted/data_docs/local_site/`):
the file's failed expectations, their unexpected values and rows. Only the newest `keep` results
are kept; older results and their pages are removed, so the folder stays bounded.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from flows.ingest.expectations import file_context, gx_project

SITE = "local_site"


def docs_site(workdir: Path) -> Path:
    return gx_project(workdir) / "uncommitted" / "data_docs" / SITE


class ValidationDocs:
    """Stores failing validation results and builds their pages; one per driver process."""

    def __init__(self, workdir: Path, keep: int) -> None:
        self.workdir, self.keep = workdir, keep
        self._context = None

    @property
    def context(self):
        if self._context is None:
            self._context = file_context(self.workdir)
        return self._context

    def record(self, result) -> Path:
        """Stores `result` (a failing ExpectationSuiteValidationResult), drops the oldest beyond
        `keep`, builds the result's page and the index; returns the page."""
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
            ValidationResultIdentifier,
        )

        key = ValidationResultIdentifier(
            expectation_suite_identifier=ExpectationSuiteIdentifier(name=result.suite_name),
            run_id=result.meta["run_id"],
            batch_identifier=result.meta.get("active_batch_definition", {}).get("data_asset_name", "log_batch"),
        )
        store = self.context.validation_results_store
        store.set(key, result)
        self._drop_oldest(store)
        self.context.build_data_docs(site_names=[SITE], resource_identifiers=[key])
        return self.page(key)

    def page(self, key) -> Path:
        (site,) = self.context.get_docs_sites_urls(resource_identifier=key, site_name=SITE)
        return Path(unquote(urlparse(site["site_url"]).path))

    def _drop_oldest(self, store) -> None:
        keys = sorted(store.list_keys(), key=lambda k: k.run_id.run_time)
        for old in keys[: max(0, len(keys) - self.keep)]:
            self.page(old).unlink(missing_ok=True)
            store.remove_key(old)
