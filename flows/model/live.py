"""The live fleet model of a pipeline: its committed checkpoint, loaded once and kept current.

The database row (`model_state`) says which checkpoint is live and its version; the learner in
memory is reloaded only when that version moves under it (another run's commit, a promotion).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.orm import undefer

from flows.model.fleet import load_learner
from flows.settings import Settings
from flows.storage.database import Database
from flows.storage.line_states import StaleModel
from flows.storage.models import ModelState
from flows.storage.work_folder import remove_inside, resolved_path
from lru_online import OnlineLearner


class CheckpointRefused(RuntimeError):
    """A checkpoint that would need pickle code execution to load."""


class CheckpointMissing(RuntimeError):
    """The committed live checkpoint is gone or unreadable; the message names the file."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(
            f"the live model's checkpoint {path} {why}; `lru-online recover` restores the live model "
            f"from the registry (recovery.on_missing_checkpoint: restore does it in the run)"
        )
        self.path = path


class LiveModel:
    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.spec = settings.feature_spec
        self.learner: OnlineLearner | None = None
        self.version: int | None = None  # model_state.version the learner was loaded at

    def state(self) -> ModelState | None:
        """The live model's row, its drift reference included."""
        with self.db.session() as session:
            return session.get(ModelState, self.settings.pipeline, options=[undefer(ModelState.reference)])

    def _row(self) -> ModelState | None:
        """The row without its drift reference: what a version check reads."""
        with self.db.session() as session:
            return session.get(ModelState, self.settings.pipeline)

    def load(self) -> OnlineLearner:
        """The live learner, reloaded from its checkpoint when the committed version moved."""
        state = self._row()
        if state is None:
            raise RuntimeError("no live model yet: run initial training first")
        if self.learner is None or self.version != state.version:
            path = self.checkpoint(state)
            try:
                self.learner = load_learner(path, self.settings)
            except FileNotFoundError:
                if self._moved_on(state):  # a concurrent run committed a newer one and removed it
                    raise StaleModel(f"checkpoint {path} was replaced") from None
                raise CheckpointMissing(path, "does not exist") from None
            except pickle.UnpicklingError as error:
                if not zipfile.is_zipfile(path):  # torch writes zip archives: this is no checkpoint
                    raise CheckpointMissing(path, "cannot be read (not a checkpoint file)") from None
                raise CheckpointRefused(
                    f"checkpoint {path} holds more than tensors and plain data; "
                    f"refused to load it: {str(error).splitlines()[0]}"
                ) from None
            except (RuntimeError, EOFError, OSError, KeyError) as error:
                if self._moved_on(state):
                    raise StaleModel(f"checkpoint {path} was replaced") from None
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise CheckpointMissing(path, f"cannot be read ({reason})") from None
            self.version = state.version
        return self.learner

    def checkpoint(self, state: ModelState) -> Path:
        """The live checkpoint's file in this work folder."""
        return resolved_path(self.settings.workdir, state.checkpoint_path)

    def _moved_on(self, loaded: ModelState) -> bool:
        current = self._row()
        return current is not None and current.version != loaded.version

    def remove_checkpoint(self, stored: str) -> None:
        """Deletes a checkpoint no longer live; never a file outside this work folder's
        checkpoints (a path stored by another folder's run)."""
        remove_inside(self.settings.paths.checkpoints, resolved_path(self.settings.workdir, stored))

    def drop(self) -> None:
        """Forgets the in-memory learner: the next use loads the committed one."""
        self.learner = None

    def reference(self) -> dict:
        state = self.state()
        return state.reference if state is not None and state.reference else {}

    def update_state(self, change: Callable[[ModelState], None]) -> None:
        """Applies `change(model_state)` in a transaction, keeping the loaded learner current
        when the change does not touch its checkpoint."""
        with self.db.session() as session:
            state = session.get(ModelState, self.settings.pipeline)
            before, checkpoint = state.version, state.checkpoint_path
            change(state)
            session.flush()
            after, same_checkpoint = state.version, state.checkpoint_path == checkpoint
        if same_checkpoint and self.version == before:
            self.version = after
