"""The expectation suite of a log batch: generated from the log schema into the work folder's
Great Expectations project (`<workdir>/gx`, a file data context), read from there by every run.

The file is the user's to read and tighten (a physical range, a missing-value share); a run never
overwrites it. `lru-online validation init --force` regenerates it after a schema change.

Checks that need more than one column or the clock are computed into helper columns before
GE sees the batch, and the suite expects them to be true: timestamps in order within a line,
one time-zone convention per file, labels 0, 1 or empty, and no timestamp further ahead of
the clock than `log_schema.max_future_seconds`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from flows.log_schema import LogSchema

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

SUITE_NAME = "log_batch"
ORDER_COLUMN = "__timestamp_in_order"
ZONE_COLUMN = "__timestamp_zone_consistent"
FUTURE_COLUMN = "__timestamp_not_in_future"
LABEL_PREFIX = "__label_valid_"
NUMERIC_TYPES = ["int8", "int16", "int32", "int64", "float16", "float32", "float64", "Int64", "Float64"]


class SuiteExists(FileExistsError):
    pass


def gx_project(workdir: Path) -> Path:
    """The Great Expectations project folder of a work folder."""
    return workdir / "gx"


def suite_path(workdir: Path) -> Path:
    return gx_project(workdir) / "expectations" / f"{SUITE_NAME}.json"


def schema_fingerprint(schema: LogSchema) -> str:
    return hashlib.sha256(schema.model_dump_json().encode()).hexdigest()[:16]


def file_context(workdir: Path):
    """The work folder's GE file data context (created on first use), progress bars off."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="file", project_root_dir=str(workdir))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def suite_from_schema(schema: LogSchema):
    """The expectations a log batch of `schema` must meet, each with a note saying why."""
    import great_expectations as gx

    ex = gx.expectations
    entity, ts = schema.entity_column, schema.timestamp_column
    expectations = [
        ex.ExpectColumnToExist(column=column, notes="a column of the log schema")
        for column in [entity, ts, *schema.sensor_names]
    ]
    expectations += [
        ex.ExpectColumnValuesToNotBeNull(column=entity, notes="every row names its line"),
        ex.ExpectColumnValuesToNotBeNull(column=ts, notes="every row has a timestamp that parses"),
        ex.ExpectColumnValuesToBeInSet(
            column=FUTURE_COLUMN,
            value_set=[True],
            notes=f"helper: '{ts}' at most log_schema.max_future_seconds ahead of the clock at validation",
        ),
        ex.ExpectColumnValuesToBeInSet(
            column=ORDER_COLUMN, value_set=[True], notes=f"helper: '{ts}' does not go backwards within a line"
        ),
        ex.ExpectColumnValuesToBeInSet(
            column=ZONE_COLUMN, value_set=[True], notes=f"helper: '{ts}' values are all naive or all zoned"
        ),
        ex.ExpectCompoundColumnsToBeUnique(column_list=[entity, ts], notes="one reading per line and time"),
    ]
    for label in schema.label_columns:
        expectations.append(
            ex.ExpectColumnValuesToBeInSet(
                column=LABEL_PREFIX + label, value_set=[True], notes=f"helper: label '{label}' is 0, 1 or empty"
            )
        )
    for sensor in schema.sensors:
        unit = f" {sensor.unit}" if sensor.unit else ""
        expectations += [
            ex.ExpectColumnValuesToBeInTypeList(
                column=sensor.name, type_list=NUMERIC_TYPES, notes="readings are numbers"
            ),
            ex.ExpectColumnValuesToNotBeNull(
                column=sensor.name,
                mostly=1.0 - sensor.max_null_fraction,
                notes=f"at most {sensor.max_null_fraction:.0%} of '{sensor.name}' missing",
            ),
            ex.ExpectColumnValuesToBeBetween(
                column=sensor.name,
                min_value=sensor.min,
                max_value=sensor.max,
                notes=f"the physical range of '{sensor.name}'{unit}",
            ),
        ]
    return gx.ExpectationSuite(
        name=SUITE_NAME,
        expectations=expectations,
        meta={"generated_by": "lru-online validation init", "log_schema": schema_fingerprint(schema)},
    )


def write_suite(workdir: Path, schema: LogSchema, replace: bool = False) -> Path:
    """Generates the suite from `schema` into the work folder's GE project; an existing suite
    (perhaps edited by hand) is replaced only when asked."""
    path = suite_path(workdir)
    if path.exists() and not replace:
        raise SuiteExists(f"{path} exists (edits in it would be lost): regenerate it with --force")
    path.unlink(missing_ok=True)
    file_context(workdir).suites.add(suite_from_schema(schema))
    return path


def ensure_suite(workdir: Path, schema: LogSchema) -> Path:
    """The suite file, generated from `schema` when the work folder has none yet (under a lock:
    two first runs may start at once)."""
    import fcntl

    path = suite_path(workdir)
    if path.exists():
        return path
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / ".gx-init.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            write_suite(workdir, schema)
    return path


def load_suite(path: Path):
    """The suite as stored in `path` (GE's JSON), for an ephemeral context to run."""
    from great_expectations.core.expectation_suite import ExpectationSuite, expectationSuiteSchema

    try:
        return ExpectationSuite(**expectationSuiteSchema.loads(path.read_text()))
    except Exception as error:
        raise ValueError(f"{path}: not a readable expectation suite ({error})") from error


def generated_from_other_schema(path: Path, schema: LogSchema) -> bool:
    """Whether the suite was generated from another log schema (or written by hand)."""
    return load_suite(path).meta.get("log_schema") != schema_fingerprint(schema)
