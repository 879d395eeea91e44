"""Landing-folder discovery and reading of log files into data frames, with clear errors."""

from __future__ import annotations

import gzip
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from flows.settings import LogSchema

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


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def read_batch(path: Path, schema: LogSchema) -> pd.DataFrame:
    """Reads a CSV (optionally gzip) or Parquet log file; sensor columns come back numeric
    where they parse, the entity column as strings, the timestamp column as given."""
    suffix = _suffix(path)
    name = path.name
    if suffix not in SUPPORTED_SUFFIXES:
        raise BatchReadError(
            f"{name}: unsupported file type {suffix or '(none)'}; expected one of {SUPPORTED_SUFFIXES}"
        )
    try:
        if suffix == ".parquet":
            frame = pq.read_table(path).to_pandas()
        else:
            opener = gzip.open if suffix == ".csv.gz" else open
            with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
                frame = pd.read_csv(handle, dtype={schema.entity_column: str, schema.timestamp_column: str})
    except pd.errors.EmptyDataError:
        raise BatchReadError(f"{name}: the file is empty (no header, no rows)") from None
    except UnicodeDecodeError as error:
        raise BatchReadError(f"{name}: not UTF-8 text at byte {error.start} (a binary file?)") from None
    except pd.errors.ParserError as error:
        raise BatchReadError(f"{name}: malformed CSV: {str(error).strip()}") from None
    except (pa.ArrowInvalid, OSError, EOFError, gzip.BadGzipFile) as error:
        raise BatchReadError(f"{name}: cannot be read as {suffix}: {str(error).strip().splitlines()[0]}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if frame.empty:
        raise BatchReadError(f"{name}: no data rows (header only)")
    return frame
