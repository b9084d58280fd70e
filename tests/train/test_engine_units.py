"""Small engine pieces: early stopping, the non-finite guard, step timing, CSV tracker resume, signals."""

from __future__ import annotations

import math
import os
import signal

import pytest

from rfdetr_train.engine.early_stop import EarlyStopping
from rfdetr_train.engine.guard import NonFiniteGuard, TrainingDivergedError
from rfdetr_train.engine.signals import GracefulStop
from rfdetr_train.engine.trackers import CSVTracker


def test_early_stopping_patience_and_min_delta():
    es = EarlyStopping(patience=2, min_delta=0.01)
    assert es.update(0.10, 1) and es.best == 0.10
    assert not es.update(0.105, 2)  # not better by more than min_delta
    assert not es.should_stop
    assert not es.update(float("nan"), 3)
    assert es.should_stop and es.best_step == 1
    restored = EarlyStopping(patience=2, min_delta=0.01)
    restored.load_state_dict(es.state_dict())
    assert restored.should_stop and restored.best == 0.10
    never = EarlyStopping(patience=None)
    for i in range(5):
        never.update(0.0, i)
    assert not never.should_stop


def test_guard_counts_and_raises_after_consecutive_failures():
    g = NonFiniteGuard(max_consecutive=3)
    assert g.record(True, 1)
    assert not g.record(False, 2) and not g.record(False, 3)
    assert g.record(True, 4) and g.skipped == 2 and g.consecutive == 0
    g.record(False, 5)
    g.record(False, 6)
    with pytest.raises(TrainingDivergedError, match="3 optimiser steps in a row up to step 7.*--lr"):
        g.record(False, 7)


def test_csv_tracker_drops_rows_past_the_resumed_step(tmp_path):
    path = tmp_path / "log.csv"
    t = CSVTracker(path)
    for step in range(1, 6):
        t.log({"loss": 1.0 / step}, step)
    t.log({"loss": 0.1, "extra": 3}, 6)  # a new column rewrites the header
    assert path.read_text().splitlines()[0] == "step,loss,extra"
    resumed = CSVTracker(path, resume_step=3)
    resumed.log({"loss": 0.5}, 4)
    steps = [int(r.split(",")[0]) for r in path.read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4]
    assert math.isclose(float(path.read_text().splitlines()[2].split(",")[1]), 0.5)


def test_graceful_stop_turns_sigterm_into_a_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before
