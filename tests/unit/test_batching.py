"""Dynamic batching on real onnxruntime sessions.

The policy: a lone request runs at once (no wait, whatever the queue delay); requests that
arrive while a run is in flight wait for it and run together; a run that met concurrency holds
the free model for the clients it answered, at most as long as the run took and the queue
delay, and holds pause when one comes back short. And what batching must keep: merged runs
give each request exactly its unbatched result, only compatible requests share a run, a
request that makes the model fail fails alone, the queue is bounded, and neither a stuck run
nor a dead batcher leaves a queued request waiting for ever.

Runs are held in flight by a test double around the real model (``Stalling``) and time is the
model's injected clock, so which requests merged and how long they waited are facts of the
test, not of the machine's speed."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest

from support.gpu import CRASH, STALL, Stalling, gather_model, load, package, row_sum_model
from tierserve.batching import HOLD_BACKOFF_RUNS, BatchingConfig, BatchingModel, batchable, batching_factory
from tierserve.catalog import TensorSpec
from tierserve.errors import BadRequest, ModelUnavailable, Overloaded, to_http
from tierserve.model import OnnxModel
from tierserve.protocol import DATATYPES

LONG_DELAY_MS = 60_000.0  # a queue delay no test could sit out: a request that waited it would hang


class Crash(BaseException):
    """Not an ``Exception``: what ends a thread (as SystemExit or KeyboardInterrupt would)."""


class Clock:
    """The model's clock: still unless the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def mlp(mlp_onnx, tmp_path_factory) -> OnnxModel:
    return load(package(mlp_onnx, "mlp", tmp_path_factory.mktemp("mlp")), mlp_onnx)


@pytest.fixture(scope="module")
def gather(tmp_path_factory) -> OnnxModel:
    folder = tmp_path_factory.mktemp("gather")
    source = gather_model(folder / "gather.onnx")
    return load(package(source, "gather", folder / "pkg"), source)


@pytest.fixture(scope="module")
def row_sum(tmp_path_factory) -> OnnxModel:
    folder = tmp_path_factory.mktemp("row-sum")
    source = row_sum_model(folder / "row_sum.onnx")
    return load(package(source, "row-sum", folder / "pkg"), source)


@pytest.fixture(scope="module")
def iris(iris_onnx, iris_package) -> OnnxModel:
    return load(iris_package, iris_onnx)


def in_background(call: Callable[[], object]) -> Future:
    """Run ``call`` on a daemon thread: a call that never returns fails its test (a bounded
    ``result``) instead of holding the whole run."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(call())
        except BaseException as error:
            future.set_exception(error)

    threading.Thread(target=run, daemon=True).start()
    return future


def wait_until(condition: Callable[[], bool]) -> None:
    for _ in range(3000):  # a bound for a hang, not a timing check
        if condition():
            return
        threading.Event().wait(0.01)
    raise AssertionError("the condition never held")


def stall_request(like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A request shaped like ``like`` (one row) that Stalling holds in the model: its first
    input starts with STALL, the others are zeros (valid indices, for a gather)."""
    first = next(iter(like))
    return {
        name: np.full((1, *array.shape[1:]), STALL if name == first else 0, dtype=array.dtype)
        for name, array in like.items()
    }


class HeldRun:
    """A run held in flight: a stalling request, run at once (the model was idle), and
    requests queued behind it from their own threads."""

    def __init__(self, model: BatchingModel, stalling: Stalling, like: dict[str, np.ndarray]) -> None:
        self.model, self.stalling = model, stalling
        stalling.entered.clear()
        stalling.go.clear()
        self.opener = in_background(lambda: model.predict(stall_request(like)))
        assert stalling.entered.wait(30)

    def queue(self, calls: Sequence[Callable[[], object]]) -> list[Future]:
        """Start ``calls`` and return once each waits in the queue."""
        before = self.model.stats_snapshot()["requests"]
        futures = [in_background(call) for call in calls]
        wait_until(lambda: self.model.stats_snapshot()["requests"] == before + len(calls))
        return futures

    def release(self) -> None:
        self.stalling.go.set()
        self.opener.result(timeout=30)


def results_of(futures: Sequence[Future]) -> list[object]:
    out: list[object] = []
    for future in futures:
        error = future.exception(timeout=30)
        out.append(error if error is not None else future.result())
    return out


