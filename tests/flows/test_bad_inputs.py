"""Malformed landing files: each ends in an exact place, with a one-line reason naming the
file and the row or field, and the run goes on with the other files. A fault of some rows
takes out those rows only (`quarantined_rows`); exact duplicates are dropped and counted."""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import select

from flows.monitor.status import balanced, pipeline_status
from flows.orchestrate.prefect_flows import continual_update
from flows.storage.database import Database
from flows.storage.models import Batch, EntityState
from flows.storage.work_folder import resolved_path
from tests.flows.helpers import small_config

ROWS = 40
START = pd.Timestamp("2026-02-01T00:00:00Z")


def frame(entity: str, start: pd.Timestamp = START, rows: int = ROWS) -> pd.DataFrame:
    rng = np.random.default_rng(zlib.crc32(entity.encode()))  # the same rows under any PYTHONHASHSEED
    stamps = start + pd.to_timedelta(np.arange(rows) * 10.0, unit="s")
    return pd.DataFrame(
        {
            "entity": entity,
            "timestamp": stamps.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "temperature": rng.uniform(40, 60, rows),
            "vibration": rng.uniform(1, 5, rows),
            "pressure": rng.uniform(2, 9, rows),
            "flow": rng.uniform(100, 300, rows),
            "motor_current": rng.uniform(20, 60, rows),
            "anomaly": 0,
        }
    )


def csv_bytes(data: pd.DataFrame, **kwargs) -> bytes:
    return data.to_csv(index=False, **kwargs).encode()


def with_column(entity: str, column: str, values) -> bytes:
    data = frame(entity)
    data[column] = values
    return csv_bytes(data)


def parquet_bytes(data: pd.DataFrame, tmp: Path) -> bytes:
    path = tmp / "x.parquet"
    data.to_parquet(path, index=False)
    return path.read_bytes()


@dataclass
class Case:
    file: str
    content: object  # bytes, or a callable(tmp_dir) -> bytes
    ends: str  # processed | quarantined | late
    reason: str | None = None  # a phrase the one-line reason must hold
    quarantined_rows: int = 0  # of a processed file: rows taken out, the rest scored
    duplicate_rows: int = 0  # of a processed file: exact duplicates dropped


def _mixed_offsets(entity: str) -> bytes:
    data = frame(entity)
    stamps = pd.to_datetime(data["timestamp"], utc=True)
    shifted = (stamps[1::2].dt.tz_convert("Europe/Berlin")).map(lambda t: t.isoformat())
    data.loc[1::2, "timestamp"] = shifted
    return csv_bytes(data)


def _naive_and_zoned(entity: str) -> bytes:
    data = frame(entity)
    data.loc[:4, "timestamp"] = data.loc[:4, "timestamp"].str.rstrip("Z")
    return csv_bytes(data)


def _drop_last_field(content: bytes, rows: tuple[int, ...]) -> bytes:
    """The data rows `rows` (1-based) lose their last field, as a writer that skips empty
    trailing values would leave them."""
    lines = content.split(b"\n")
    for row in rows:
        lines[row] = lines[row].rsplit(b",", 1)[0]
    return b"\n".join(lines)


def _late(entity: str) -> bytes:
    return csv_bytes(frame(entity, start=START - pd.Timedelta(days=1)))


