"""The expectation suite as a file of the work folder's GE project, and the stored results and
Data Docs pages of quarantined files. Real GE file contexts, a real pipeline and ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from flows.ingest.expectations import SUITE_NAME, suite_from_schema, suite_path
from flows.ingest.validation import BatchValidator
from flows.ingest.validation_docs import ValidationDocs, docs_site
from flows.orchestrate.cli import app
from flows.orchestrate.pipeline import Pipeline
from flows.storage.models import BatchStatus
from tests.flows.helpers import small_config, small_plant


def test_init_writes_the_suite_from_the_schema_and_keeps_an_edited_one(tmp_path):
    settings, config = small_config(tmp_path)
    runner = CliRunner()
    written = runner.invoke(app, ["validation", "init", "-c", config])
    assert written.exit_code == 0, written.output
    path = suite_path(settings.workdir)
    assert path == settings.workdir / "gx" / "expectations" / f"{SUITE_NAME}.json" and path.exists()
    stored = json.loads(path.read_text())
    ranges = {
        e["kwargs"]["column"]: (e["kwargs"]["min_value"], e["kwargs"]["max_value"])
        for e in stored["expectations"]
        if e["type"] == "expect_column_values_to_be_between"
    }
    assert ranges == {s.name: (s.min, s.max) for s in settings.log_schema.sensors}

    _set_range(path, "temperature", maximum=90.0)
    refused = runner.invoke(app, ["validation", "init", "-c", config])
    assert refused.exit_code == 1 and "--force" in refused.output
    assert _range(path, "temperature") == (-20.0, 90.0)  # the user's edit survives

    shown = runner.invoke(app, ["validation", "show", "-c", config])
    assert "max_value=90.0" in shown.output and str(path) in shown.output

    forced = runner.invoke(app, ["validation", "init", "-c", config, "--force"])
    assert forced.exit_code == 0 and _range(path, "temperature") == (-20.0, 150.0)


def test_a_tighter_range_in_the_suite_file_quarantines_a_file_that_passed(tmp_path):
    settings, _ = small_config(tmp_path)
    small_plant(settings, entities=1, batches=2, rows_per_batch=100, broken_batches={})
    pipeline = Pipeline(settings)
    try:
        assert pipeline.suite_file.exists()  # the first pipeline of a work folder writes it
        pipeline.discover()
        batch = pipeline.ledger.get(pipeline.ledger.pending()[0])
        rows, quarantined = pipeline.read_and_validate(batch)
        assert rows is not None and quarantined is None
        hottest = float(rows["temperature"].max())
        too_hot = int((rows["temperature"] > hottest - 1.0).sum())

        _set_range(pipeline.suite_file, "temperature", maximum=hottest - 1.0)  # as a user would
        rows, quarantined = pipeline.read_and_validate(batch)
        assert rows is None and quarantined.status == BatchStatus.QUARANTINED
        (reason,) = quarantined.reasons
        assert f"{too_hot} of 100 values outside the physical range [-20.0, {hottest - 1.0}]" in reason

        page = settings.workdir / "gx" / "uncommitted" / "data_docs" / "local_site"
        assert quarantined.validation_page.startswith(
            str(page / "validations" / SUITE_NAME / batch.source_file.split("/")[-1])
        )
        html = Path(quarantined.validation_page).read_text()
        assert "temperature" in html and f"{hottest - 1.0}" in html and "Failed" in html
        accounting = pipeline.ledger.accounting()
        (listed,) = accounting["quarantined_files"]
        assert listed["validation_page"] == quarantined.validation_page
        assert (docs_site(settings.workdir) / "index.html").exists()
    finally:
        pipeline.close()


def test_stored_results_and_pages_are_kept_to_the_newest(tmp_path):
    settings, _ = small_config(tmp_path)
    validator = BatchValidator(settings.log_schema, suite_from_schema(settings.log_schema))
    docs = ValidationDocs(settings.workdir, keep=2)
    pages = []
    for index in range(3):
        frame = pd.DataFrame({"entity": ["line-1"], "timestamp": [f"2026-01-0{index + 1}T00:00:00Z"]})
        outcome = validator.validate(frame, f"broken-{index}.csv")  # every sensor column is missing
        assert not outcome.success
        pages.append(docs.record(outcome.result))
    stored = sorted(
        p.parent.parent.name for p in (settings.workdir / "gx" / "uncommitted" / "validations").rglob("*.json")
    )
    assert stored == ["broken-1.csv", "broken-2.csv"]
    assert not pages[0].exists() and pages[1].exists() and pages[2].exists()
    assert "broken-0.csv" not in (docs_site(settings.workdir) / "index.html").read_text()


def _expectation(path, column: str) -> tuple[dict, dict]:
    suite = json.loads(path.read_text())
    (found,) = [
        e
        for e in suite["expectations"]
        if e["type"] == "expect_column_values_to_be_between" and e["kwargs"]["column"] == column
    ]
    return suite, found


def _range(path, column: str) -> tuple[float, float]:
    _, found = _expectation(path, column)
    return found["kwargs"]["min_value"], found["kwargs"]["max_value"]


def _set_range(path, column: str, maximum: float) -> None:
    suite, found = _expectation(path, column)
    found["kwargs"]["max_value"] = maximum
    path.write_text(json.dumps(suite, indent=2))
