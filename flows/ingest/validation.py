"""Great Expectations validation of a log batch, with a suite generated from the schema.

Expectations: every required column exists; sensors are numeric; each sensor's non-null
fraction is at least 1 - max_null_fraction; readings lie in the physical range; entity and
timestamp are present; timestamps parse, are not in the future and do not decrease within an
entity; no (entity, timestamp) pair repeats. A failure names the file, the column and the rows.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from flows.settings import LogSchema

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

# Helper column: False where a timestamp is earlier than the one before it in the same entity.
ORDER_COLUMN = "__timestamp_in_order"
# Helper column: whether a text timestamp names its time zone like the majority of the batch.
ZONE_COLUMN = "__timestamp_zone_consistent"
_ZONED = r"(?:Z|[+-]\d{2}:?\d{2})$"
# Helper column per label column: whether the label is 0, 1 or empty.
LABEL_PREFIX = "__label_valid_"
NUMERIC_TYPES = ["int8", "int16", "int32", "int64", "float16", "float32", "float64", "Int64", "Float64"]
SAMPLE_ROWS = 5


@dataclass
class ValidationOutcome:
    success: bool
    reasons: list[str] = field(default_factory=list)
    sample_rows: list[dict] = field(default_factory=list)
    frame: pd.DataFrame | None = None  # parsed timestamps, sorted by entity and time, on success


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
    def __init__(self, schema: LogSchema) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.schema = schema
        self._gx = gx
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        asset = context.data_sources.add_pandas("landing").add_dataframe_asset(name="log_batch")
        self._batch_definition = asset.add_batch_definition_whole_dataframe("whole_batch")
        self._context = context
        self._count = 0
        self._definition = None
        self._built_at: pd.Timestamp | None = None

    def _current_definition(self):
        """The validation definition, rebuilt when its 'not in the future' bound gets stale."""
        now = pd.Timestamp.now(tz="UTC")
        if self._definition is None or now - self._built_at > pd.Timedelta(minutes=5):
            if self._definition is not None:
                self._context.validation_definitions.delete(self._definition.name)
                self._context.suites.delete(self._definition.suite.name)
            suite = self._suite(now)
            self._definition = self._context.validation_definitions.add(
                self._gx.ValidationDefinition(name=f"{suite.name}_run", data=self._batch_definition, suite=suite)
            )
            self._built_at = now
        return self._definition

    def _suite(self, now: pd.Timestamp):
        gx = self._gx
        schema = self.schema
        ex = gx.expectations
        entity, ts = schema.entity_column, schema.timestamp_column
        expectations = [ex.ExpectColumnToExist(column=c) for c in [entity, ts, *schema.sensor_names]]
        expectations += [
            ex.ExpectColumnValuesToNotBeNull(column=entity),
            ex.ExpectColumnValuesToNotBeNull(column=ts),
            ex.ExpectColumnValuesToBeBetween(
                column=ts, max_value=(now + pd.Timedelta(seconds=schema.max_future_seconds)).isoformat()
            ),
            ex.ExpectColumnValuesToBeInSet(column=ORDER_COLUMN, value_set=[True]),
            ex.ExpectColumnValuesToBeInSet(column=ZONE_COLUMN, value_set=[True]),
            ex.ExpectCompoundColumnsToBeUnique(column_list=[entity, ts]),
        ]
        for label in schema.label_columns:
            expectations.append(ex.ExpectColumnValuesToBeInSet(column=LABEL_PREFIX + label, value_set=[True]))
        for sensor in schema.sensors:
            expectations += [
                ex.ExpectColumnValuesToBeInTypeList(column=sensor.name, type_list=NUMERIC_TYPES),
                ex.ExpectColumnValuesToNotBeNull(column=sensor.name, mostly=1.0 - sensor.max_null_fraction),
                ex.ExpectColumnValuesToBeBetween(column=sensor.name, min_value=sensor.min, max_value=sensor.max),
            ]
        self._count += 1
        suite = gx.ExpectationSuite(name=f"factory_log_{self._count}", expectations=expectations)
        return self._context.suites.add(suite)

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
        definition = self._current_definition()
        # A pass/fail run costs about half of a detailed one; details only for failures.
        result = definition.run(
            batch_parameters={"dataframe": prepared}, result_format={"result_format": "BOOLEAN_ONLY"}
        )
        if not result.success:
            result = definition.run(
                batch_parameters={"dataframe": prepared}, result_format={"result_format": "COMPLETE"}
            )
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
            return ValidationOutcome(False, reasons, samples)
        helpers = [ORDER_COLUMN, ZONE_COLUMN, *(LABEL_PREFIX + label for label in self.schema.label_columns)]
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
        if kind == "expect_column_values_to_be_between":
            values = ", ".join(str(v) for v in (detail.get("partial_unexpected_list") or [])[:3])
            if column == self.schema.timestamp_column:
                return (
                    f"{file_name}: column '{column}': {count} timestamps in the future at {where} ({values})",
                    rows,
                )
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


def validator_for(schema: LogSchema) -> BatchValidator:
    """One validator per schema and thread: building the GE context takes seconds, so a Dask
    worker builds it once and reuses it for every file it checks. Not shared across threads:
    two validations running at once on one GE context mix up their results."""
    key = schema.model_dump_json()
    cache = getattr(_validators, "by_schema", None)
    if cache is None:
        cache = _validators.by_schema = {}
    if key not in cache:
        cache[key] = BatchValidator(schema)
    return cache[key]
