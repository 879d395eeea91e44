"""Great Expectations validation of a log batch against the work folder's expectation suite
(`flows.ingest.expectations`: generated from the log schema, edited by the user at will).

Validation runs on an in-memory (ephemeral) context, so Dask workers never write to the work
folder; the result of a failing batch travels back with its outcome and the driver stores it in
the work folder's GE project (`flows.ingest.validation_docs`). A failure names the file, the
column and the rows.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from flows.ingest.expectations import FUTURE_COLUMN, LABEL_PREFIX, ORDER_COLUMN, ZONE_COLUMN, load_suite
from flows.settings import LogSchema

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

_ZONED = r"(?:Z|[+-]\d{2}:?\d{2})$"
SAMPLE_ROWS = 5


@dataclass
class ValidationOutcome:
    success: bool
    reasons: list[str] = field(default_factory=list)
    sample_rows: list[dict] = field(default_factory=list)
    frame: pd.DataFrame | None = None  # parsed timestamps, sorted by entity and time, on success
    result: object | None = None  # GE's ExpectationSuiteValidationResult of a failure, for its store


def parse_timestamps(values: pd.Series) -> pd.Series:
    """UTC timestamps; naive ones are taken as UTC, unparseable ones become NaT."""
    if pd.api.types.is_datetime64_any_dtype(values):
        parsed = values
    else:
        parsed = pd.to_datetime(values.astype("string").str.strip(), utc=True, errors="coerce", format="ISO8601")
    if getattr(parsed.dt, "tz", None) is None:
        return parsed.dt.tz_localize("UTC")
    return parsed.dt.tz_convert("UTC")


class BatchValidator:
    """Runs one expectation suite on log batches of one schema."""

    def __init__(self, schema: LogSchema, suite) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.schema = schema
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        asset = context.data_sources.add_pandas("landing").add_dataframe_asset(name="log_batch")
        self._batch_definition = asset.add_batch_definition_whole_dataframe("whole_batch")
        self._suite = context.suites.add(suite)

    def _run(self, prepared: pd.DataFrame, result_format: str, file_name: str):
        from great_expectations.core.run_identifier import RunIdentifier

        # Batch.validate, not a ValidationDefinition: nothing goes through the context's result
        # store (serialising every result cost a sixth of a validation); the driver stores the
        # failures it keeps (flows.ingest.validation_docs), under the run id set here.
        batch = self._batch_definition.get_batch(batch_parameters={"dataframe": prepared})
        result = batch.validate(self._suite, result_format={"result_format": result_format})
        run_id = RunIdentifier(run_name=file_name, run_time=datetime.now(UTC))
        result.meta.update({"run_id": run_id, "validation_time": run_id.run_time})
        return result

    def _prepared(self, frame: pd.DataFrame) -> pd.DataFrame:
        schema = self.schema
        prepared = frame.copy()
        prepared[ZONE_COLUMN] = True
        if schema.timestamp_column in prepared:
            raw = prepared[schema.timestamp_column]
            if not pd.api.types.is_datetime64_any_dtype(raw):
                # Naive times are taken as UTC, but naive and zoned times in one batch mean
                # two clocks were mixed: the minority is flagged.
                zoned = raw.astype("string").str.strip().str.contains(_ZONED, regex=True).fillna(True)
                prepared[ZONE_COLUMN] = zoned == (zoned.mean() >= 0.5)
            prepared[schema.timestamp_column] = parse_timestamps(raw)
            latest = pd.Timestamp.now(tz="UTC") + pd.Timedelta(seconds=schema.max_future_seconds)
            prepared[FUTURE_COLUMN] = ~(prepared[schema.timestamp_column] > latest)
        else:
            prepared[FUTURE_COLUMN] = True
        if schema.entity_column in prepared and schema.timestamp_column in prepared:
            previous = prepared.groupby(schema.entity_column, sort=False)[schema.timestamp_column].shift()
            current = prepared[schema.timestamp_column]
            prepared[ORDER_COLUMN] = ~(previous.notna() & current.notna() & (current < previous))
        else:
            prepared[ORDER_COLUMN] = True
        for label in schema.label_columns:
            # A label is 0, 1 or empty; numbers as text ("1", "0.0") count as numbers. Valid
            # columns go on as numbers, so "1" and 1 are one label downstream.
            if label not in prepared:
                prepared[LABEL_PREFIX + label] = True
                continue
            raw = prepared[label]
            numbers = pd.to_numeric(raw, errors="coerce")
            prepared[LABEL_PREFIX + label] = raw.isna() | numbers.isin([0, 1])
            prepared[label] = numbers
        return prepared

    def validate(self, frame: pd.DataFrame, file_name: str, row_offset: int = 0) -> ValidationOutcome:
        """Validates one part of a file; `row_offset` is the number of data rows before it, so
        reasons name rows as they are numbered in the file."""
        prepared = self._prepared(frame)
        # A pass/fail run costs about half of a detailed one; details only for failures.
        result = self._run(prepared, "BOOLEAN_ONLY", file_name)
        if not result.success:
            result = self._run(prepared, "COMPLETE", file_name)
        missing = {c for c in [self.schema.entity_column, self.schema.timestamp_column, *self.schema.sensor_names]}
        missing -= set(prepared.columns)
        # A text column fails its range check too, without counts; its type failure says it all.
        not_numeric = {
            item.expectation_config.kwargs.get("column")
            for item in result.results
            if not item.success and item.expectation_config.type == "expect_column_values_to_be_in_type_list"
        }
        reasons, bad_rows = [], set()
        for item in result.results:
            column = item.expectation_config.kwargs.get("column")
            columns = item.expectation_config.kwargs.get("column_list") or [column]
            kind = item.expectation_config.type
            if item.success or (kind != "expect_column_to_exist" and missing & set(columns)):
                # Expectations on a missing column fail too; the missing column says it all.
                continue
            if kind == "expect_column_values_to_be_between" and column in not_numeric:
                continue
            reason, rows = self._explain(item, prepared, frame, file_name, row_offset)
            reasons.append(reason)
            bad_rows.update(rows[:SAMPLE_ROWS])
        if reasons:
            samples = [_row_dict(frame, i, row_offset) for i in sorted(bad_rows)[:SAMPLE_ROWS]]
            result.meta.update(
                {"file": file_name, "row_offset": row_offset, "reasons": reasons, "sample_rows": samples}
            )
            return ValidationOutcome(False, reasons, samples, result=result)
        helpers = [
            ORDER_COLUMN,
            ZONE_COLUMN,
            FUTURE_COLUMN,
            *(LABEL_PREFIX + label for label in self.schema.label_columns),
        ]
        ordered = prepared.drop(columns=helpers).sort_values(
            [self.schema.entity_column, self.schema.timestamp_column], kind="stable"
        )
        return ValidationOutcome(True, frame=ordered.reset_index(drop=True))

    def _explain(
        self, item, frame: pd.DataFrame, original: pd.DataFrame, file_name: str, row_offset: int
    ) -> tuple[str, list[int]]:
        """The one-line reason of a failed expectation and its rows; `frame` is what GE saw,
        `original` the rows as read."""
        config = item.expectation_config
        kind = config.type
        column = config.kwargs.get("column")
        detail = item.result or {}
        rows = [int(i) for i in detail.get("unexpected_index_list") or [] if isinstance(i, int | np.integer)]
        count = detail.get("unexpected_count")
        total = len(frame)
        where = f"rows {_rows(rows, row_offset)}" if rows else ""
        if kind == "expect_column_to_exist":
            return f"{file_name}: missing column '{column}'", []
        if kind == "expect_column_values_to_be_in_type_list":
            bad = _non_numeric_rows(frame[column])
            return (
                f"{file_name}: column '{column}' is not numeric (type {detail.get('observed_value')}); "
                f"non-numeric values at rows {_rows(bad, row_offset)}",
                bad,
            )
        if kind == "expect_column_values_to_not_be_null":
            if column in (self.schema.entity_column, self.schema.timestamp_column):
                what = "unparseable or empty" if column == self.schema.timestamp_column else "empty"
                return f"{file_name}: column '{column}': {count} of {total} values {what} at {where}", rows
            allowed = 1 - config.kwargs.get("mostly", 1.0)
            return (
                f"{file_name}: column '{column}': {count} of {total} values missing "
                f"(more than the allowed {allowed:.0%}), first at {where}",
                rows,
            )
        if kind == "expect_column_values_to_be_in_set" and column == FUTURE_COLUMN:
            ts = self.schema.timestamp_column
            values = ", ".join(str(v) for v in frame[ts].iloc[rows[:3]])
            return f"{file_name}: column '{ts}': {count} timestamps in the future at {where} ({values})", rows
        if kind == "expect_column_values_to_be_between":
            values = ", ".join(str(v) for v in (detail.get("partial_unexpected_list") or [])[:3])
            low, high = config.kwargs.get("min_value"), config.kwargs.get("max_value")
            return (
                f"{file_name}: column '{column}': {count} of {total} values outside the physical range "
                f"[{low}, {high}] at {where} (e.g. {values})",
                rows,
            )
        if kind == "expect_column_values_to_be_in_set" and column == ORDER_COLUMN:
            return (
                f"{file_name}: column '{self.schema.timestamp_column}': timestamps go backwards within an "
                f"entity at {where}",
                rows,
            )
        if kind == "expect_column_values_to_be_in_set" and column == ZONE_COLUMN:
            return (
                f"{file_name}: column '{self.schema.timestamp_column}': {count} timestamps differ from the rest in "
                f"carrying a time zone (mixed naive and zoned times) at {where}",
                rows,
            )
        if kind == "expect_column_values_to_be_in_set" and column.startswith(LABEL_PREFIX):
            label = column[len(LABEL_PREFIX) :]
            shown = original[label].iloc[rows[:3]] if label in original else []
            values = ", ".join(repr(v) if isinstance(v, str) else str(v) for v in shown)
            return (
                f"{file_name}: column '{label}': {count} of {total} labels are not 0, 1 or empty at {where} "
                f"(e.g. {values})",
                rows,
            )
        if kind == "expect_compound_columns_to_be_unique":
            return (
                f"{file_name}: columns '{self.schema.entity_column}', '{self.schema.timestamp_column}': "
                f"{count} rows share an (entity, timestamp) pair at {where}",
                rows,
            )
        message = (
            (item.exception_info or {}).get("exception_message") if isinstance(item.exception_info, dict) else None
        )
        return f"{file_name}: {kind} failed on column '{column}'" + (f": {message}" if message else ""), rows


def _rows(indices: list[int], offset: int = 0, limit: int = 8) -> str:
    """1-based data-row numbers of the file, as a reader counts them below the header."""
    shown = ", ".join(str(offset + i + 1) for i in indices[:limit])
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")


def _non_numeric_rows(values: pd.Series) -> list[int]:
    coerced = pd.to_numeric(values, errors="coerce")
    return [int(i) for i in np.flatnonzero(values.notna().to_numpy() & coerced.isna().to_numpy())]


def _row_dict(frame: pd.DataFrame, index: int, offset: int) -> dict:
    row = frame.iloc[index]
    return {"row": offset + index + 1, **{str(k): (None if pd.isna(v) else str(v)) for k, v in row.items()}}


_validators = threading.local()


def validator_for(schema: LogSchema, suite_file: Path) -> BatchValidator:
    """One validator per schema, suite file and thread: building the GE context takes seconds,
    so a Dask worker builds it once and reuses it for every file it checks, until the suite
    file changes. Not shared across threads: two validations running at once on one GE context
    mix up their results."""
    key = (schema.model_dump_json(), str(suite_file), suite_file.stat().st_mtime_ns)
    cache = getattr(_validators, "by_suite", None)
    if cache is None:
        cache = _validators.by_suite = {}
    if key not in cache:
        cache.clear()  # an edited suite replaces the one before it
        cache[key] = BatchValidator(schema, load_suite(suite_file))
    return cache[key]