nan = float("nan")
CASES = [
    Case("empty.csv", b"", "quarantined", "empty.csv: the file is empty"),
    Case("header-only.csv", b"entity,timestamp,temperature\n", "quarantined", "header-only.csv: no data rows"),
    Case("semicolons.csv", csv_bytes(frame("c-semicolon"), sep=";"), "quarantined", "the delimiter must be ','"),
    Case("no-entity.csv", csv_bytes(frame("c-ne").drop(columns=["entity"])), "quarantined", "missing column 'entity'"),
    Case(
        "no-time.csv", csv_bytes(frame("c-nt").drop(columns=["timestamp"])), "quarantined", "missing column 'timestamp'"
    ),
    Case("extra-column.csv", csv_bytes(frame("c-extra").assign(operator="kim")), "processed"),
    Case("reordered.csv", csv_bytes(frame("c-reorder").iloc[:, ::-1]), "processed"),
    Case(
        "text-in-flow.csv",
        with_column("c-text", "flow", ["high", "low", "12,5"] + [120.0] * (ROWS - 3)),
        "quarantined",
        "non-numeric values at rows 1, 2, 3",
    ),
    Case("few-nans.csv", with_column("c-fewnan", "temperature", [nan] * 4 + [50.0] * (ROWS - 4)), "processed"),
    Case(
        "nan-burst.csv",
        with_column("c-nanburst", "temperature", [nan] * 36 + [50.0] * 4),
        "quarantined",
        "column 'temperature': 36 of 40 values missing",
    ),
    Case(
        "plus-inf.csv",
        with_column("c-pinf", "temperature", [np.inf] + [50.0] * (ROWS - 1)),
        "quarantined",
        "column 'temperature': 1 of 40 values outside the physical range [-20.0, 150.0] at rows 1",
    ),
    Case(
        "minus-inf.csv",
        with_column("c-minf", "vibration", [3.0] * 5 + [-np.inf] + [3.0] * (ROWS - 6)),
        "quarantined",
        "column 'vibration': 1 of 40 values outside the physical range [0.0, 50.0] at rows 6",
    ),
    Case(
        "out-of-range.csv",
        with_column("c-range", "pressure", [5.0] * 9 + [99.0] + [5.0] * (ROWS - 10)),
        "quarantined",
        "column 'pressure': 1 of 40 values outside the physical range [0.0, 25.0] at rows 10",
    ),
    Case(
        "negative-flow.csv",
        with_column("c-neg", "flow", [-5.0] + [150.0] * (ROWS - 1)),
        "quarantined",
        "column 'flow': 1 of 40 values outside",
    ),
    Case(
        "bad-time.csv",
        with_column("c-badtime", "timestamp", ["yesterday"] + list(frame("x").timestamp[1:])),
        "processed",
        "line 'c-badtime': column 'timestamp': 1 of 40 values unparseable or empty at rows 1",
        quarantined_rows=1,
    ),
    Case(
        "epoch-time.csv",
        with_column("c-epoch", "timestamp", [str(1767225600 + 10 * i) for i in range(ROWS)]),
        "quarantined",
        "unparseable or empty",
    ),
    # A line's rows out of order are put in order; a reading sent twice is dropped once.
    Case("unsorted.csv", csv_bytes(frame("c-unsorted").iloc[[0, 1, 3, 2, *range(4, ROWS)]]), "processed"),
    Case(
        "duplicated-time.csv",
        csv_bytes(pd.concat([frame("c-dup").iloc[:6], frame("c-dup").iloc[5:]])),
        "processed",
        duplicate_rows=1,
    ),
    Case(
        "conflicting-time.csv",
        csv_bytes(pd.concat([frame("c-conflict").iloc[:6], frame("c-conflict").iloc[5:].assign(flow=111.0)])),
        "processed",
        "line 'c-conflict': columns 'entity', 'timestamp': 2 rows share an (entity, timestamp) pair at rows 6, 7",
        quarantined_rows=2,
    ),
    Case(
        "future.csv",
        csv_bytes(frame("c-future", start=pd.Timestamp("2099-01-01T00:00:00Z"))),
        "quarantined",
        "timestamps in the future",
    ),
    Case("mixed-offsets.csv", _mixed_offsets("c-offsets"), "processed"),
    Case(
        "naive-and-zoned.csv",
        _naive_and_zoned("c-naive"),
        "quarantined",
        "mixed naive and zoned times) at rows 1, 2, 3, 4, 5",
    ),
    Case("utf8-bom.csv", b"\xef\xbb\xbf" + csv_bytes(frame("c-bom")), "processed"),
    Case("crlf.csv", csv_bytes(frame("c-crlf"), lineterminator="\r\n"), "processed"),
    Case("compressed.csv.gz", gzip.compress(csv_bytes(frame("c-gz"))), "processed"),
    Case("gzip-named-plain.csv", gzip.compress(csv_bytes(frame("c-gzcsv"))), "processed"),
    Case(
        "truncated.parquet",
        lambda tmp: parquet_bytes(frame("c-trunc"), tmp)[:300],
        "quarantined",
        "truncated.parquet: cannot be read as .parquet",
    ),
    Case("binary.csv", bytes(range(256)) * 8, "quarantined", "binary.csv: not UTF-8 text at byte"),
    Case("Prüfstand Linie 3 ä.csv", csv_bytes(frame("c-nonascii")), "processed"),
    Case("with space in name.csv", csv_bytes(frame("c-space")), "processed"),
    Case("sql-entity.csv", csv_bytes(frame("line'); DROP TABLE batches;--")), "processed"),
    Case(
        "workbook.xlsx",
        b"PK\x03\x04 not really a workbook",
        "quarantined",
        "workbook.xlsx: unsupported file type .xlsx",
    ),
    Case(
        "ragged.csv",
        csv_bytes(frame("c-ragged")) + b"c-ragged,2026-02-01T01:00:00Z,1,2,3,4,5,0,extra,fields\n",
        "quarantined",
        "ragged.csv: 1 rows do not hold the header's 8 fields: row 41 has 10",
    ),
    Case(
        "short-rows.csv",
        lambda tmp: _drop_last_field(csv_bytes(frame("c-short")), rows=(3, 7)),
        "quarantined",
        "short-rows.csv: 2 rows do not hold the header's 8 fields: row 3 has 7, row 7 has 7",
    ),
    Case(
        "cut-off.csv",
        csv_bytes(frame("c-cut")).rstrip(b"\n").rsplit(b",", 3)[0],
        "quarantined",
        "cut-off.csv: the file ends in the middle of row 40 (5 of 8 fields)",
    ),
    Case(
        "cut-off.csv.gz",
        gzip.compress(csv_bytes(frame("c-cutgz"))[:-9]),
        "quarantined",
        "cut-off.csv.gz: the file ends in the middle of row 40",
    ),
    Case(
        "trailing-comma.csv",
        csv_bytes(frame("c-trail")).replace(b"\n", b",\n").replace(b"anomaly,\n", b"anomaly\n", 1),
        "quarantined",
        "40 rows do not hold the header's 8 fields: row 1 has 9",
    ),
    Case(
        "label-seven.csv",
        with_column("c-l7", "anomaly", [0] * 5 + [7] + [0] * (ROWS - 6)),
        "quarantined",
        "column 'anomaly': 1 of 40 labels are not 0, 1 or empty at rows 6 (e.g. 7",
    ),
    Case(
        "label-inf.csv",
        with_column("c-linf", "anomaly", [np.inf] + [0.0] * (ROWS - 1)),
        "quarantined",
        "column 'anomaly': 1 of 40 labels are not 0, 1 or empty at rows 1 (e.g. inf)",
    ),
    Case(
        "label-huge.csv",
        with_column("c-lhuge", "anomaly", [1e300, 1e300] + [1.0] * (ROWS - 2)),
        "quarantined",
        "column 'anomaly': 2 of 40 labels are not 0, 1 or empty at rows 1, 2 (e.g. 1e+300",
    ),
    Case(
        "label-text.csv",
        with_column("c-ltext", "anomaly", ["yes"] + [0] * (ROWS - 1)),
        "quarantined",
        "column 'anomaly': 1 of 40 labels are not 0, 1 or empty at rows 1 (e.g. 'yes')",
    ),
    Case(
        "label-empty-and-digits.csv",
        with_column("c-lok", "anomaly", [None, "1", "0.0"] + [0] * (ROWS - 3)),
        "processed",
    ),
    Case(
        "repeated-header.csv",
        b"entity,timestamp,flow,flow\nx,2026-02-01T00:00:00Z,1,2\n",
        "quarantined",
        "header row repeats column(s) ['flow']",
    ),
    Case(
        "blank-entity.csv",
        with_column("c-blank", "entity", [None] + ["c-blank"] * (ROWS - 1)),
        "processed",
        "rows without a line: column 'entity': 1 of 40 values empty at rows 1",
        quarantined_rows=1,
    ),
    Case("parquet-ok.parquet", lambda tmp: parquet_bytes(frame("c-parquet"), tmp), "processed"),
    Case("zz-all-late.csv", _late("c-extra"), "late"),
]


