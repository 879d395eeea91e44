"""The driver's frozen heap: objects from before a run are left out of the collector's scans
while it works through its files, and nothing stays frozen after it."""

import gc
import weakref

import pytest

from flows.orchestrate import prefect_flows
from flows.orchestrate.heap import frozen_heap
from tests.flows.helpers import small_config, small_plant


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref:
    """A two-object reference cycle, referenced only from the returned weak reference's target."""
    first, second = _Node(), _Node()
    first.other, second.other = second, first
    return weakref.ref(first)


def test_a_cycle_from_before_the_block_is_collected_after_it_and_one_made_inside_at_once():
    assert gc.get_freeze_count() == 0
    gc.collect()
    holder = [_Node()]
    holder[0].other = holder[0]  # alive when the block starts: frozen with everything else
    before = weakref.ref(holder[0])
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        holder.clear()  # now garbage, but frozen: reference counting cannot free a cycle
        gc.collect()
        assert before() is not None
        inside = _cycle()  # made inside the block: the collector still scans it
        gc.collect()
        assert inside() is None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert before() is None


def test_the_heap_is_handed_back_when_the_block_raises():
    with pytest.raises(RuntimeError), frozen_heap():
        assert gc.get_freeze_count() > 0
        raise RuntimeError("a file failed")
    assert gc.get_freeze_count() == 0


def test_a_run_works_through_its_files_on_a_frozen_heap_and_hands_it_back(tmp_path, prefect_api, monkeypatch):
    settings, config = small_config(tmp_path, initial_training={"batches": 2, "epochs": 1})
    small_plant(settings, entities=2, batches=5, rows_per_batch=30, broken_batches={})
    frozen_while_processing = []
    process_batch = prefect_flows.process_batch

    def watched(*args, **kwargs):
        frozen_while_processing.append(gc.get_freeze_count())
        return process_batch(*args, **kwargs)

    monkeypatch.setattr(prefect_flows, "process_batch", watched)
    summary = prefect_flows.continual_update(config=config)
    assert summary["run"]["processed"] == len(frozen_while_processing) > 0
    assert min(frozen_while_processing) > 0
    assert gc.get_freeze_count() == 0
