"""Drift statistics and the detectors' decisions, on hand-made inputs."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from flows.monitor import drift_detectors
from flows.monitor.drift_detectors import (
    PLANT,
    LineDrift,
    adwin_fires,
    check_lines,
    grouped_ks,
    grouped_psi,
    ks_by_chance,
    plant_level,
    psi_by_chance,
)
from flows.monitor.drift_detectors import _window_stats as _window_stats
from flows.monitor.drift_statistics import Reference, ks_statistic, psi, summarise
from flows.settings import DriftSettings
from lru_online import codec

SENSORS = ("pressure",)


def test_ks_matches_scipy_and_psi_grows_with_shift():
    rng = np.random.default_rng(0)
    reference_values = rng.normal(0, 1, 1500)
    reference = summarise(reference_values, sample_size=5000)
    same, shifted = rng.normal(0, 1, 500), rng.normal(1.0, 1, 500)
    assert ks_statistic(reference, shifted) == pytest.approx(ks_2samp(reference_values, shifted).statistic)
    assert psi(reference, same) < 0.1 < 0.5 < psi(reference, shifted)
    # PSI by hand on two bins: sum (a - e) ln(a / e).
    two = Reference(edges=[0.0], fractions=[0.5, 0.5], sample=[-1.0, 1.0], mean=0.0, std=1.0)
    values = np.array([-1.0] * 30 + [1.0] * 70)
    assert psi(two, values) == pytest.approx((0.3 - 0.5) * np.log(0.3 / 0.5) + (0.7 - 0.5) * np.log(0.7 / 0.5))
    assert np.isnan(psi(two, np.array([np.nan])))


@pytest.mark.parametrize("rounding", [None, 0])  # continuous values, and values full of ties
def test_grouped_statistics_equal_each_group_alone(rounding):
    rng = np.random.default_rng(4)
    reference = summarise(rng.normal(0, 1, 3000).round(1 if rounding is not None else 12), sample_size=500)
    groups = [rng.normal(shift, 1, size) for shift, size in ((0, 40), (1.5, 160), (-0.5, 1), (0.2, 77))]
    if rounding is not None:
        groups = [g.round(rounding) for g in groups]
    values = np.concatenate(groups)
    owner = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    shuffled = rng.permutation(len(values))  # rows of different lines come in any order
    psis = grouped_psi(reference.to_dict(), values[shuffled], owner[shuffled], len(groups) + 1)
    kss = grouped_ks(reference.to_dict(), values[shuffled], owner[shuffled], len(groups) + 1)
    for index, group in enumerate(groups):
        assert psis[index] == pytest.approx(psi(reference, group), rel=1e-12)
        assert kss[index] == pytest.approx(ks_statistic(reference, group), rel=1e-12)
    assert np.isnan(psis[-1]) and np.isnan(kss[-1])  # a line without readings


SETTINGS = DriftSettings(
    cooldown_batches=3, consecutive=2, psi_threshold=1.0, error_ratio_threshold=1.5, window_batches=1
)


def _stream(maes, readings=None, settings=SETTINGS, errors=None, state=None, since=0):
    """Runs one line's detectors batch after batch; the detections of each batch."""
    rng = np.random.default_rng(0)
    reference = {"sensors": {"pressure": summarise(rng.normal(0, 1, 2000)).to_dict()}}
    state = state or LineDrift()
    fired = []
    for index, mae in enumerate(maes):
        batch_readings = readings[index] if readings is not None else rng.normal(0, 1, (100, 1))
        batch_errors = errors[index] if errors is not None else np.full(100, 0.3, np.float32)
        (check,) = check_lines(
            ["line-1"],
            [state],
            [batch_errors],
            [batch_readings],
            [mae],
            ["2026-01-01T00:00:00+00:00"],
            reference,
            SENSORS,
            settings,
            since,
        )
        state = LineDrift.from_bytes(check.state.to_bytes())  # as stored between files
        fired.append(check.detections)
    return fired, state


def test_error_jump_fires_on_the_jump_only():
    fired, _ = _stream([0.2, 0.21, 0.19, 0.2, 0.45])
    assert fired[:4] == [[], [], [], []]
    assert [d.detector for d in fired[4]] == ["error_jump"] and fired[4][0].value == pytest.approx(0.45 / 0.2)


