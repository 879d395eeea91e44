"""The `lru-online` command line."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from flows.ingest.check_process import checker, checking_for_command
from flows.secrets import install_log_masking, mask_secrets

install_log_masking()

# A fresh ephemeral Prefect API migrates its database first; 20 s (Prefect's default wait) is
# not always enough on a 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# The local API's telemetry heartbeat writes to its SQLite file and collides with flow runs.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

app = typer.Typer(
    help="Continual online learning on factory logs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default: embedded defaults).")]
WorkdirOption = Annotated[Path | None, typer.Option("--workdir", "-w", help="Work folder (overrides the config).")]


def _settings(config: Path | None, workdir: Path | None):
    from flows.settings import ConfigError, load_settings
    from flows.storage.database import DatabaseError

    try:
        settings = load_settings(config, workdir)
        # Prefect's local state (flow runs of the local API) belongs to the work folder, so one
        # plant's history is not split from, or mixed with, another's in ~/.prefect.
        os.environ.setdefault("PREFECT_HOME", str(settings.workdir / ".prefect"))
        if settings.prefect.api_url:
            # Flows started from here report to the configured server instead of a local API.
            os.environ["PREFECT_API_URL"] = settings.prefect.api_url
        elif "PREFECT_API_URL" not in os.environ:
            from flows.orchestrate.local_server import running_server_url

            # While `serve` runs the work folder's Prefect server, report to it rather than
            # open its database beside it with a temporary API.
            if served := running_server_url(settings.workdir):
                os.environ["PREFECT_API_URL"] = served
        from flows.storage.database import Database

        Database(settings.database_url).migrate()
        settings.ensure_folders()
        return settings
    except (ConfigError, DatabaseError) as error:
        typer.echo(f"error: {mask_secrets(str(error))}", err=True)
        raise typer.Exit(2) from None


def _has_work(settings) -> bool:
    from flows.storage.database import Database
    from flows.storage.ledger import Ledger

    db = Database(settings.database_url)
    try:
        ledger = Ledger(db, settings.workdir, settings.paths.archive, settings.paths.quarantine)
        return ledger.has_work(settings.paths.landing)
    finally:
        db.dispose()


_exit_status: int | None = None  # the command's, once it has ended with one (main)


def main() -> None:
    """`lru-online` (and `python -m flows`): the commands below, then an exit without the
    interpreter's teardown (`_exit_now`)."""
    global _exit_status
    atexit.register(_exit_now)  # before any command's imports: every handler they add runs first
    try:
        app()
    except SystemExit as stop:
        _exit_status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        raise
    _exit_status = 0


def _exit_now() -> None:
    """The last exit handler of a command that ended with a status: flushes what is left and
    exits. After Prefect's workers have sent their events and logs and the temporary API has
    stopped (their handlers ran before this one), tearing down the interpreter's modules
    (torch, MLflow, Prefect, Great Expectations) only costs time: about 2.4 s of a run on 2
    cores. An exception that escaped the command (no status) exits the usual way."""
    status = _exit_status
    if status is None:
        return
    logging.shutdown()  # its own exit handler was registered before this one, so runs after it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@contextlib.contextmanager
def _early_api(settings) -> Iterator:
    """Prefect's temporary API for this command, started now (flows.orchestrate.temporary_api);
    an API that cannot start is a clear error, not a traceback."""
    from flows.orchestrate.local_server import ServerUnavailable
    from flows.orchestrate.temporary_api import TemporaryApi

    try:
        with TemporaryApi(settings.workdir) as api:
            yield api
    except ServerUnavailable as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None


def _import_while_api_boots() -> None:
    """Imports MLflow while Prefect's API boots on the other core (about 1 s on 2 cores): the
    first file's tracking would otherwise wait for it after the API is up. Great Expectations
    is the checking interpreter's (flows.ingest.check_process), or this process's where there
    is none."""
    import mlflow  # noqa: F401

    if checker() is None:
        import great_expectations  # noqa: F401


