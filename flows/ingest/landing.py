"""Landing-folder discovery and reading of log files into data frames, with clear errors."""

from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from flows.log_schema import LogSchema

SUPPORTED_SUFFIXES = (".csv", ".csv.gz", ".parquet")
# Files still being written by a well-behaved producer.
IN_PROGRESS_SUFFIXES = (".part", ".tmp", ".partial")


class BatchReadError(ValueError):
    """A landing file that cannot be read as a log batch; the message names file and place."""


@dataclass(frozen=True)
class LandedFile:
    path: Path
    size_bytes: int
    modified: float


def discover(landing: Path, stable_seconds: float = 0.0) -> tuple[list[LandedFile], list[tuple[Path, str]]]:
    """Files ready to read, oldest first, and (path, reason) for entries that are refused.

    A file whose size or mtime changes during discovery, or which was modified less than
    `stable_seconds` ago, is still being written and is left for a later run.
    """
    ready, refused = [], []
    root = landing.resolve()
    now = time.time()
    for path in sorted(landing.iterdir()) if landing.exists() else []:
        name = path.name
        if name.startswith(".") or name.endswith(IN_PROGRESS_SUFFIXES):
            continue
        if path.is_symlink():
            target = path.resolve()
            if not target.is_relative_to(root):
                refused.append((path, f"{name}: symlink points outside the landing folder (to {target})"))
                continue
        if not path.is_file():
            continue
        first = path.stat()
        if now - first.st_mtime < stable_seconds:
            continue
        time.sleep(0) if stable_seconds == 0 else time.sleep(min(stable_seconds, 0.2))
        second = path.stat()
        if (first.st_size, first.st_mtime_ns) != (second.st_size, second.st_mtime_ns):
            continue
        ready.append(LandedFile(path, second.st_size, second.st_mtime))
    ready.sort(key=lambda f: (f.modified, f.path.name))
    return ready, refused


def content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


GZIP_MAGIC = b"\x1f\x8b"


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _open_text(path: Path):
    """A text handle on a CSV file, gzip-compressed or not (by content, not by name)."""
    with path.open("rb") as probe:
        compressed = probe.read(2) == GZIP_MAGIC
    opener = gzip.open if compressed else open
    # utf-8-sig drops a byte-order mark; newline="" lets the CSV parser see CR LF endings.
    return opener(path, "rt", encoding="utf-8-sig", newline="")


def _check_header(path: Path, schema: LogSchema) -> int:
    """Refuses an empty header, one split by another delimiter or repeating a name; returns the
    number of fields the header holds."""
    name = path.name
    with _open_text(path) as handle:
        first = handle.readline()
    if not first.strip():
        raise BatchReadError(f"{name}: the file is empty (no header, no rows)")
    header = next(csv.reader([first], delimiter=schema.delimiter))
    columns = [c.strip() for c in header]
    others = [sep for sep in (",", ";", "\t", "|") if sep != schema.delimiter and sep in first]
    if len(columns) == 1 and others:
        raise BatchReadError(
            f"{name}: header row holds one column split by {others[0]!r}; the delimiter must be "
            f"{schema.delimiter!r} (log_schema.delimiter)"
        )
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise BatchReadError(f"{name}: header row repeats column(s) {repeated}")
    return len(columns)


def _check_utf8(path: Path, compression: str | None) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with pa.input_stream(str(path), compression=compression) as stream:
        while block := stream.read(1 << 20):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as error:
                where = offset + error.start
                raise BatchReadError(f"{path.name}: not UTF-8 text at byte {where} (a binary file?)") from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise BatchReadError(f"{path.name}: not UTF-8 text at byte {offset} (ends inside a character)") from None


# Rows of a wrong field count named in the message; the rest are counted.
NAMED_ROWS = 5


