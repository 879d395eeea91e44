"""MLflow pyfunc wrapper of a registered lru-online version ("models from code").

MLflow stores this file with each registered version, so no Python object is pickled into the
registry. A version's artifacts: the checkpoint (read with `torch.load(weights_only=True)`), the
scoring setup (`scoring.json`: the log's columns, the time scale, the alarm settings) and, for
versions registered from a running pipeline, every line's carried states (`lines.parquet`).

`predict` takes raw log rows as they land (entity, timestamp, sensors; any lines, any order)
and returns per row the forecasts, the score, the anomaly flag and its threshold, each known
line starting where the pipeline left it (params `carried_states=False`: every line fresh; the
default when each file is a run of its lines).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class LRUCheckpointModel(PythonModel):
    def load_context(self, context) -> None:
        from flows.model.registry_package import ScoringSetup, read_lines
        from flows.storage.line_states import CarriedLines
        from lru_online import OnlineLearner

        self.learner = OnlineLearner.load_checkpoint(context.artifacts["checkpoint"])
        self.learner.model.eval()
        self.setup = ScoringSetup.from_json(Path(context.artifacts["scoring"]).read_text())
        lines = context.artifacts.get("lines")
        self.lines = read_lines(Path(lines)) if lines else CarriedLines()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from flows.model.raw_scoring import score_raw_rows
        from flows.storage.line_states import CarriedLines

        carried = self.lines if self.setup.starts_from_stored_states(params) else CarriedLines()
        return score_raw_rows(
            self.learner, model_input, self.setup.spec, self.setup.alarms, carried, self.setup.mixture
        )


mlflow.models.set_model(LRUCheckpointModel())
