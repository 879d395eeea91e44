"""A landed file read and validated in one go, ahead of its processing (in a thread of the
driver, or on a Dask worker), its rows split into groups of lines."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flows.ingest.landing import BatchReadError, iter_batch
from flows.ingest.validation import ValidationOutcome, validator_for
from flows.log_schema import LogSchema


@dataclass
class FileCheck:
    """A file read and validated ahead of processing.

    A file of more than one part of `ingest.chunk_rows` rows is left undecided: it is validated
    part by part in the driver while it is processed, so memory stays flat.
    """

    rows: int = 0
    outcome: ValidationOutcome | None = None  # without the rows themselves
    read_error: str | None = None
    groups: list[list[str]] = field(default_factory=list)  # the file's lines, by group
    parts: list[Any] = field(default_factory=list)  # per group its validated rows (a Dask future)
    worker: str | None = None

    @property
    def decided(self) -> bool:
        return self.read_error is not None or self.outcome is not None


def check_file(path: Path, schema: LogSchema, suite_file: Path, chunk_rows: int, groups: int = 1) -> FileCheck:
    """Reads and validates a one-part file against `suite_file`; on success its rows, split
    into line groups."""
    chunks = iter_batch(path, schema, chunk_rows)
    try:
        first = next(chunks)
        if next(chunks, None) is not None:
            return FileCheck()
    except BatchReadError as error:
        return FileCheck(read_error=str(error))
    outcome = validator_for(schema, suite_file).validate(first, path.name)
    check = FileCheck(len(first), outcome)
    if outcome.success:
        rows = outcome.frame
        entity = rows[schema.entity_column].astype(str)
        check.groups = split_groups(list(entity.unique()), groups)
        check.parts = [rows[entity.isin(set(group)).to_numpy()] for group in check.groups]
        outcome.frame = None
    return check


def split_groups(entities: list[str], groups: int) -> list[list[str]]:
    """Sorted lines in `groups` contiguous chunks of near-equal size (empty chunks dropped)."""
    ordered = sorted(entities)
    return [list(chunk) for chunk in np.array_split(np.array(ordered, dtype=object), groups) if len(chunk)]
