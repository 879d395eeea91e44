"""Great Expectations validation of log batches, and reading files, with named failures."""

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.ingest.expectations import suite_from_schema
from flows.ingest.landing import BatchReadError, discover, read_batch
from flows.ingest.validation import BatchValidator
from flows.settings import LogSchema, load_settings

SCHEMA = LogSchema()


@pytest.fixture(scope="module")
def validator():
    return BatchValidator(SCHEMA, suite_from_schema(SCHEMA))


def _good(n: int = 30) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "entity": "line-1",
            "timestamp": (pd.Timestamp("2026-01-01T00:00:00Z") + pd.to_timedelta(np.arange(n) * 10, unit="s")).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            ),
            "temperature": rng.uniform(40, 60, n),
            "vibration": rng.uniform(1, 5, n),
            "pressure": rng.uniform(2, 9, n),
            "flow": rng.uniform(100, 300, n),
            "motor_current": rng.uniform(20, 60, n),
            "anomaly": 0,
        }
    )
    frame.loc[::3, "pressure"] = np.nan  # a source that reports every other time is fine
    return frame


def test_a_good_batch_passes_sorted_with_parsed_times(validator):
    frame = _good()
    outcome = validator.validate(frame, "good.csv")
    assert outcome.success and outcome.reasons == []
    assert str(outcome.frame["timestamp"].dt.tz) == "UTC"


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda f: f.drop(columns=["flow"]), "good.csv: missing column 'flow'"),
        (
            lambda f: f.assign(temperature=[np.nan] * 25 + [50.0] * 5),
            "column 'temperature': 25 of 30 values missing",
        ),
        (lambda f: f.assign(flow=["12,5"] + [100.0] * 29), "column 'flow' is not numeric"),
        # A line fault in a one-line file leaves no rows: the file goes as a whole.
        (
            lambda f: f.assign(vibration=[99.0] + [2.0] * 29),
            "line 'line-1': column 'vibration': 1 of 30 values outside the physical range [0.0, 50.0] at rows 1",
        ),
        (
            lambda f: f.assign(motor_current=[50.0] * 29 + [-1.0]),
            "column 'motor_current': 1 of 30 values outside",
        ),
    ],
)
def test_a_file_fault_names_file_column_and_rows(validator, breakage, expected):
    outcome = validator.validate(breakage(_good()), "good.csv")
    assert not outcome.success
    assert any(expected in reason for reason in outcome.reasons), outcome.reasons
    assert all(reason.startswith("good.csv: ") for reason in outcome.reasons)
    assert outcome.sample_rows or "missing column" in expected


@pytest.mark.parametrize(
    "breakage, rows, expected",
    [
        (
            lambda f: f.assign(timestamp=["not a time"] + list(f.timestamp[1:])),
            [1],
            "good.csv: line 'line-1': column 'timestamp': 1 of 30 values unparseable or empty at rows 1",
        ),
        (
            lambda f: f.assign(timestamp=list(f.timestamp[:-1]) + ["2099-01-01T00:00:00Z"]),
            [30],
            "timestamps in the future at rows 30",
        ),
        (
            lambda f: f.assign(entity=[None] + ["line-1"] * 29),
            [1],
            "good.csv: rows without a line: column 'entity': 1 of 30 values empty at rows 1",
        ),
        # Two different readings for one (line, time): both rows, nothing else.
        (
            lambda f: pd.concat([f, f.iloc[[4]].assign(flow=1.0)], ignore_index=True),
            [5, 31],
            "2 rows share an (entity, timestamp) pair at rows 5, 31",
        ),
    ],
)
def test_a_row_fault_takes_out_those_rows_only(validator, breakage, rows, expected):
    broken = breakage(_good())
    outcome = validator.validate(broken, "good.csv")
    assert outcome.success and outcome.quarantined_rows == len(rows)
    assert len(outcome.frame) == len(broken) - len(rows)
    assert outcome.quarantined["file_row"].tolist() == rows
    reasons = [r for line in outcome.lines for r in line.reasons]
    assert any(expected in reason for reason in reasons), reasons
    assert (outcome.quarantined["reason"].str.contains(expected, regex=False)).all()


