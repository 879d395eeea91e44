"""The `lru-online` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Continual online learning on factory logs.", no_args_is_help=True)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path("demo-work"),
    batches: Annotated[int, typer.Option(help="Batches of the simulated stream.")] = 40,
) -> None:
    """Streams a simulated sensor log through an online LRU forecaster, batch by batch."""
    import torch

    from lru_online import LearnerConfig, LRUForecaster, ModelConfig, OnlineLearner

    torch.manual_seed(0)
    workdir.mkdir(parents=True, exist_ok=True)
    model = LRUForecaster(ModelConfig(n_inputs=3, n_targets=3, d_model=32, d_state=32))
    learner = OnlineLearner(model, LearnerConfig(learning_rate=3e-3, window=32))
    state, position = None, 0
    for index in range(batches):
        t = torch.arange(position, position + 256, dtype=torch.float32)
        position += 256
        signal = torch.stack([torch.sin(t / 8), torch.cos(t / 13), torch.sin(t / 5) * torch.cos(t / 29)], -1)
        signal = (signal + 0.05 * torch.randn_like(signal))[None]
        step = learner.learn(signal, signal, state)
        state = step.scored.state
        if index % 5 == 0 or index == batches - 1:
            typer.echo(f"batch {index:3d}: forecast MAE before update {step.metrics['mae_before']:.4f}")
    path = workdir / "learner.pt"
    learner.save_checkpoint(path)
    (workdir / "state.bin").write_bytes(state.to_bytes())
    typer.echo(f"checkpoint {path}; carried state {workdir / 'state.bin'} ({len(state.hidden)} layers)")


@app.command()
def version() -> None:
    """Prints the installed version."""
    from importlib.metadata import version as installed

    typer.echo(installed("lru-online"))