@contextlib.contextmanager
def _flows_without_heartbeats() -> Iterator[None]:
    """Prefect's flow-run heartbeats off for the flows this command runs in its own process,
    unless the environment or the Prefect profile sets their frequency. Why: the heartbeat
    thread sleeps in steps of one second and the end of every flow run joins it, so each
    command ended 0-1 s (0.5 s on average) after its work was done. The heartbeats feed a
    zombie-run automation, which one who set it up configures; a command's caller has its
    exit status. Flow runs of `serve` (Prefect's runner, processes of their own) keep Prefect's
    setting."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    if "heartbeat_frequency" in get_current_settings().flows.model_fields_set:
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def _config_arg(config: Path | None) -> str | None:
    return str(config.resolve()) if config else None


@app.command()
def simulate(
    workdir: WorkdirOption = None,
    config: ConfigOption = None,
    entities: Annotated[int, typer.Option(help="Production lines.")] = 3,
    batches: Annotated[int, typer.Option(help="Batches per line.")] = 36,
    rows: Annotated[int, typer.Option(help="Rows per line and batch.")] = 240,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 7,
    plant_files: Annotated[
        bool, typer.Option("--plant-files", help="One file per batch holding every line's rows.")
    ] = False,
) -> None:
    """Writes simulated factory logs into the landing folder (ground truth beside it)."""
    from flows.ingest.simulator import SimulationConfig
    from flows.ingest.simulator import simulate as run_simulation

    settings = _settings(config, workdir)
    sim = SimulationConfig(entities=entities, batches=batches, rows_per_batch=rows, seed=seed, plant_files=plant_files)
    if batches < 36:  # the drifts and broken files at the same share of the run
        scale = batches / 36
        sim.gradual_drift_start = int(14 * scale)
        sim.gradual_drift_batches = max(1, int(8 * scale))
        sim.abrupt_drift_batch = int(26 * scale)
        sim.broken_batches = {kind: int(at * scale) for kind, at in sim.broken_batches.items()}
    truth = run_simulation(settings.paths.landing, settings.workdir / "ground_truth.json", sim, settings.log_schema)
    typer.echo(
        f"wrote {len(truth.files)} files ({len(truth.broken_files)} broken) to {settings.paths.landing}; "
        f"ground truth in {settings.workdir / 'ground_truth.json'}"
    )


@app.command()
def run(config: ConfigOption = None, workdir: WorkdirOption = None, max_batches: int | None = None) -> None:
    """Runs continual_update once now over the landing folder (when it holds anything to do)."""
    settings = _settings(config, workdir)
    if not _has_work(settings):
        # Nothing landed or pending: no flow run, so no Prefect API to start (seconds), no
        # model or MLflow to load. A scheduled deployment runs the flow itself and is unaffected.
        typer.echo(json.dumps({"processed": 0, "quarantined": 0, "late": 0, "skipped": 0, "idle": 1}))
        return
    # Both start before the flows' imports.
    with _early_api(settings) as api, checking_for_command(settings.prefect.dask_address):
        from flows.orchestrate.prefect_flows import continual_update

        _import_while_api_boots()
        api.ready()
        with _flows_without_heartbeats():
            result = continual_update(
                config=_config_arg(config), workdir=str(settings.workdir), max_batches=max_batches
            )
    typer.echo(json.dumps(result["run"]))


@app.command()
def backfill(
    source: Annotated[Path, typer.Argument(help="Folder of historical log files.")],
    config: ConfigOption = None,
    workdir: WorkdirOption = None,
) -> None:
    """Replays a folder of historical files in time order, with a progress bar."""
    settings = _settings(config, workdir)
    if not source.is_dir():
        typer.echo(f"error: {source} is not a folder", err=True)
        raise typer.Exit(2)
    with _early_api(settings) as api, checking_for_command(settings.prefect.dask_address):
        from flows.orchestrate.prefect_flows import backfill as backfill_flow
        from flows.orchestrate.prefect_flows import backfill_files
        from flows.orchestrate.progress import LedgerProgress

        _import_while_api_boots()
        api.ready()
        with LedgerProgress(settings, files=len(backfill_files(source))), _flows_without_heartbeats():
            result = backfill_flow(
                source=str(source.resolve()), config=_config_arg(config), workdir=str(settings.workdir)
            )
    typer.echo(json.dumps({"files": result["files"], "batches": result.get("batches"), "rows": result.get("rows")}))


@app.command()
def retrain(
    config: ConfigOption = None,
    workdir: WorkdirOption = None,
    trigger: Annotated[str, typer.Option(help="Why: manual, or drift (an update run started it).")] = "manual",
    drift_event_id: Annotated[int | None, typer.Option(help="The drift event that asked for it.")] = None,
) -> None:
    """Trains a challenger on the recent window now; promotes it only if it wins."""
    settings = _settings(config, workdir)
    from flows.orchestrate.prefect_flows import retrain_flow

    with _flows_without_heartbeats():
        outcome = retrain_flow(
            config=_config_arg(config), workdir=str(settings.workdir), trigger=trigger, drift_event_id=drift_event_id
        )
    typer.echo(outcome["reason"])


@app.command()
def recover(config: ConfigOption = None, workdir: WorkdirOption = None) -> None:
    """Restores a missing or unreadable live checkpoint from the registry's newest live version."""
    settings = _settings(config, workdir)
    from flows.model.recovery import NoRegisteredVersion, NothingToRecover, restore_live_model
    from flows.orchestrate.pipeline import Pipeline

    pipeline = Pipeline(settings)
    try:
        recovery = restore_live_model(pipeline.live, pipeline.tracker, pipeline.ledger, trigger="command")
    except NothingToRecover as nothing:
        typer.echo(str(nothing))
        return
    except NoRegisteredVersion as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    finally:
        pipeline.close()
    typer.echo(recovery.describe())