def _check_fields(path: Path, fields: int, delimiter: str) -> None:
    """Refuses a CSV file with a row of more or fewer fields than its header: pandas would read
    the short rows' missing fields as missing values, shifting nothing but losing the fact that
    the row is broken. A short last row means the file was cut off while written or copied.

    One streamed pass of Arrow's CSV parser (field counts only; a single column is converted)."""
    import pyarrow.csv as pa_csv

    wrong: list[tuple[int, int]] = []  # (data row, fields) as the parser meets them

    def note(row) -> str:
        wrong.append(((row.number or 0) - 1, row.actual_columns))
        return "skip"

    names = [f"c{i}" for i in range(fields)]
    with path.open("rb") as probe:
        compression = "gzip" if probe.read(2) == GZIP_MAGIC else None
    _check_utf8(path, compression)  # a binary file is that, before its field counts are anything
    good = 0
    with pa.input_stream(str(path), compression=compression) as stream:
        reader = pa_csv.open_csv(
            stream,
            read_options=pa_csv.ReadOptions(column_names=names, skip_rows=1, use_threads=False, block_size=1 << 22),
            parse_options=pa_csv.ParseOptions(delimiter=delimiter, newlines_in_values=True, invalid_row_handler=note),
            convert_options=pa_csv.ConvertOptions(include_columns=names[:1], column_types={names[0]: pa.string()}),
        )
        for block in reader:
            good += block.num_rows
    if not wrong:
        return
    last_row, last_fields = wrong[-1]
    cut_off = last_fields < fields and last_row == good + len(wrong)
    broken = wrong[:-1] if cut_off else wrong
    parts = []
    if broken:
        named = ", ".join(f"row {row} has {count}" for row, count in broken[:NAMED_ROWS])
        more = f" and {len(broken) - NAMED_ROWS} more rows" if len(broken) > NAMED_ROWS else ""
        parts.append(f"{len(broken)} rows do not hold the header's {fields} fields: {named}{more}")
    if cut_off:
        parts.append(
            f"the file ends in the middle of row {last_row} ({last_fields} of {fields} fields): "
            f"cut off while being written or copied"
        )
    raise BatchReadError(f"{path.name}: " + "; ".join(parts))


def iter_batch(path: Path, schema: LogSchema, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """Reads a CSV (optionally gzip) or Parquet log file in chunks of at most `chunk_rows` rows.

    Sensor columns come back numeric where they parse, the entity column as strings, the
    timestamp column as written. Raises BatchReadError naming the file and the place.
    """
    suffix = _suffix(path)
    name = path.name
    if suffix not in SUPPORTED_SUFFIXES:
        raise BatchReadError(
            f"{name}: unsupported file type {suffix or '(none)'}; expected one of {SUPPORTED_SUFFIXES}"
        )
    produced = 0
    try:
        if suffix == ".parquet":
            for record_batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
                frame = record_batch.to_pandas()
                if frame.empty:
                    continue
                produced += len(frame)
                yield _tidy(frame, schema)
        else:
            _check_fields(path, _check_header(path, schema), schema.delimiter)
            with _open_text(path) as handle:
                reader = pd.read_csv(
                    handle,
                    sep=schema.delimiter,
                    chunksize=chunk_rows,
                    dtype={schema.entity_column: str, schema.timestamp_column: str},
                )
                for frame in reader:
                    if frame.empty:
                        continue
                    produced += len(frame)
                    yield _tidy(frame, schema)
    except pd.errors.EmptyDataError:
        raise BatchReadError(f"{name}: the file is empty (no header, no rows)") from None
    except UnicodeDecodeError as error:
        raise BatchReadError(f"{name}: not UTF-8 text at byte {error.start} (a binary file?)") from None
    except pd.errors.ParserError as error:
        raise BatchReadError(f"{name}: malformed CSV: {str(error).strip()}") from None
    except (pa.ArrowInvalid, OSError, EOFError, gzip.BadGzipFile, csv.Error) as error:
        raise BatchReadError(f"{name}: cannot be read as {suffix}: {str(error).strip().splitlines()[0]}") from None
    if produced == 0:
        raise BatchReadError(f"{name}: no data rows (header only)")


def _tidy(frame: pd.DataFrame, schema: LogSchema) -> pd.DataFrame:
    frame.columns = [str(c).strip() for c in frame.columns]
    if schema.single_line is not None and schema.entity_column not in frame:
        frame.insert(0, schema.entity_column, schema.single_line)
    if schema.entity_column in frame:
        frame[schema.entity_column] = frame[schema.entity_column].astype("string")
    return frame


def read_batch(path: Path, schema: LogSchema) -> pd.DataFrame:
    """A whole log file as one data frame (see `iter_batch`)."""
    return pd.concat(list(iter_batch(path, schema, chunk_rows=1 << 30)), ignore_index=True)