def test_psi_needs_consecutive_batches_over_the_limit():
    rng = np.random.default_rng(1)
    calm = [rng.normal(0, 1, (100, 1)) for _ in range(5)]
    shifted = [rng.normal(3, 1, (100, 1)) for _ in range(2)]
    once, _ = _stream([0.2] * 5, calm[:4] + shifted[:1])
    assert once == [[]] * 5
    twice, _ = _stream([0.2] * 5, calm[:3] + shifted)
    assert [(d.detector, d.feature) for d in twice[4]] == [("psi", "pressure"), ("ks", "pressure")]


def test_a_reset_restarts_the_error_history_and_the_cooldown():
    _, state = _stream([0.2, 0.2, 0.2, 0.2])
    # Without a reset the jump is seen against the earlier batches...
    fired, _ = _stream([0.9], state=state, since=0)
    assert [d.detector for d in fired[0]] == ["error_jump"]
    # ... after one (a retraining at sequence 7) the line starts over: cooldown, fresh median.
    fired, after = _stream([0.9, 0.9, 0.9], state=state, since=7)
    assert fired == [[], [], []] and after.since == 7 and after.maes == [0.9, 0.9, 0.9]


def test_the_readings_window_spans_several_batches():
    settings = DriftSettings(cooldown_batches=1, window_batches=3, consecutive=1, error_ratio_threshold=100.0)
    rng = np.random.default_rng(2)
    batches = [rng.normal(0, 1, (30, 1)) for _ in range(4)]
    _, state = _stream([0.2] * 2, batches[:2], settings=settings)
    assert len(state.readings) == 2
    (check,) = check_lines(
        ["line-1"], [state], [np.full(30, 0.3, np.float32)], [batches[2]], [0.2], ["2026-01-01T00:00:00+00:00"],
        {"sensors": {"pressure": summarise(rng.normal(0, 1, 2000)).to_dict()}}, SENSORS, settings, 0,
    )  # fmt: skip
    pooled = np.concatenate(batches[:3])[:, 0]
    assert check.stats["mean"]["pressure"] == pytest.approx(pooled.mean())


def test_adwin_sees_a_change_in_the_per_event_errors():
    settings = DriftSettings(cooldown_batches=1, error_ratio_threshold=100.0, window_batches=1)
    rng = np.random.default_rng(3)
    calm = [np.abs(rng.normal(0, 0.5, 200)).astype(np.float32) for _ in range(6)]
    fired, _ = _stream([0.4] * 6, errors=calm, settings=settings)
    assert fired == [[]] * 6
    changed = calm[:5] + [np.abs(rng.normal(0, 1.5, 200)).astype(np.float32)]
    fired, _ = _stream([0.4] * 6, errors=changed, settings=settings)
    assert [d.detector for d in fired[5]] == ["adwin_error"]
    # A change inside an older batch is not reported again at the newest one.
    assert not adwin_fires(calm[:3] + changed[-1:] + [np.abs(rng.normal(0, 1.5, 200))] * 2, settings.adwin_delta)


@pytest.mark.parametrize("core", ["river's core module", "river.drift"])
def test_adwin_fires_as_rivers_own_detector_does(core, monkeypatch):
    """`adwin_fires` feeds river's window below its Python wrapper: it must decide exactly as
    river's ADWIN.update would, resets after a detection included, whether the window comes from
    river's core module (the settings written out here) or from the public class."""
    from river.drift import ADWIN

    if core == "river.drift":
        monkeypatch.setattr(drift_detectors, "AdaptiveWindowing", None)

    def rivers_answer(batches, delta):
        adwin, fired = ADWIN(delta=delta, clock=1), False
        for index, errors in enumerate(batches):
            for value in (np.clip(errors, 0, 5.0) / 5.0).tolist():
                adwin.update(value)
                fired = fired or (index == len(batches) - 1 and adwin.drift_detected)
        return fired

    rng = np.random.default_rng(11)
    answers = []
    for trial in range(40):
        levels = rng.choice([0.3, 0.5, 1.5], size=6)
        batches = [np.abs(rng.normal(0, level, 120)) for level in levels]
        delta = float(rng.choice([1e-5, 0.002]))
        answers.append(adwin_fires(batches, delta))
        assert answers[-1] == rivers_answer(batches, delta), trial
    assert True in answers and False in answers