@pytest.fixture(scope="module")
def landed(tmp_path_factory, prefect_api):
    workdir = tmp_path_factory.mktemp("bad-inputs")
    settings, config = small_config(
        workdir, initial_training={"batches": 1, "epochs": 1}, drift={"on_detect": "record"}
    )
    seed = settings.paths.landing / "000-seed.csv"
    seed.write_bytes(csv_bytes(frame("seed-line", rows=120)))
    scratch = workdir / "scratch"
    scratch.mkdir()
    for index, case in enumerate(CASES, start=1):
        content = case.content(scratch) if callable(case.content) else case.content
        path = settings.paths.landing / case.file
        path.write_bytes(content)
        os.utime(path, (1_700_000_000 + index, 1_700_000_000 + index))  # land in this order
    secret = workdir / "outside.csv"
    secret.write_bytes(csv_bytes(frame("c-outside")))
    (settings.paths.landing / "link-out.csv").symlink_to(secret)
    continual_update(config=config)
    db = Database(settings.database_url)
    with db.session() as session:
        ledger = {Path(b.source_file).name: b for b in session.scalars(select(Batch))}
        entities = set(session.scalars(select(EntityState.entity)))
    db.dispose()
    return settings, ledger, entities


@pytest.mark.parametrize("case", CASES, ids=[c.file for c in CASES])
def test_each_bad_input_ends_in_its_place(landed, case):
    settings, ledger, _ = landed
    batch = ledger[case.file]
    assert batch.status == case.ends, batch.reasons
    if case.ends == "quarantined":
        assert case.reason and case.reason in batch.reasons[0], batch.reasons  # the first reason says it
        assert all("\n" not in r and r.startswith(case.file) for r in batch.reasons)
        assert (settings.paths.quarantine / case.file).exists()
        assert batch.rows_received == batch.rows_quarantined
    elif case.ends == "processed":
        taken = case.quarantined_rows + case.duplicate_rows
        assert batch.rows_received - taken == batch.rows_scored > 0
        assert (batch.rows_quarantined, batch.rows_duplicate) == (case.quarantined_rows, case.duplicate_rows)
        assert (settings.paths.archive / case.file).exists()
        if case.reason:
            assert any(case.reason in r and r.startswith(case.file) for r in batch.reasons), batch.reasons
    else:
        assert batch.rows_late == batch.rows_received == ROWS and batch.rows_scored == 0


