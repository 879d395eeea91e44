"""The live fleet model of a pipeline: its committed checkpoint, loaded once and kept current.

The database row (`model_state`) says which checkpoint is live and its version; the learner in
memory is reloaded only when that version moves under it (another run's commit, a promotion).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

from flows.model.fleet import load_learner
from flows.settings import Settings
from flows.storage.database import Database
from flows.storage.line_states import StaleModel
from flows.storage.models import ModelState
from lru_online import OnlineLearner


class CheckpointRefused(RuntimeError):
    """A checkpoint that would need pickle code execution to load."""


class LiveModel:
    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.spec = settings.feature_spec
        self.learner: OnlineLearner | None = None
        self.version: int | None = None  # model_state.version the learner was loaded at

    def state(self) -> ModelState | None:
        with self.db.session() as session:
            return session.get(ModelState, self.settings.pipeline)

    def load(self) -> OnlineLearner:
        """The live learner, reloaded from its checkpoint when the committed version moved."""
        state = self.state()
        if state is None:
            raise RuntimeError("no live model yet: run initial training first")
        if self.learner is None or self.version != state.version:
            try:
                self.learner = load_learner(Path(state.checkpoint_path), self.settings)
            except FileNotFoundError:
                # A concurrent run committed a newer checkpoint and removed this one.
                raise StaleModel(f"checkpoint {state.checkpoint_path} was replaced") from None
            except pickle.UnpicklingError as error:
                raise CheckpointRefused(
                    f"checkpoint {state.checkpoint_path} holds more than tensors and plain data; "
                    f"refused to load it: {str(error).splitlines()[0]}"
                ) from None
            self.version = state.version
        return self.learner

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
