"""The checking interpreter of a command (flows.ingest.check_process): files read and validated in
a second interpreter give what the driver's own check gives, the driver never imports Great
Expectations for it, and a checker that died leaves each file to the driver's own check."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from flows.ingest.check_process import NICENESS, checker, checking_interpreter
from flows.ingest.checks import check_file
from flows.ingest.expectations import ensure_suite, suite_path
from tests.flows.helpers import assert_same_outcome, small_config, small_plant

ROOT = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter, as a command's driver: this test session has imported GE already,
# and a process that has keeps checking in a thread.
DRIVER = textwrap.dedent(
    """
    import json, logging, os, pickle, sys
    from pathlib import Path
    from flows.ingest.check_process import NICENESS, checker, checking_interpreter
    from flows.orchestrate.line_work import LocalLineWork
    from flows.settings import load_settings

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    config, out, kill = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "kill"
    settings = load_settings(config)
    files = list(enumerate(sorted(settings.paths.landing.iterdir())))
    with checking_interpreter():
        used = checker() is not None
        niceness = checker().submit(os.nice, 0).result() - os.nice(0)
        if kill:  # the interpreter dies before it checks anything
            checker().submit(pow, 2, 2).result()
            for process in list(checker()._processes.values()):
                process.kill()
                process.join()
        checks, ge_in_driver = [], []
        for batch_id, check in LocalLineWork().checked_ahead(settings, files):
            checks.append((batch_id, check))
            ge_in_driver.append("great_expectations" in sys.modules)
    out.write_bytes(pickle.dumps(checks))
    print(json.dumps({"used": used, "niceness": niceness, "ge_in_driver": ge_in_driver}))
    """
)


@pytest.fixture(scope="module")
def landed(tmp_path_factory):
    settings, config = small_config(tmp_path_factory.mktemp("check-process"))
    small_plant(
        settings, entities=3, batches=4, plant_files=True, broken_batches={"wrong_schema": 1, "out_of_range": 2}
    )
    (settings.paths.landing / "zz-junk.csv").write_bytes(b"\x00\x01\x02 not a log")
    ensure_suite(settings.workdir, settings.log_schema)  # a pipeline's first run writes it
    return settings, config


def _drive(config: str, out: Path, kill: bool) -> tuple[dict, list, str]:
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, config, str(out), "kill" if kill else "keep"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), pickle.loads(out.read_bytes()), done.stderr


def test_checks_in_the_second_interpreter_match_the_drivers_and_keep_ge_out_of_it(landed, tmp_path):
    settings, config = landed
    report, checks, _ = _drive(config, tmp_path / "checks.pickle", kill=False)
    files = sorted(settings.paths.landing.iterdir())
    assert report["used"] and report["niceness"] == NICENESS  # it yields to the driver and the API
    # The driver meets GE only with the first GE result of a failure (its Data Docs page needs
    # GE anyway): never for files that pass.
    first_result = next(i for i, (_, c) in enumerate(checks) if c.outcome and c.outcome.result is not None)
    assert first_result > 0 and not any(report["ge_in_driver"][:first_result])
    assert [batch_id for batch_id, _ in checks] == list(range(len(files)))
    verdicts = []
    for path, (_, check) in zip(files, checks, strict=True):
        local = check_file(path, settings.log_schema, suite_path(settings.workdir), settings.ingest.chunk_rows)
        assert check.read_error == local.read_error, path.name
        assert check.rows == local.rows and check.groups == local.groups, path.name
        verdicts.append(None if local.outcome is None else local.outcome.success)
        if local.outcome is None:
            continue
        assert_same_outcome(check.outcome, local.outcome, path.name)
        if local.outcome.success:
            pd.testing.assert_frame_equal(pd.concat(check.parts), pd.concat(local.parts))
    assert False in verdicts and True in verdicts and any(c.read_error for _, c in checks)


def test_a_checker_that_died_leaves_every_file_to_the_driver(landed, tmp_path):
    settings, config = landed
    report, checks, log = _drive(config, tmp_path / "checks.pickle", kill=True)
    assert report["used"]
    assert len(checks) == len(list(settings.paths.landing.iterdir()))
    assert all(check is None for _, check in checks)  # continual_update validates these itself
    assert "validating it in the driver" in log


def test_a_process_that_has_ge_already_checks_in_a_thread():
    import great_expectations  # noqa: F401  (this test session's, as a long-lived process's)

    with checking_interpreter():
        assert checker() is None