def test_a_symlink_out_of_the_landing_folder_is_refused_not_followed(landed):
    settings, ledger, _ = landed
    batch = ledger["link-out.csv"]
    assert batch.status == "quarantined" and "symlink points outside the landing folder" in batch.reasons[0]
    assert (settings.paths.quarantine / "link-out.csv").is_symlink()
    assert (settings.workdir / "outside.csv").exists()  # the target was never moved or read


def test_the_run_went_on_and_every_row_is_counted(landed):
    settings, ledger, entities = landed
    status = pipeline_status(settings)
    assert balanced(status) and status["batches"]["pending"] == 0
    assert "line'); DROP TABLE batches;--" in entities  # stored as data, tables intact
    assert {q["file"] for q in status["quarantined_files"]} == {c.file for c in CASES if c.ends == "quarantined"} | {
        "link-out.csv"
    }
    assert set(status["paths"]) == {"landing", "quarantine", "archive", "output"}


def test_rows_taken_out_of_a_file_are_listed_per_line_with_their_rows_and_page(landed):
    settings, _, _ = landed
    listed = {q["file"]: q for q in pipeline_status(settings)["quarantined_lines"]}
    expected = {c.file: c for c in CASES if c.ends == "processed" and c.quarantined_rows}
    assert set(listed) == set(expected)
    for name, case in expected.items():
        line = listed[name]
        assert line["rows"] == case.quarantined_rows and any(case.reason in r for r in line["reasons"])
        rows = pd.read_csv(line["rows_file"])
        assert len(rows) == case.quarantined_rows and rows["reason"].str.contains(case.reason, regex=False).all()
        assert Path(line["validation_page"]).exists()
    assert listed["blank-entity.csv"]["line"] is None and listed["bad-time.csv"]["line"] == "c-badtime"


def test_valid_labels_go_on_as_numbers(landed):
    """Empty, "1" and "0.0" are valid labels; the output holds them as numbers, so a "1" read as
    text and a 1 read as a number are one label downstream."""
    settings, ledger, _ = landed
    batch = ledger["label-empty-and-digits.csv"]
    output = pd.read_parquet(resolved_path(settings.workdir, batch.output_path))
    labels = output[output["entity"] == "c-lok"].sort_values("timestamp")["label_anomaly"].to_numpy()
    assert np.isnan(labels[0]) and labels[1:4].tolist() == [1.0, 0.0, 0.0]