@app.command()
def serve(config: ConfigOption = None, workdir: WorkdirOption = None) -> None:
    """Deploys continual_update on its schedule and retrain on the drift event.

    With `prefect.work_pool` set they register on the server's work pool and its workers run
    them. Otherwise this process serves them until stopped, against `prefect.api_url` when set,
    else against a Prefect server of the work folder that it starts and stops itself.
    """
    settings = _settings(config, workdir)
    from flows.orchestrate.local_server import LocalPrefectServer, ServerUnavailable, running_server_url

    try:
        if served := running_server_url(settings.workdir):
            raise ServerUnavailable(
                f"{settings.workdir} is already served at {served}: stop that `lru-online serve` first"
            )
        api_url = os.environ.get("PREFECT_API_URL")
        if settings.prefect.work_pool or api_url:
            _serve_on_server(settings, config, api_url)
            return
        server = LocalPrefectServer(settings.workdir, settings.prefect.local_port)
        typer.echo(f"starting a Prefect server of {settings.workdir} on {server.ui_url} ...")
        with server:
            # Before Prefect is imported: its settings are read once, at import.
            os.environ["PREFECT_API_URL"] = server.api_url
            _serve_here(
                settings, config, server.ui_url, f"Ctrl+C or SIGTERM stops serving and the server ({server.home})."
            )
    except ServerUnavailable as refusal:
        typer.echo(f"error: cannot schedule: {refusal}", err=True)
        raise typer.Exit(2) from None


def _serve_on_server(settings, config: Path | None, api_url: str | None) -> None:
    """Deployments on a Prefect server that runs elsewhere: on its work pool, or served here."""
    from flows.orchestrate.local_server import ServerUnavailable, api_answers

    if not api_url:
        raise ServerUnavailable(
            f"prefect.work_pool is {settings.prefect.work_pool!r} but no Prefect server is set: set prefect.api_url"
        )
    if not api_answers(api_url):
        raise ServerUnavailable(f"the Prefect API at {api_url} does not answer (is its server running?)")
    if settings.prefect.work_pool:
        from flows.orchestrate.deployments import deploy_to_work_pool

        for flow_name, deployment_id in deploy_to_work_pool(settings, _config_arg(config)).items():
            typer.echo(f"{flow_name}: deployment {deployment_id} on work pool {settings.prefect.work_pool}")
        return
    _serve_here(settings, config, api_url.removesuffix("/api"), "Ctrl+C or SIGTERM stops serving.")


def _serve_here(settings, config: Path | None, ui_url: str, how_to_stop: str) -> None:
    from flows.orchestrate.deployments import serve_deployments

    every = (
        f"cron {settings.schedule.cron!r}"
        if settings.schedule.cron
        else f"every {settings.schedule.interval_seconds} s"
    )
    prefix = settings.prefect.deployment_prefix
    typer.echo(
        "\n".join(
            [
                f"Prefect UI: {ui_url}/deployments (flow runs: {ui_url}/runs)",
                f"MLflow UI:  lru-online ui --workdir {settings.workdir}  (then http://127.0.0.1:5000)",
                f"deployment continual-update/{prefix}-continual-update runs {every};",
                f"deployment retrain/{prefix}-retrain runs on the event {settings.drift.event_name}.",
                how_to_stop,
            ]
        )
    )
    serve_deployments(settings, _config_arg(config))