def _detection(entity: str, detector: str = "psi") -> dict:
    return {
        "detector": detector,
        "entity": entity,
        "feature": "pressure",
        "value": 1.5,
        "threshold": 1.0,
        "event_time": f"2026-01-01T00:00:0{len(entity) % 10}+00:00",
    }


def test_detections_on_a_share_of_the_lines_are_one_plant_level_event():
    settings = DriftSettings(plant_share=0.2, plant_min_lines=3)
    local = [_detection("line-1"), _detection("line-1", "ks")]
    assert plant_level(local, 10, settings) == local  # one line: its own events
    two = [_detection("line-1"), _detection("line-2")]
    assert plant_level(two, 10, settings) == two  # 20 % of the lines, but fewer than 3
    wide = [_detection(f"line-{i}", "psi" if i % 3 else "adwin_error") for i in range(6)]
    [plant] = plant_level(wide, 10, settings)
    assert plant["entity"] == PLANT and plant["detector"] == "plant" and plant["feature"] == "psi"
    assert plant["lines"] == [f"line-{i}" for i in range(6)] and plant["value"] == pytest.approx(0.6)
    assert plant["detectors"] == {"adwin_error": 2, "psi": 4}
    assert plant["event_time"] == max(d["event_time"] for d in wide)
    assert plant_level(wide, 100, settings) == wide  # 6 of 100 lines: below the share


def test_a_retraining_request_holds_the_next_ones_back_fleet_wide(tmp_path):
    from datetime import UTC, datetime

    from flows.storage.database import Database
    from flows.storage.line_states import PartCommit, _drift_action
    from flows.storage.models import Batch, DriftEvent

    db = Database(f"sqlite:///{tmp_path}/drift.db")
    db.migrate()
    part = PartCommit(1, 0, True, 10, 0, ["line-1"], [], {}, [_detection("line-1")], "retrain", 10)
    with db.session() as session:
        session.add(Batch(id=1, content_hash="x", source_file="a.csv", size_bytes=1, status="pending"))
        session.flush()
        assert _drift_action(session, "p", part, 3) == "retrain"  # no request before
        session.add(
            DriftEvent(
                pipeline="p",
                batch_id=1,
                sequence=5,
                entity="line-1",
                detector="psi",
                value=1.0,
                threshold=1.0,
                event_time=datetime.now(UTC),
                action="retrain",
            )
        )
        session.flush()
        assert _drift_action(session, "p", part, 15) == "recorded"  # 10 files after it
        assert _drift_action(session, "p", part, 16) == "retrain"
        assert _drift_action(session, "other", part, 6) == "retrain"  # another pipeline's request
        unlimited = PartCommit(1, 0, True, 10, 0, ["line-1"], [], {}, [_detection("line-1")], "retrain", 0)
        assert _drift_action(session, "p", unlimited, 6) == "retrain"
    db.dispose()


def _regimes(rng: np.random.Generator, rows: int, rho: float) -> np.ndarray:
    """A reading that moves between operating regimes: AR(1) with lag-1 autocorrelation rho."""
    values = np.empty(rows)
    values[0] = rng.normal()
    for t in range(1, rows):
        values[t] = rho * values[t - 1] + np.sqrt(1 - rho**2) * rng.normal()
    return values


