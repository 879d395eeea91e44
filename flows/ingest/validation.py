"""Great Expectations validation of a log batch against the work folder's expectation suite
(`flows.ingest.expectations`: generated from the log schema, edited by the user at will).

Validation runs on an in-memory (ephemeral) context, so Dask workers never write to the work
folder; the result of a failing batch travels back with its outcome and the driver stores it in
the work folder's GE project (`flows.ingest.validation_docs`). A failure names the file, the
column and the rows.

A fault costs what it concerns, no more. Before the suite runs, exact duplicate rows are dropped
(counted: a logger that resends a reading) and each line's rows are put in time order (a line
out of order within a file is unambiguous once its timestamps are distinct). Then a failed
expectation takes out, by what it says:
- the file (`FILE_FAULTS`, and any expectation that names no rows): a missing column, a sensor
  that is not numeric, too many missing readings in a column, naive and zoned times mixed;
- the rows of the lines it names (`LINE_FAULTS`): a reading outside its physical range or a
  label that is not 0/1 says the line's logger is broken for this file;
- the rows it names (every other expectation): an empty line name, a timestamp that does not
  parse or lies in the future, two different readings for one (line, time).
The file's other rows go on; if none is left, the file is quarantined as a whole.
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
from flows.log_schema import LogSchema

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

_ZONED = r"(?:Z|[+-]\d{2}:?\d{2})$"
SAMPLE_ROWS = 5
FILE_FAULTS = {"expect_column_to_exist", "expect_column_values_to_be_in_type_list"}
LINE_FAULTS = {"expect_column_values_to_be_between"}


@dataclass
class LineQuarantine:
    """Rows of one line (None: rows that name no line) taken out of a file that goes on."""

    entity: str | None
    rows: int
    reasons: list[str]
    sample_rows: list[dict]


@dataclass
class ValidationOutcome:
    success: bool  # False: the file is quarantined as a whole
    reasons: list[str] = field(default_factory=list)
    sample_rows: list[dict] = field(default_factory=list)
    frame: pd.DataFrame | None = None  # parsed timestamps, sorted by entity and time, on success
    result: object | None = None  # GE's ExpectationSuiteValidationResult of a failure, for its store
    lines: list[LineQuarantine] = field(default_factory=list)  # rows taken out of a file that goes on
    quarantined: pd.DataFrame | None = None  # those rows as read, with their file row and reason
    duplicates: int = 0  # exact duplicate rows dropped
    reordered: int = 0  # rows put back in time order within their line

    @property
    def quarantined_rows(self) -> int:
        return sum(line.rows for line in self.lines)


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
            parsed = parse_timestamps(raw)
            if not pd.api.types.is_datetime64_any_dtype(raw):
                # Naive times are taken as UTC, but naive and zoned times in one batch mean
                # two clocks were mixed: the minority is flagged. A value that does not parse
                # has no clock (the null check names it).
                zoned = raw.astype("string").str.strip().str.contains(_ZONED, regex=True).fillna(True)
                voters = zoned[parsed.notna()]
                majority = bool(voters.mean() >= 0.5) if len(voters) else True
                prepared[ZONE_COLUMN] = (zoned == majority) | parsed.isna()
            prepared[schema.timestamp_column] = parsed
            latest = pd.Timestamp.now(tz="UTC") + pd.Timedelta(seconds=schema.max_future_seconds)
            prepared[FUTURE_COLUMN] = ~(prepared[schema.timestamp_column] > latest)
        else:
            prepared[FUTURE_COLUMN] = True
        # Each line's rows are put in time order before the suite runs (`validate`): an edited
        # suite that still holds the order expectation finds them in order.
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
        reasons name rows as they are numbered in the file. Rows keep their file positions in
        the index of what GE sees, so every reason names rows as read."""
        schema = self.schema
        frame = frame.reset_index(drop=True)  # positions are labels from here on
        duplicated = self._resent(frame)
        prepared = self._prepared(frame[~duplicated])
        reordered = 0
        if schema.entity_column in prepared and schema.timestamp_column in prepared:
            previous = prepared.groupby(schema.entity_column, sort=False)[schema.timestamp_column].shift()
            current = prepared[schema.timestamp_column]
            reordered = int((previous.notna() & current.notna() & (current < previous)).sum())
            prepared = prepared.sort_values([schema.entity_column, schema.timestamp_column], kind="stable")
        positions = prepared.index.to_numpy()  # GE's row i is the file's data row positions[i]
        seen = prepared.reset_index(drop=True)
        # A pass/fail run costs about half of a detailed one; details only for failures.
        result = self._run(seen, "BOOLEAN_ONLY", file_name)
        if result.success:
            return self._passed(seen, int(duplicated.sum()), reordered)
        result = self._run(seen, "COMPLETE", file_name)
        missing = {schema.entity_column, schema.timestamp_column, *schema.sensor_names} - set(seen.columns)
        # A text column fails its range check too, without counts; its type failure says it all.
        not_numeric = {
            item.expectation_config.kwargs.get("column")
            for item in result.results
            if not item.success and item.expectation_config.type == "expect_column_values_to_be_in_type_list"
        }
        lines = seen[schema.entity_column].astype("string") if schema.entity_column in seen else None
        file_reasons, file_rows = [], set()
        taken = np.zeros(len(seen), dtype=bool)  # rows taken out of a file that goes on
        by_line: dict[str | None, list[str]] = {}  # each line's reasons (None: rows naming no line)
        for item in result.results:
            column = item.expectation_config.kwargs.get("column")
            columns = item.expectation_config.kwargs.get("column_list") or [column]
            kind = item.expectation_config.type
            if item.success or (kind != "expect_column_to_exist" and missing & set(columns)):
                # Expectations on a missing column fail too; the missing column says it all.
                continue
            if kind == "expect_column_values_to_be_between" and column in not_numeric:
                continue
            scope, flagged = self._scope(item)
            if scope == "file" or lines is None:
                reason, named = self._explain(item, seen, frame, file_name, row_offset, positions)
                file_reasons.append(reason)
                file_rows.update(named[:SAMPLE_ROWS])
                continue
            owners = lines.iloc[flagged]
            if scope == "line":
                taken |= lines.isin(set(owners.dropna())).fillna(False).to_numpy()
            taken[flagged] = True
            for line in [*sorted(set(owners.dropna())), *([None] if owners.isna().any() else [])]:
                own = flagged[(owners.isna() if line is None else owners == line).fillna(False).to_numpy()]
                reason, _ = self._explain(item, seen, frame, file_name, row_offset, positions, own)
                where = "rows without a line" if line is None else f"line '{line}'"
                by_line.setdefault(line, []).append(reason.replace(f"{file_name}: ", f"{file_name}: {where}: ", 1))
        if file_reasons or taken.all():
            reasons = file_reasons + [r for found in by_line.values() for r in found]
            shown = sorted(file_rows or positions[taken])[:SAMPLE_ROWS]
            samples = [_row_dict(frame, i, row_offset) for i in shown]
            result.meta.update(
                {"file": file_name, "row_offset": row_offset, "reasons": reasons, "sample_rows": samples}
            )
            return ValidationOutcome(False, reasons, samples, result=result)
        quarantined, reason_of = [], np.empty(len(seen), dtype=object)
        for line, reasons in by_line.items():
            own = taken & (lines.isna() if line is None else lines == line).fillna(False).to_numpy()
            reason_of[own] = "; ".join(reasons)
            samples = [_row_dict(frame, i, row_offset) for i in sorted(positions[own])[:SAMPLE_ROWS]]
            quarantined.append(LineQuarantine(line, int(own.sum()), reasons, samples))
        order = np.argsort(positions[taken], kind="stable")
        rows_out = frame.iloc[positions[taken][order]].copy()
        rows_out.insert(0, "file_row", row_offset + positions[taken][order] + 1)
        rows_out["reason"] = reason_of[taken][order]
        named = ", ".join(str(q.entity) for q in quarantined[:3]) + (" …" if len(quarantined) > 3 else "")
        self._rename_run(result, f"{file_name} · line {named}")  # the Data Docs page names the lines
        result.meta.update(
            {"file": file_name, "row_offset": row_offset, "reasons": [r for q in quarantined for r in q.reasons]}
        )
        outcome = self._passed(seen[~taken], int(duplicated.sum()), reordered)
        outcome.result, outcome.lines, outcome.quarantined = result, quarantined, rows_out
        return outcome

    def _resent(self, frame: pd.DataFrame) -> np.ndarray:
        """(rows,) bool: rows that repeat an earlier row exactly. Only rows whose (line, time)
        repeats are compared whole: hashing every column of a plant file costs more."""
        keys = [c for c in (self.schema.entity_column, self.schema.timestamp_column) if c in frame]
        if len(keys) < 2:
            return frame.duplicated(keep="first").to_numpy()
        candidates = frame.duplicated(keys, keep=False).to_numpy()
        resent = np.zeros(len(frame), dtype=bool)
        if candidates.any():
            resent[candidates] = frame[candidates].duplicated(keep="first").to_numpy()
        return resent

    @staticmethod
    def _rename_run(result, name: str) -> None:
        from great_expectations.core.run_identifier import RunIdentifier

        run_id = RunIdentifier(run_name=name, run_time=result.meta["run_id"].run_time)
        result.meta.update({"run_id": run_id})

    def _passed(self, prepared: pd.DataFrame, duplicates: int, reordered: int) -> ValidationOutcome:
        helpers = [
            ORDER_COLUMN,
            ZONE_COLUMN,
            FUTURE_COLUMN,
            *(LABEL_PREFIX + label for label in self.schema.label_columns),
        ]
        rows = prepared.drop(columns=helpers).reset_index(drop=True)
        return ValidationOutcome(True, frame=rows, duplicates=duplicates, reordered=reordered)

    @staticmethod
    def _flagged(item) -> list[int]:
        detail = item.result or {}
        return [int(i) for i in detail.get("unexpected_index_list") or [] if isinstance(i, int | np.integer)]

    def _scope(self, item) -> tuple[str, np.ndarray]:
        """What a failed expectation takes out: "file", "line" (the lines of its rows) or "rows",
        and its rows (positions in what GE saw)."""
        config = item.expectation_config
        kind, column = config.type, config.kwargs.get("column")
        rows = np.asarray(self._flagged(item), dtype=np.int64)
        if kind in FILE_FAULTS or column == ZONE_COLUMN or not len(rows):
            return "file", rows
        sensors = set(self.schema.sensor_names)
        if kind == "expect_column_values_to_not_be_null" and column in sensors:
            return "file", rows  # a share of missing readings over the whole file
        if kind in LINE_FAULTS or (column or "").startswith(LABEL_PREFIX):
            return "line", rows
        if kind == "expect_column_values_to_be_in_set" or kind == "expect_column_values_to_not_be_null":
            return "rows", rows
        if kind == "expect_compound_columns_to_be_unique":
            return "rows", rows
        return "line", rows  # an expectation the user added, naming rows: their lines

    def _explain(
        self,
        item,
        frame: pd.DataFrame,
        original: pd.DataFrame,
        file_name: str,
        row_offset: int,
        positions: np.ndarray,
        rows: list[int] | None = None,
    ) -> tuple[str, list[int]]:
        """The one-line reason of a failed expectation and its rows as read in the file; `frame`
        is what GE saw (its row i is the file's data row positions[i]), `original` the rows as
        read; `rows` (GE positions) narrows it to some of its rows (one line's)."""
        config = item.expectation_config
        kind = config.type
        column = config.kwargs.get("column")
        detail = item.result or {}
        seen = self._flagged(item) if rows is None else list(rows)
        count = detail.get("unexpected_count") if rows is None else len(seen)
        total = len(frame)
        rows = sorted(int(positions[i]) for i in seen)  # file positions from here on
        at = {int(positions[i]): i for i in seen}
        where = f"rows {_rows(rows, row_offset)}" if rows else ""
        if kind == "expect_column_to_exist":
            return f"{file_name}: missing column '{column}'", []
        if kind == "expect_column_values_to_be_in_type_list":
            bad = sorted(int(positions[i]) for i in _non_numeric_rows(frame[column]))
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
            values = ", ".join(str(v) for v in frame[ts].iloc[[at[r] for r in rows[:3]]])
            return f"{file_name}: column '{ts}': {count} timestamps in the future at {where} ({values})", rows
        if kind == "expect_column_values_to_be_between":
            values = ", ".join(str(v) for v in frame[column].iloc[[at[r] for r in rows[:3]]])
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
            shown = original[label].iloc[rows[:3]] if label in original else []  # `original`: file positions
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
    row = frame.iloc[int(index)]
    return {"row": int(offset + index + 1), **{str(k): (None if pd.isna(v) else str(v)) for k, v in row.items()}}


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
