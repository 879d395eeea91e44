"""Fault injection for crash tests: LRU_ONLINE_KILL_AT=<stage> SIGKILLs the process there.

Stages of one batch in `continual_update`, in order: ledger (after the ledger row exists),
validated, features, scored, updated (model updated, nothing committed), in_commit (inside the
database transaction, before it commits), committed (committed, before MLflow logging). And of a recovery of the live
model: restored (the registry's checkpoint written, the live model not yet pointed at it).
LRU_ONLINE_KILL_AFTER=<n> lets the stage pass n times before the kill.
"""

from __future__ import annotations

import os
import signal

BATCH_STAGES = ("ledger", "validated", "features", "scored", "updated", "in_commit", "committed")
RECOVERY_STAGES = ("restored",)
STAGES = BATCH_STAGES + RECOVERY_STAGES
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
