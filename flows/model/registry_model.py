"""MLflow pyfunc wrapper of a registered lru-online checkpoint ("models from code").

MLflow stores this file with each registered version, so no Python object is pickled into the
registry. Loading reads the checkpoint with `torch.load(weights_only=True)`. `predict` takes
one entity's feature rows in time order (the `z_*`, `fresh_*`, `log1p_dt` columns and `dt`),
runs the model from a zero state and returns the forecasts.
"""

from __future__ import annotations

import mlflow
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel


class LRUCheckpointModel(PythonModel):
    def load_context(self, context) -> None:
        from lru_online import OnlineLearner

        self.learner = OnlineLearner.load_checkpoint(context.artifacts["checkpoint"])
        self.learner.model.eval()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        config = self.learner.model.config
        inputs = [c for c in model_input.columns if c.startswith(("z_", "fresh_")) or c == "log1p_dt"]
        if len(inputs) != config.n_inputs:
            raise ValueError(f"expected {config.n_inputs} feature columns (z_*, fresh_*, log1p_dt), got {inputs}")
        u = torch.tensor(model_input[inputs].to_numpy(), dtype=torch.float32)[None]
        dt = torch.tensor(model_input["dt"].to_numpy(), dtype=torch.float32)[None] if "dt" in model_input else None
        with torch.no_grad():
            forecast, _ = self.learner.model(u, None, dt)
        flat = forecast[0].reshape(len(model_input), -1).numpy()
        names = [f"h{k + 1}_{c[2:]}" for k in range(config.horizon) for c in inputs[: config.n_targets]]
        return pd.DataFrame(flat, columns=names, index=model_input.index)


mlflow.models.set_model(LRUCheckpointModel())