def test_psi_and_ks_limits_count_the_effective_readings_of_a_dependent_line():
    """A line whose readings wander between regimes (ρ = 0.95) passes the textbook PSI limit in
    most windows of four 40-row batches though nothing changed; the limit from its effective
    readings is passed rarely, while a 3σ shift still passes it in most windows. Independent
    readings keep the configured limits."""
    rng = np.random.default_rng(5)
    reference = summarise(np.concatenate([_regimes(rng, 400, 0.95) for _ in range(50)]), sample_size=2000)
    settings = DriftSettings(psi_threshold=1.0, ks_threshold=0.45, window_batches=4, significance=0.001)
    lines = 300
    windows = [[_regimes(rng, 160, 0.95)[k * 40 : (k + 1) * 40, None] for k in range(4)] for _ in range(lines)]
    shifted = [[batch + 3.0 for batch in window] for window in windows[:20]]
    sensors = {"sensors": {"p": reference.to_dict()}}
    stats = _window_stats(windows + shifted, [True] * (lines + 20), sensors, ("p",), settings)
    psis = np.array([s["psi"]["p"] for s in stats[:lines]])
    limits = np.array([s["psi_limit"]["p"] for s in stats[:lines]])
    assert (psis > 1.0).mean() > 0.1  # the textbook limit: a stationary line often looks drifted
    assert (psis > limits).mean() < 0.05 and limits.min() > 1.0
    caught = [s["psi"]["p"] > s["psi_limit"]["p"] or s["ks"]["p"] > s["ks_limit"]["p"] for s in stats[lines:]]
    assert np.mean(caught) >= 0.7
    independent = [[rng.normal(size=(40, 1)) for _ in range(4)] for _ in range(5)]
    loose = _window_stats(independent, [True] * 5, sensors, ("p",), settings)
    assert psi_by_chance(11, 160, 0.001) < 1.0 and ks_by_chance(160, 2000, 0.001) < 0.45
    assert all((s["psi_limit"]["p"], s["ks_limit"]["p"]) == (1.0, 0.45) for s in loose)  # the floors


def test_chance_limits_by_hand():
    # χ²(9) at 0.999 is 27.88; Wilson–Hilferty gives it within 1 %.
    assert psi_by_chance(10, 1.0, 0.001) == pytest.approx(27.88, rel=0.01)
    # Kolmogorov at α = 0.001: √(ln(2000)/2) = 1.949, times √(1/100 + 1/2000).
    assert ks_by_chance(100, 2000, 0.001) == pytest.approx(1.949 * np.sqrt(1 / 100 + 1 / 2000), rel=1e-3)


def test_the_drift_detectors_import_neither_river_drift_nor_scikit_learn():
    """Every command imports the drift detectors before its first file; `river.drift` would
    bring river's datasets and scikit-learn with it (1.2 s on 2 cores)."""
    code = (
        "import sys, flows.monitor.drift_detectors as d; "
        "d.adwin_fires([d.np.ones(50)], 0.002); "
        "print(sorted(m for m in ('river.drift', 'sklearn') if m in sys.modules))"
    )
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"


def _state(rng, batches: int, rows: int, sensors: tuple[str, ...], since: int = 0) -> LineDrift:
    """A line's carried drift state after `batches` files of `rows` rows."""
    return LineDrift(
        since=since,
        batches=batches,
        maes=rng.random(batches).tolist(),
        errors=[rng.random(rows).astype(np.float32) for _ in range(min(batches, 3))],
        readings=[np.where(rng.random((rows, len(sensors))) < 0.1, np.nan, rng.normal(size=(rows, len(sensors))))]
        * min(batches, 2),
        runs={k: {s: int(rng.integers(0, 4)) for s in sensors} for k in ("ks", "psi")},
    )


def _earlier_layout(state: LineDrift) -> bytes:
    """A record as releases before the batched codec wrote it: since, batches and the runs in
    the JSON header, so no two lines shared one."""
    sensors = sorted({s for runs in state.runs.values() for s in runs})
    values = np.concatenate(
        [np.asarray(state.maes), *(e.astype(np.float64) for e in state.errors), *(r.ravel() for r in state.readings)]
    )
    meta = {
        "kind": "LineDrift",
        "since": state.since,
        "batches": state.batches,
        "maes": len(state.maes),
        "errors": [len(e) for e in state.errors],
        "readings": [list(r.shape) for r in state.readings],
        "runs": {k: [state.runs[k].get(s, 0) for s in sensors] for k in sorted(state.runs)},
        "sensors": sensors,
    }
    return codec.encode({"values": torch.from_numpy(values)}, meta)


def _assert_same(got: LineDrift, expected: LineDrift) -> None:
    assert (got.since, got.batches, got.maes, got.runs) == (
        expected.since,
        expected.batches,
        expected.maes,
        expected.runs,
    )
    assert len(got.errors) == len(expected.errors) and len(got.readings) == len(expected.readings)
    for a, b in zip(got.errors, expected.errors, strict=True):
        assert a.dtype == np.float32 and np.array_equal(a, b)
    for a, b in zip(got.readings, expected.readings, strict=True):
        assert a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