def queued_behind_a_run(
    inner: OnnxModel, requests: Sequence[Callable[[BatchingModel], object]], **config: float
) -> tuple[list[object], dict]:
    """``requests`` (each a call on the model) queued behind a held run, then released; their
    results (or errors) and the model's stats. The clock stands still, so no hold is opened."""
    stalling = Stalling(inner)
    model = BatchingModel(
        stalling,
        BatchingConfig(**{"max_batch_size": 32, "max_queue_delay_ms": LONG_DELAY_MS, **config}),
        clock=Clock(),
    )
    like = {
        spec.name: np.zeros((1, *[max(d, 1) for d in spec.shape[1:]]), DATATYPES[spec.datatype])
        for spec in inner.manifest.inputs
    }
    try:
        held = HeldRun(model, stalling, like)
        futures = held.queue([lambda r=r: r(model) for r in requests])
        held.release()
        results = results_of(futures)
    finally:
        stalling.go.set()
        model.close()
    return results, model.stats_snapshot()


# ---------------------------------------------------------------- the policy


def test_a_lone_client_never_waits_for_companions(mlp):
    """One request at a time: each runs at once on its caller's thread, whatever the queue
    delay, and none of them spends any time in a queue."""
    clock = Clock()
    model = BatchingModel(
        mlp, BatchingConfig(max_batch_size=32, max_queue_delay_ms=LONG_DELAY_MS), clock=clock
    )
    rng = np.random.default_rng(3)
    requests = [{"input": rng.standard_normal((1 + i % 2, 16)).astype(np.float32)} for i in range(20)]
    try:
        for request in requests:
            result = in_background(lambda r=request: model.predict(r)).result(timeout=30)
            np.testing.assert_allclose(result["probabilities"], mlp.predict(request)["probabilities"])
            clock.now += 0.5  # the lone client's think time
    finally:
        model.close()
    stats = model.stats_snapshot()
    assert (stats["requests"], stats["inline"], stats["runs"], stats["merged_runs"]) == (20, 20, 20, 0)
    assert stats["held_for_companions"] == 0
    assert stats["longest_queue_wait_s"] == 0.0 and stats["total_queue_wait_s"] == 0.0