@app.command()
def ui(
    config: ConfigOption = None,
    workdir: WorkdirOption = None,
    port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
) -> None:
    """Starts the MLflow UI on the configured tracking store."""
    settings = _settings(config, workdir)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        settings.tracking.tracking_uri,
        "--host",
        host,
        "--port",
        str(port),
    ]
    typer.echo(f"MLflow UI on http://{host}:{port} (Ctrl+C stops it)")
    raise typer.Exit(subprocess.call(command))


@app.command()
def status(
    config: ConfigOption = None,
    workdir: WorkdirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Where every batch and row ended up, drift events and the model registry."""
    settings = _settings(config, workdir)
    from flows.monitor.status import pipeline_status

    report = pipeline_status(settings)
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    typer.echo(_summary(report))


def _summary(report: dict) -> str:
    b, r = report["batches"], report["rows"]
    recoveries = [
        f"recovered: {item['at']} live model restored from version {item['restored_version']} "
        f"({item['restored_kind']}, by {item['trigger']}): {item['reason']}"
        for item in report.get("recoveries", [])
    ]
    return "\n".join(
        [
            f"batches: {b['processed']} processed, {b['quarantined']} quarantined, {b['duplicate']} duplicate, "
            f"{b['late']} late, {b['pending']} pending",
            f"rows:    {r['received']} received = {r['scored']} scored + {r['quarantined']} quarantined"
            f" + {r['late']} late + {r['duplicate']} duplicate",
            *(
                [f"lines quarantined in files that went on: {len(report['quarantined_lines'])}"]
                if report.get("quarantined_lines")
                else []
            ),
            f"anomaly alarms: {report['anomaly_alarms']['alarms']} on {report['anomaly_alarms']['lines']} line(s),"
            f" {report['anomaly_alarms']['rows']} rows, {report['anomaly_alarms']['plant_alarms']} plant-level",
            *(
                [
                    f"latest plant-level alarm: {plant['lines']} lines from {plant['start']} to {plant['end']}"
                    for plant in report["anomaly_alarms"]["latest_plant"][:1]
                ]
            ),
            f"drift events: {report['drift_events']}",
            f"model versions: {report['model_versions']}, champion: version {report['champion_version']}",
            *recoveries,
        ]
    )


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="Folder for everything the demo writes.")] = Path(
        "demo-work"
    ),
) -> None:
    """Simulates a plant, trains, streams the batches through drift, retrains and promotes."""
    import time

    workdir = workdir.resolve()
    started = time.perf_counter()
    settings = _settings(None, workdir)
    if not any(settings.paths.landing.iterdir()) and not (workdir / "ground_truth.json").exists():
        simulate(workdir=workdir, config=None)
    from flows.monitor.status import pipeline_status
    from flows.orchestrate.prefect_flows import continual_update

    with _flows_without_heartbeats():
        continual_update(workdir=str(workdir))
    report = pipeline_status(settings)
    typer.echo("\n" + _summary(report))
    typer.echo(f"quarantined files: {[q['file'] for q in report['quarantined_files']]}")
    typer.echo(_demo_scores(settings, workdir / "ground_truth.json"))
    typer.echo(f"demo finished in {time.perf_counter() - started:.0f} s")
    typer.echo(f"open the model registry: lru-online ui --workdir {workdir}  (then http://127.0.0.1:5000)")


def _demo_scores(settings, truth_path: Path) -> str:
    """The demo's alarms and drift detections against the simulator's ground truth."""
    from sqlalchemy import select

    from flows.monitor.alarm_scoring import alarm_scores, drift_delays
    from flows.storage.database import Database
    from flows.storage.models import DriftEvent

    truth = json.loads(truth_path.read_text())
    scores = alarm_scores(sorted((settings.paths.output / "batches").glob("*.parquet")), truth["anomalies"])
    db = Database(settings.database_url)
    try:
        with db.session() as session:
            detections = [
                {
                    "detector": e.detector,
                    "feature": e.feature,
                    "entity": e.entity,
                    "event_time": e.event_time.isoformat(),
                }
                for e in session.scalars(select(DriftEvent).order_by(DriftEvent.event_time))
            ]
    finally:
        db.dispose()
    lines = [
        f"alarms against ground_truth.json: precision {scores['precision']}, recall {scores['recall']}, "
        f"F1 {scores['f1']} over {scores['rows']} rows ({scores['labelled_rows']} labelled, "
        f"{scores['alarmed_rows']} alarmed); {scores['anomalies_caught']} of {scores['anomalies']} labelled "
        f"anomalies caught; {scores['false_alarms_per_1000_normal_rows']} false alarms per 1,000 normal rows",
    ]
    for delay in drift_delays(truth["drifts"], detections):
        found = f"detected {delay['delay']} later by {delay['by']}" if delay["detected"] else "not detected"
        lines.append(f"{delay['kind']} drift from {delay['starts']}: {found}")
    return "\n".join(lines)


validation_app = typer.Typer(help="The Great Expectations suite that landing files are validated against.")
app.add_typer(validation_app, name="validation")


@validation_app.command("init")
def validation_init(
    config: ConfigOption = None,
    workdir: WorkdirOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing suite (edits in it are lost).")] = False,
) -> None:
    """Generates the expectation suite from the log schema into <workdir>/gx."""
    settings = _settings(config, workdir)
    from flows.ingest.expectations import SuiteExists, write_suite

    try:
        path = write_suite(settings.workdir, settings.log_schema, replace=force)
    except SuiteExists as exists:
        typer.echo(f"error: {exists}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {path}")


@validation_app.command("show")
def validation_show(config: ConfigOption = None, workdir: WorkdirOption = None) -> None:
    """Prints the suite file and its expectations, one per line."""
    settings = _settings(config, workdir)
    from flows.ingest.expectations import generated_from_other_schema, load_suite, suite_path

    path = suite_path(settings.workdir)
    if not path.exists():
        typer.echo(f"no suite at {path} yet: `lru-online validation init` writes it (the first run does too)")
        raise typer.Exit(1)
    suite = load_suite(path)
    typer.echo(f"{path}: suite {suite.name!r}, {len(suite.expectations)} expectations")
    if generated_from_other_schema(path, settings.log_schema):
        typer.echo("  (not generated from the configured log schema: edited, or the schema changed)")
    for expectation in suite.expectations:
        config_ = expectation.configuration
        arguments = {k: v for k, v in config_.kwargs.items() if k not in ("batch_id",)}
        shown = ", ".join(f"{k}={v}" for k, v in arguments.items())
        typer.echo(f"  {config_.type}({shown})" + (f"  # {expectation.notes}" if expectation.notes else ""))


@app.command()
def docs(
    config: ConfigOption = None,
    workdir: WorkdirOption = None,
    port: Annotated[int | None, typer.Option(help="Port (default: validation.docs_port).")] = None,
) -> None:
    """Serves the Great Expectations Data Docs of quarantined files on 127.0.0.1."""
    import functools
    import http.server

    settings = _settings(config, workdir)
    from flows.ingest.validation_docs import docs_site

    site = docs_site(settings.workdir)
    if not (site / "index.html").exists():
        typer.echo(f"no Data Docs in {site} yet: they are built when a file is quarantined")
        raise typer.Exit(1)
    port = port or settings.validation.docs_port
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        typer.echo(f"Data Docs on http://127.0.0.1:{port}/index.html (Ctrl+C stops)")
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()


infra_app = typer.Typer(help="The real services of the servers profile on this machine (127.0.0.1).")
app.add_typer(infra_app, name="infra")
InfraDirOption = Annotated[Path, typer.Option("--dir", help="Folder for the services' data, logs and pid files.")]


@infra_app.command("up")
def infra_up(
    folder: InfraDirOption = Path(".infra"),
    only: Annotated[list[str] | None, typer.Option(help="Start only this service (repeatable).")] = None,
) -> None:
    """Starts Postgres, the S3 store, MLflow, the Prefect server and worker, Dask; waits until ready."""
    from infra import services

    try:
        typer.echo(json.dumps(services.up(folder, only), indent=2))
    except services.ServiceError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None


@infra_app.command("down")
def infra_down(folder: InfraDirOption = Path(".infra")) -> None:
    """Stops every service started with `infra up` in this folder."""
    from infra import services

    services.down(folder)


@infra_app.command("status")
def infra_status(folder: InfraDirOption = Path(".infra")) -> None:
    """Whether each service answers; exits 1 when one does not."""
    from infra import services

    report = services.status(folder)
    typer.echo(json.dumps(report, indent=2))
    raise typer.Exit(0 if all(state == "up" for state in report.values()) else 1)


@app.command()
def version() -> None:
    """Prints the installed version."""
    from importlib.metadata import version as installed

    typer.echo(installed("lru-online"))
