"""A 1,000,000-row file is processed in parts with flat memory, every row counted."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.flows.helpers import small_config

# A million-row file through the pipeline twice: about 50 s.
pytestmark = pytest.mark.slow

DRIVER = textwrap.dedent(
    """
    import json, resource, sys
    from flows.model.initial_training import train_initial
    from flows.orchestrate.pipeline import Pipeline
    from flows.settings import load_settings

    pipeline = Pipeline(load_settings(sys.argv[1]))
    pipeline.discover()
    train_initial(pipeline.live, pipeline.tracker, pipeline.initial_frames())
    results = [pipeline.process(batch_id) for batch_id in pipeline.ledger.pending()]
    status = pipeline.ledger.accounting()
    print(json.dumps({"peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "rows": status["rows"],
                      "statuses": [r.status for r in results]}))
    """
)


def _write_log(path: Path, rows: int, entity: str) -> None:
    rng = np.random.default_rng(rows)
    stamps = pd.Timestamp("2026-03-01T00:00:00Z") + pd.to_timedelta(np.arange(rows) * 2.0, unit="s")
    load = 0.6 + 0.3 * np.sin(np.arange(rows) / 500)
    frame = pd.DataFrame(
        {
            "entity": entity,
            "timestamp": stamps.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "temperature": 40 + 30 * load + rng.normal(0, 0.3, rows),
            "vibration": 2 + 3 * load + rng.normal(0, 0.2, rows),
            "pressure": 2 + 8 * load + rng.normal(0, 0.2, rows),
            "flow": 100 + 250 * load + rng.normal(0, 4, rows),
            "motor_current": 20 + 50 * load + rng.normal(0, 1, rows),
        }
    )
    frame.to_csv(path, index=False)


def _process(workdir: Path, rows: int) -> dict:
    settings, config = small_config(
        workdir,
        model={"d_model": 4, "d_state": 4, "n_layers": 1},
        update={"window": 512, "replay_capacity": 8, "replay_batch": 0},
        initial_training={"batches": 1, "epochs": 1},
        ingest={"chunk_rows": 100_000},
        # The consistency regression walks a line's rows in blocks of 4, one after another (each
        # block's weights come from the rows before it): on one line of a million rows that walk
        # alone takes minutes. Its state is a fixed size per line, so memory does not depend on it.
        alarms={"consistency_rows": 0},
    )
    _write_log(settings.paths.landing / "seed.csv", 2_000, "line-x")
    _write_log(settings.paths.landing / "zz-big.csv", rows, "line-big")
    done = subprocess.run([sys.executable, "-c", DRIVER, config], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_million_rows_in_flat_memory(tmp_path):
    small = _process(tmp_path / "small", 100_000)
    big = _process(tmp_path / "big", 1_000_000)
    assert big["statuses"] == ["processed", "processed"]
    assert big["rows"] == {"received": 1_002_000, "scored": 1_002_000, "quarantined": 0, "late": 0, "duplicate": 0}
    # Ten times the rows, about the same peak: the file never sits in memory whole.
    assert big["peak_rss_kb"] < 1.25 * small["peak_rss_kb"], (small["peak_rss_kb"], big["peak_rss_kb"])