def test_rows_out_of_order_are_put_in_order_and_exact_duplicates_dropped(validator):
    good = _good()
    shuffled = good.sample(frac=1.0, random_state=3)
    resent = pd.concat([shuffled, good.iloc[[7, 8]]], ignore_index=True)  # two readings sent twice
    outcome = validator.validate(resent, "good.csv")
    assert outcome.success and outcome.lines == [] and outcome.duplicates == 2 and outcome.reordered > 0
    expected = validator.validate(good, "good.csv").frame
    pd.testing.assert_frame_equal(outcome.frame, expected)


def test_one_broken_line_of_a_plant_file_is_taken_out_with_its_rows(validator):
    """A plant file of three lines where one line's temperature reads 9,999 once: that line's 30
    rows go, with a reason naming it; the other 60 rows go on."""
    plant = pd.concat([_good().assign(entity=f"line-{i}") for i in (1, 2, 3)], ignore_index=True)
    plant.loc[40, "temperature"] = 9999.0  # line-2's 11th row
    outcome = validator.validate(plant, "plant.csv")
    assert outcome.success and set(outcome.frame["entity"]) == {"line-1", "line-3"} and len(outcome.frame) == 60
    [line] = outcome.lines
    assert (line.entity, line.rows) == ("line-2", 30)
    assert line.reasons == [
        "plant.csv: line 'line-2': column 'temperature': 1 of 90 values outside the physical range [-20.0, 150.0] "
        "at rows 41 (e.g. 9999.0)"
    ]
    assert outcome.quarantined["file_row"].tolist() == list(range(31, 61))
    assert outcome.result is not None  # for the Data Docs page


def test_reading_files(tmp_path):
    frame = _good()
    frame.to_csv(tmp_path / "a.csv", index=False)
    frame.to_parquet(tmp_path / "b.parquet", index=False)
    with gzip.open(tmp_path / "c.csv.gz", "wt") as handle:
        frame.to_csv(handle, index=False)
    for name in ("a.csv", "b.parquet", "c.csv.gz"):
        assert len(read_batch(tmp_path / name, SCHEMA)) == 30
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("entity,timestamp\n")
    (tmp_path / "binary.csv").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.parquet").write_bytes((tmp_path / "b.parquet").read_bytes()[:200])
    for name, message in [
        ("empty.csv", "empty.csv: the file is empty"),
        ("header.csv", "header.csv: no data rows"),
        ("binary.csv", "binary.csv: not UTF-8"),
        ("notes.txt", "notes.txt: unsupported file type"),
        ("broken.parquet", "broken.parquet: cannot be read as .parquet"),
    ]:
        with pytest.raises(BatchReadError, match=message.replace(".", r"\.")):
            read_batch(tmp_path / name, SCHEMA)


SKAB = Path(__file__).resolve().parents[3] / "shared" / "data" / "skab"


@pytest.mark.skipif(not (SKAB / "valve1").is_dir(), reason=f"SKAB data not at {SKAB}")
def test_a_users_own_format_semicolons_and_no_line_column():
    """SKAB's real files under configs/skab_backfill.yaml: `;`-separated, no line column."""
    schema = load_settings(Path(__file__).resolve().parents[2] / "configs" / "skab_backfill.yaml").log_schema
    path = SKAB / "valve1" / "8.csv"
    rows = read_batch(path, schema)
    raw = pd.read_csv(path, sep=";")
    assert len(rows) == len(raw) and set(rows["line"]) == {"skab-testbed"}
    assert np.array_equal(rows["Volume Flow RateRMS"].to_numpy(), raw["Volume Flow RateRMS"].to_numpy())
    outcome = BatchValidator(schema, suite_from_schema(schema)).validate(rows, path.name)
    assert outcome.success, outcome.reasons
    assert outcome.frame["datetime"].iloc[0] == pd.Timestamp(raw["datetime"].iloc[0], tz="UTC")
    with pytest.raises(BatchReadError, match="split by ';'; the delimiter must be ','"):
        read_batch(path, SCHEMA)


def test_discovery_skips_partial_files_and_refuses_escaping_links(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "b.csv").write_text("x")
    (landing / "a.csv").write_text("x")
    (landing / "c.csv.part").write_text("x")
    (landing / ".hidden.csv").write_text("x")
    outside = tmp_path / "secret.csv"
    outside.write_text("x")
    (landing / "link.csv").symlink_to(outside)
    ready, refused = discover(landing)
    assert sorted(f.path.name for f in ready) == ["a.csv", "b.csv"]
    assert len(refused) == 1 and "link.csv: symlink points outside the landing folder" in refused[0][1]