def test_requests_that_arrive_during_a_run_wait_only_for_it_and_run_together(mlp):
    clock = Clock()
    stalling = Stalling(mlp)
    model = BatchingModel(
        stalling, BatchingConfig(max_batch_size=32, max_queue_delay_ms=LONG_DELAY_MS), clock=clock
    )
    rng = np.random.default_rng(5)
    requests = [{"input": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(8)]
    try:
        held = HeldRun(model, stalling, requests[0])
        futures = held.queue([lambda r=r: model.predict(r) for r in requests])
        clock.now += 0.25  # the run in flight takes a quarter of a second
        stalling.go.set()
        held.opener.result(timeout=30)
        # The run met concurrency, so the model is held for the client it answered: its
        # next request comes, joins the eight, and the batcher runs them with no further wait.
        follow_up = in_background(lambda: model.predict(requests[0])).result(timeout=30)
        results = results_of(futures)
    finally:
        stalling.go.set()
        model.close()
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_allclose(result["probabilities"], mlp.predict(request)["probabilities"], rtol=1e-5)
    np.testing.assert_allclose(
        follow_up["probabilities"], mlp.predict(requests[0])["probabilities"], rtol=1e-5
    )
    stats = model.stats_snapshot()
    assert stats["inline"] == 1  # only the first found the model idle
    assert stats["merged_runs"] == 1 and stats["largest_run_requests"] == 9  # 8 waiting + the client answered
    # Two runs: the held one, then one for all nine (whether the batcher had begun holding
    # when the follow-up came is a race this test does not decide).
    assert stats["runs"] == 2
    # The eight waited for the run in flight (0.25 s by the model's clock) and nothing more.
    assert stats["longest_queue_wait_s"] == pytest.approx(0.25)
    assert stats["total_queue_wait_s"] == pytest.approx(8 * 0.25)


def test_a_hold_lasts_no_longer_than_the_run_and_one_that_comes_back_short_pauses_holds(mlp):
    clock = Clock()
    stalling = Stalling(mlp)
    model = BatchingModel(
        stalling, BatchingConfig(max_batch_size=32, max_queue_delay_ms=LONG_DELAY_MS), clock=clock
    )
    request = {"input": np.ones((1, 16), dtype=np.float32)}
    try:
        held = HeldRun(model, stalling, request)
        futures = held.queue([lambda: model.predict(request)] * 3)
        # Binary fractions, so that "as long as the run" is exact by the clock.
        clock.now += 0.25  # a run of 0.25 s: the hold that follows lasts at most 0.25 s
        stalling.go.set()
        held.opener.result(timeout=30)  # the run has ended (and opened its hold)
        wait_until(lambda: model.stats_snapshot()["held_for_companions"] == 1)
        assert not any(f.done() for f in futures)  # held for the client just answered...
        clock.now += 0.25  # ...who does not come back within the run's length
        results = results_of(futures)
        stats = model.stats_snapshot()
        assert (stats["merged_runs"], stats["largest_run_requests"]) == (1, 3)
        assert (stats["held_for_companions"], stats["holds_cut_short"]) == (1, 1)
        assert stats["longest_queue_wait_s"] == pytest.approx(0.5)  # the run, then the whole hold
        # Holds now pause: the next run that meets concurrency is not held, although the
        # clock stands still and its client never comes back.
        again = HeldRun(model, stalling, request)
        more = again.queue([lambda: model.predict(request)] * 2)
        clock.now += 0.1
        stalling.go.set()
        results += results_of(more)
        again.opener.result(timeout=30)
    finally:
        stalling.go.set()
        model.close()
    for result in results:
        np.testing.assert_allclose(result["probabilities"], mlp.predict(request)["probabilities"], rtol=1e-5)
    stats = model.stats_snapshot()
    assert (stats["held_for_companions"], stats["holds_cut_short"]) == (1, 1)
    assert stats["merged_runs"] == 2
    assert HOLD_BACKOFF_RUNS > 2  # the pause outlasts this test's runs


def test_a_run_that_took_no_time_opens_no_hold(mlp):
    """A light model: the hold is bounded by the run's length, so a model whose runs take no
    time (by its clock) is never held, and the requests behind a run go as soon as it ends."""
    results, stats = queued_behind_a_run(
        mlp, [lambda m: m.predict({"input": np.ones((1, 16), np.float32)})] * 4
    )
    assert all(not isinstance(r, Exception) for r in results)
    assert stats["held_for_companions"] == 0
    assert (stats["merged_runs"], stats["largest_run_requests"], stats["inline"]) == (1, 4, 1)


# ---------------------------------------------------------------- what merging keeps


def test_merged_requests_each_get_their_unbatched_result(mlp):
    rng = np.random.default_rng(7)
    requests = [{"input": rng.standard_normal((1 + i % 3, 16)).astype(np.float32)} for i in range(32)]
    results, stats = queued_behind_a_run(mlp, [lambda m, r=r: m.predict(r) for r in requests])
    for request, result in zip(requests, results, strict=True):
        assert not isinstance(result, Exception), result
        np.testing.assert_allclose(
            result["probabilities"], mlp.predict(request)["probabilities"], rtol=1e-5, atol=1e-6
        )
    assert stats["requests"] == 33 and stats["inline"] == 1
    assert stats["merged_runs"] >= 2  # 64 rows: more than one batch of at most 32
    assert stats["largest_run_rows"] <= 32
    assert stats["runs"] < 33


def test_only_requests_of_the_same_shape_share_a_run(row_sum):
    widths = [3, 5] * 8
    requests = [{"x": np.full((2, width), index, dtype=np.float32)} for index, width in enumerate(widths)]
    results, stats = queued_behind_a_run(row_sum, [lambda m, r=r: m.predict(r) for r in requests])
    for index, (width, result) in enumerate(zip(widths, results, strict=True)):
        assert not isinstance(result, Exception), result
        np.testing.assert_array_equal(result["y"], np.full((2, 1), index * width, dtype=np.float32))
    assert (stats["merged_runs"], stats["largest_run_requests"]) == (2, 8)  # one run per width


def test_requests_asking_for_different_outputs_get_only_theirs(iris):
    rows = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
    asks = [["label"], ["probabilities"], None] * 4
    results, stats = queued_behind_a_run(iris, [lambda m, a=a: m.predict({"input": rows}, a) for a in asks])
    expected = iris.predict({"input": rows})
    for ask, result in zip(asks, results, strict=True):
        assert not isinstance(result, Exception), result
        assert sorted(result) == sorted(ask or expected)
        for name in result:
            np.testing.assert_allclose(result[name], expected[name], rtol=1e-6)
    assert (stats["merged_runs"], stats["largest_run_requests"]) == (3, 4)  # one run per ask


def test_a_request_that_fails_in_the_model_fails_alone(gather):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    good = [{"x": x + k, "i": np.array([[k % 4], [3]], dtype=np.int64)} for k in range(8)]
    bad = {"x": x, "i": np.array([[1], [9]], dtype=np.int64)}  # index 9 of 4: valid INT64, fails at run time
    calls = [lambda m, r=r: m.predict(r) for r in [*good[:4], bad, *good[4:]]]
    results, stats = queued_behind_a_run(gather, calls)
    failed = results.pop(4)
    assert type(failed) is BadRequest and failed.status_code == 400
    assert failed.message.startswith("the model failed on this input: GatherElements node")
    assert to_http(failed) == (400, {"error": failed.message})
    for request, result in zip(good, results, strict=True):
        assert not isinstance(result, Exception), result
        np.testing.assert_array_equal(result["y"], np.take_along_axis(request["x"], request["i"], axis=1))
    assert stats["merged_runs"] == 1 and stats["split_retries"] == 1


def test_a_request_whose_inputs_disagree_on_rows_is_never_stacked(gather):
    # Valid for the signature (both first dimensions are dynamic) and for the model (1 index row
    # for 2 data rows): stacked with others, its rows would shift everyone's. It runs alone.
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    odd = {"x": x * 10, "i": np.array([[2]], dtype=np.int64)}
    good = [{"x": x + k, "i": np.array([[k % 4], [1]], dtype=np.int64)} for k in range(6)]
    model = BatchingModel(gather, BatchingConfig(max_batch_size=32, max_queue_delay_ms=100))
    try:
        results = [model.predict(r) for r in [odd, *good]]
    finally:
        model.close()
    for request, result in zip([odd, *good], results, strict=True):
        np.testing.assert_array_equal(result["y"], gather.predict(request)["y"])
    assert model.stats_snapshot()["direct"] == 1


def test_a_request_bigger_than_the_max_batch_runs_on_its_own(mlp):
    model = BatchingModel(mlp, BatchingConfig(max_batch_size=4, max_queue_delay_ms=1))
    request = {"input": np.ones((9, 16), dtype=np.float32)}
    try:
        result = model.predict(request)
    finally:
        model.close()
    np.testing.assert_allclose(result["probabilities"], mlp.predict(request)["probabilities"])
    assert model.stats_snapshot()["direct"] == 1


# ---------------------------------------------------------------- bounds and failures


def test_a_full_queue_refuses_at_once_and_close_runs_what_waits(mlp):
    stalling = Stalling(mlp)
    model = BatchingModel(
        stalling,
        BatchingConfig(max_batch_size=32, max_queue_delay_ms=LONG_DELAY_MS, max_queue_size=2),
        clock=Clock(),
    )
    request = {"input": np.ones((1, 16), dtype=np.float32)}
    try:
        held = HeldRun(model, stalling, request)
        waiting = held.queue([lambda: model.predict(request)] * 2)
        with pytest.raises(Overloaded, match="TIERSERVE_MAX_QUEUE_SIZE"):
            model.predict(request)
        # Refuses new requests at once (not waiting for the batcher, which cannot drain the
        # queue before the run in flight ends); what waits runs once it does.
        model.close(timeout=0)
        held.release()
        for result in results_of(waiting):
            np.testing.assert_allclose(result["probabilities"], mlp.predict(request)["probabilities"])
    finally:
        stalling.go.set()
        model.close()
    assert model.stats_snapshot()["rejected"] == 1
    assert not model.ready()
    with pytest.raises(ModelUnavailable, match="shutting down or was unloaded") as raised:
        model.predict(request)
    assert raised.value.status_code == 503


def test_a_dead_batcher_fails_every_waiting_request_with_503_and_is_not_ready(mlp):
    stalling = Stalling(mlp, crash=Crash())
    model = BatchingModel(stalling, BatchingConfig(max_batch_size=32, max_queue_delay_ms=0), clock=Clock())
    request = {"input": np.ones((1, 16), dtype=np.float32)}
    crashing = {"input": np.full((1, 16), CRASH, dtype=np.float32)}
    other_shape = {"input": np.ones((2, 16), dtype=np.float32)}
    try:
        held = HeldRun(model, stalling, request)
        queued = held.queue([lambda: model.predict(crashing)])
        queued += held.queue(
            [lambda: model.predict(other_shape, ["label"])] * 2
        )  # other outputs: a later run
        assert model.ready()
        held.release()  # the batcher runs the crashing request: Crash ends its thread
        for error in results_of(queued):
            assert type(error) is ModelUnavailable and error.status_code == 503
            assert "the batcher of mlp stopped (Crash)" in error.message
    finally:
        stalling.go.set()
        model.close()
    assert not model.ready()
    with pytest.raises(ModelUnavailable, match="the batcher of mlp stopped"):
        model.predict(request)


def test_a_stuck_run_makes_queued_requests_give_up_with_503_and_the_model_not_ready(mlp):
    clock = Clock()
    stalling = Stalling(mlp)  # the stalled run waits for go, then runs
    config = BatchingConfig(max_batch_size=32, max_queue_delay_ms=0, run_timeout_s=0.2)
    model = BatchingModel(stalling, config, clock=clock)
    request = {"input": np.ones((1, 16), dtype=np.float32)}
    try:
        held = HeldRun(model, stalling, request)  # a run stuck on its caller's thread
        with pytest.raises(ModelUnavailable, match=r"gave no result within 0\.2 s") as raised:
            model.predict(request)  # queued behind the stuck run: gives up, leaves the queue
        assert raised.value.status_code == 503
        assert model.ready()  # by the model's clock, the run has not gone on too long yet
        clock.now += config.run_timeout_s + 1
        assert not model.ready()  # now it has: /ping would say 503
        held.release()  # the run ends (its own caller gets its result): the model is ready again
        np.testing.assert_allclose(
            model.predict(request)["probabilities"], mlp.predict(request)["probabilities"]
        )
        assert model.ready()
    finally:
        stalling.go.set()
        model.close()
    # Two runs, the stuck one and the last request's: the request that gave up never ran.
    assert model.stats_snapshot()["runs"] == 2


# ---------------------------------------------------------------- configuration


def test_metadata_reports_the_batching_knobs_and_providers(mlp):
    model = BatchingModel(mlp, BatchingConfig(max_batch_size=8, max_queue_delay_ms=2.5))
    try:
        parameters = model.metadata()["parameters"]
    finally:
        model.close()
    assert parameters["dynamic_batching"] == {"max_batch_size": 8, "max_queue_delay_ms": 2.5}
    assert parameters["execution_providers"] == ["CPUExecutionProvider"]
    assert model.providers == ("CPUExecutionProvider",)


def test_only_models_with_a_dynamic_first_dimension_everywhere_are_wrapped(mlp):
    fixed = dataclasses.replace(mlp.manifest, inputs=(TensorSpec("input", "FP32", (1, 16)),))
    assert batchable(mlp.manifest) and not batchable(fixed)
    assert not batchable(dataclasses.replace(mlp.manifest, extra={"dynamic_batching": False}))
    wrap = batching_factory(lambda manifest, session, timings: mlp, BatchingConfig())
    assert wrap(fixed, None, None) is mlp
    off = batching_factory(lambda manifest, session, timings: mlp, BatchingConfig(max_batch_size=1))
    assert off(mlp.manifest, None, None) is mlp
    wrapped = wrap(mlp.manifest, None, None)
    try:
        assert isinstance(wrapped, BatchingModel)
    finally:
        wrapped.close()


def test_configuration_is_checked():
    with pytest.raises(ValueError, match="max_batch_size >= 1"):
        BatchingConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="run_timeout_s > 0"):
        BatchingConfig(run_timeout_s=0)
    assert BatchingConfig(max_queue_delay_ms=500, run_timeout_s=60).wait_timeout_s == 60.5


def test_a_pool_of_threads_sharing_one_model_gets_every_answer_right(mlp):
    """Many clients at once, no test double: whatever merges, each gets its own rows."""
    model = BatchingModel(mlp, BatchingConfig(max_batch_size=32, max_queue_delay_ms=5))
    rng = np.random.default_rng(9)
    requests = [{"input": rng.standard_normal((1 + i % 3, 16)).astype(np.float32)} for i in range(200)]
    try:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(model.predict, requests))
    finally:
        model.close()
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_allclose(
            result["probabilities"], mlp.predict(request)["probabilities"], rtol=1e-5, atol=1e-6
        )
    assert model.stats_snapshot()["requests"] == 200