def test_drift_states_of_many_lines_round_trip_together_and_read_the_earlier_layout():
    """A plant's lines, most of one shape and some of others (new lines, a line with a longer
    file, one never seen), encoded and read back together, each as it was; records of the
    earlier layout read alike, mixed with new ones."""
    rng = np.random.default_rng(7)
    sensors = ("flow", "pressure")
    states = [_state(rng, 5, 40, sensors) for _ in range(30)]
    states += [_state(rng, 1, 40, sensors, since=2), _state(rng, 5, 55, sensors), LineDrift()]
    records = drift_detectors.encode_drift_states(states)
    for got, expected in zip(drift_detectors.decode_drift_states(records), states, strict=True):
        _assert_same(got, expected)
    mixed = [_earlier_layout(s) if i % 3 == 0 else r for i, (s, r) in enumerate(zip(states, records, strict=True))]
    mixed.append(None)  # a line without a record starts fresh
    decoded = drift_detectors.decode_drift_states(mixed)
    for got, expected in zip(decoded, [*states, LineDrift()], strict=True):
        _assert_same(got, expected)
    assert drift_detectors.encode_drift_states([states[0]]) == [states[0].to_bytes()]


def test_window_figures_of_many_lines_equal_each_line_alone():
    """The means and the limits (through each line's effective readings) of lines computed
    together, against each line and sensor computed alone from its own windows: missing
    readings, batches of different lengths, a sensor without readings and one without a
    reference."""
    rng = np.random.default_rng(11)
    sensors = ("flow", "pressure", "spare")
    reference = {"sensors": {s: summarise(rng.normal(0, 1, 2000)).to_dict() for s in sensors[:2]}}
    settings = DriftSettings(psi_threshold=0.01, ks_threshold=0.01, window_batches=3, significance=0.01)
    windows = []
    for line in range(40):
        window = []
        for _ in range(3):
            batch = np.cumsum(rng.normal(size=(int(rng.integers(1, 30)), 3)), axis=0) * rng.uniform(0.1, 1)
            batch[rng.random(batch.shape) < 0.2] = np.nan
            if line % 5 == 0:
                batch[:, 1] = np.nan
            window.append(batch)
        windows.append(window)
    stats = _window_stats(windows, [line % 7 != 3 for line in range(40)], reference, sensors, settings)
    for line, (window, figures) in enumerate(zip(windows, stats, strict=True)):
        if line % 7 == 3:
            assert figures == {}
            continue
        for column, sensor in enumerate(sensors):
            readings = np.concatenate([batch[:, column] for batch in window])
            count = np.isfinite(readings).sum()
            mean = figures["mean"][sensor]
            assert (mean is None) if count == 0 else mean == pytest.approx(np.nanmean(readings), rel=1e-9)
            if sensor not in reference["sensors"]:
                assert sensor not in figures["psi_limit"]
                continue
            pairs = [(b[1:, column], b[:-1, column]) for b in window]
            current = np.concatenate([c for c, _ in pairs])
            previous = np.concatenate([p for _, p in pairs])
            both = np.isfinite(current) & np.isfinite(previous)
            rho = 0.0
            if both.sum() > 1 and np.std(current[both]) > 0 and np.std(previous[both]) > 0:
                rho = float(np.corrcoef(current[both], previous[both])[0, 1])
            rho = min(max(rho, 0.0), 0.999)
            effective = min(max(count * (1 - rho) / (1 + rho), 1.0), max(count, 1))
            bins = len(reference["sensors"][sensor]["edges"]) + 1
            limit = max(settings.psi_threshold, psi_by_chance(bins, effective, settings.significance))
            assert figures["psi_limit"][sensor] == pytest.approx(limit, rel=1e-9)


def test_a_release_that_knows_only_the_earlier_layout_refuses_the_new_records_by_name():
    """The earlier release's reader checked the record's kind, then trusted its header: the new
    records carry a kind of their own so that reader stops with its own clear error."""
    record = LineDrift(since=3, batches=2, maes=[0.1, 0.2]).to_bytes()
    _, meta = codec.decode(record)
    assert meta["kind"] != "LineDrift"
    with pytest.raises(codec.CodecError, match="LineDrift"):
        drift_detectors.decode_drift_states([codec.encode({"values": torch.zeros(1)}, {"kind": "AlarmState"})])
