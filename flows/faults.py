"""Fault injection for crash tests: LRU_ONLINE_KILL_AT=<stage> SIGKILLs the process there.

Stages of one batch in `continual_update`, in order: ledger (after the ledger row exists),
validated, features, scored, updated (model updated and the lines finished, nothing committed),
in_commit (inside the database transaction, before it commits), committed (committed, before
MLflow logging). And of a recovery of the live model: restored (the registry's checkpoint
written, the live model not yet pointed at it).
LRU_ONLINE_KILL_AFTER=<n> lets the stage pass n times before the kill.

LRU_ONLINE_PAUSE_AT=<stage> holds the process at a stage while the file LRU_ONLINE_PAUSE_FILE
exists, for tests of what goes on meanwhile: a retraining trained (challenger trained and
registered, not yet caught up or swapped in).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

BATCH_STAGES = ("ledger", "validated", "features", "scored", "updated", "in_commit", "committed")
RECOVERY_STAGES = ("restored",)
RETRAIN_STAGES = ("retrain_trained",)
STAGES = BATCH_STAGES + RECOVERY_STAGES + RETRAIN_STAGES
PAUSE_LIMIT_SECONDS = 600
_passes: dict[str, int] = {}


def checkpoint(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown fault stage {stage!r}; stages are {STAGES}")
    if os.environ.get("LRU_ONLINE_KILL_AT") != stage:
        return
    seen = _passes.get(stage, 0)
    _passes[stage] = seen + 1
    if seen >= int(os.environ.get("LRU_ONLINE_KILL_AFTER", "0")):
        os.kill(os.getpid(), signal.SIGKILL)


def pause(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown fault stage {stage!r}; stages are {STAGES}")
    if os.environ.get("LRU_ONLINE_PAUSE_AT") != stage:
        return
    hold = Path(os.environ["LRU_ONLINE_PAUSE_FILE"])
    deadline = time.monotonic() + PAUSE_LIMIT_SECONDS
    while hold.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
