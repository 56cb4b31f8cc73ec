"""Capture's sampling, batching, bounds and failures, with an in-memory writer (the S3 writes
themselves are in tests/integration/test_drift.py, on moto's server)."""

from __future__ import annotations

import json
import random
import threading
import time

import numpy as np
import pytest

from tierserve.capture import (
    CAPTURE_DROPPED,
    CAPTURE_WRITE_FAILED,
    CAPTURE_WRITTEN,
    MAX_LINE_BYTES,
    Capture,
    CaptureRule,
    batch_key,
    join_rules,
    parse_rules,
)
from tierserve.settings import ModelRef, SettingsError

IRIS = ModelRef("iris", "1")
ROW = {"input": np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)}
OUT = {"label": np.array([0]), "probabilities": np.array([[0.9, 0.05, 0.05]], dtype=np.float32)}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Store:
    """Objects put, by key; ``fail`` makes every put raise, ``gate`` holds puts until set."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()

    def put(self, key: str, body: bytes) -> None:
        self.gate.wait(10)
        if self.fail:
            raise ConnectionError("S3 is down")
        with self.lock:
            self.objects[key] = body

    def lines(self) -> list[dict]:
        return [json.loads(line) for body in self.objects.values() for line in body.splitlines()]


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_rules_parse_and_join_both_ways():
    rules = parse_rules("iris:0.1, mlp:0.05:outputs")
    assert rules == {"iris": CaptureRule(0.1), "mlp": CaptureRule(0.05, True)}
    assert join_rules(rules) == "iris:0.1,mlp:0.05:outputs"
    for bad in ("iris", "iris:2", "iris:x", "Iris:0.1", "iris:0.1:inputs", "iris:0.1,iris:0.2"):
        with pytest.raises(ValueError, match="model:rate"):
            parse_rules(bad)


def test_from_env_names_the_variable_and_the_fix():
    assert Capture.from_env({}) is None
    assert Capture.from_env({"TIERSERVE_CAPTURE": "iris:0"}) is None
    with pytest.raises(SettingsError, match="TIERSERVE_DATA_BUCKET is not"):
        Capture.from_env({"TIERSERVE_CAPTURE": "iris:0.1"})
    with pytest.raises(SettingsError, match="TIERSERVE_CAPTURE='iris:5'"):
        Capture.from_env({"TIERSERVE_CAPTURE": "iris:5", "TIERSERVE_DATA_BUCKET": "data"})
    capture = Capture.from_env(
        {"TIERSERVE_CAPTURE": "iris:0.5", "TIERSERVE_DATA_BUCKET": "data", "TIERSERVE_CAPTURE_BATCH": "7"}
    )
    assert capture is not None and capture.batch == 7 and capture.rules["iris"].rate == 0.5


def test_the_rate_samples_that_share_of_requests():
    store = Store()
    capture = Capture({"iris": CaptureRule(0.2)}, put=store.put, batch=100_000, draw=random.Random(3).random)
    for _ in range(5000):
        capture.offer(IRIS, ROW, OUT)
    capture.flush()
    assert 900 <= len(store.lines()) <= 1100
    capture.offer(ModelRef("mlp", "1"), ROW, OUT)  # not opted in
    capture.flush()
    assert {line["model"] for line in store.lines()} == {"iris"}


def test_lines_hold_inputs_and_outputs_only_when_asked():
    store = Store()
    for rule in (CaptureRule(1.0), CaptureRule(1.0, outputs=True)):
        capture = Capture({"iris": rule}, put=store.put)
        capture.offer(IRIS, ROW, OUT)
        capture.flush()
    without, with_outputs = sorted(store.lines(), key=lambda line: "outputs" in line)
    assert without["inputs"] == {
        "input": {"dtype": "float32", "shape": [1, 4], "data": pytest.approx([5.1, 3.5, 1.4, 0.2])}
    }
    assert "outputs" not in without
    assert with_outputs["outputs"]["probabilities"]["shape"] == [1, 3]
    assert without["version"] == "1" and without["time"].endswith("+00:00")


def test_a_full_batch_is_written_by_the_writer_thread_without_waiting():
    store = Store()
    store.gate.clear()  # S3 hangs
    capture = Capture({"iris": CaptureRule(1.0)}, put=store.put, batch=10, flush_s=3600)
    started = time.perf_counter()
    for _ in range(25):
        capture.offer(IRIS, ROW, OUT)
    capture.end_invocation()
    assert time.perf_counter() - started < 1.0  # the request threads never wait on S3
    store.gate.set()
    wait_for(lambda: len(store.objects) == 2)
    assert sorted(len(b.splitlines()) for b in store.objects.values()) == [10, 10]
    assert all(key.startswith("capture/iris/1/date=") and key.endswith(".jsonl") for key in store.objects)
    capture.close()
    assert sorted(len(b.splitlines()) for b in store.objects.values()) == [5, 10, 10]
    assert capture.counts[CAPTURE_WRITTEN] == 25


def test_a_batch_is_written_when_its_oldest_line_is_old_enough():
    store, clock = Store(), Clock()
    capture = Capture({"iris": CaptureRule(1.0)}, put=store.put, batch=100, flush_s=60, clock=clock)
    capture.offer(IRIS, ROW, OUT)
    capture.end_invocation()
    time.sleep(0.05)
    assert store.objects == {}  # neither full nor old
    clock.now += 61
    capture.end_invocation()
    wait_for(lambda: len(store.objects) == 1)
    capture.close()


def test_a_failed_write_is_counted_and_drops_its_lines_never_raising():
    store = Store()
    store.fail = True
    capture = Capture({"iris": CaptureRule(1.0)}, put=store.put, batch=5)
    for _ in range(5):
        capture.offer(IRIS, ROW, OUT)  # never raises
    capture.flush()
    assert capture.counts[CAPTURE_WRITE_FAILED] == 1 and capture.counts[CAPTURE_DROPPED] == 5
    store.fail = False
    capture.offer(IRIS, ROW, OUT)
    capture.flush()
    assert len(store.lines()) == 1
    capture.close()


def test_the_buffer_is_bounded_while_s3_hangs():
    store = Store()
    store.gate.clear()
    capture = Capture({"iris": CaptureRule(1.0)}, put=store.put, batch=10, flush_s=3600)
    for _ in range(100):
        capture.offer(IRIS, ROW, OUT)
    # one batch may be in the writer's hands; at most four batches wait; the rest are dropped
    assert capture.counts[CAPTURE_DROPPED] >= 100 - 10 - 4 * 10
    store.gate.set()
    capture.close()
    assert len(store.lines()) + capture.counts[CAPTURE_DROPPED] == 100


def test_a_request_too_large_to_capture_is_dropped_unencoded():
    store = Store()
    capture = Capture({"iris": CaptureRule(1.0)}, put=store.put)
    capture.offer(IRIS, {"image": np.zeros((1, MAX_LINE_BYTES), np.float32)}, OUT)
    capture.flush()
    assert store.objects == {} and capture.counts[CAPTURE_DROPPED] == 1


def test_batch_keys_are_dated_and_unique():
    import datetime as dt

    when = dt.datetime(2026, 12, 2, 1, 2, 3, tzinfo=dt.UTC)
    first, second = batch_key(IRIS, when), batch_key(IRIS, when)
    assert first.startswith("capture/iris/1/date=2026-12-02/010203-") and first != second


def test_a_request_that_cannot_be_encoded_is_dropped_not_raised():
    store = Store()
    capture = Capture({"iris": CaptureRule(1.0)}, put=store.put)
    capture.offer(IRIS, {"input": np.array([[1 + 2j]], dtype=np.complex128)}, OUT)
    capture.flush()
    assert store.objects == {} and capture.counts[CAPTURE_DROPPED] == 1
