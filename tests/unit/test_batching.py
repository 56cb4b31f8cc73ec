"""Dynamic batching on real onnxruntime sessions: merged runs give each request exactly its
unbatched result, only compatible requests share a run, a request that makes the model fail
fails alone, the queue is bounded, and neither a stuck run nor a dead batcher leaves a
request waiting for ever."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest

from support.gpu import gather_model, load, package, row_sum_model
from tierserve.batching import BatchingConfig, BatchingModel, batchable, batching_factory
from tierserve.catalog import TensorSpec
from tierserve.errors import BadRequest, ModelUnavailable, Overloaded, to_http
from tierserve.model import OnnxModel

POISON = -13.0  # a request whose first value is this stalls in the model (see Stalling)


class Crash(BaseException):
    """Not an ``Exception``: what ends a thread (as SystemExit or KeyboardInterrupt would)."""


class Stalling:
    """A real model whose runs of a poisoned request signal ``entered``, wait for ``go``, then
    raise ``then`` (or run normally when ``then`` is None); other requests run at once."""

    def __init__(self, inner: OnnxModel, then: BaseException | None = None) -> None:
        self.inner = inner
        self.manifest = inner.manifest
        self.then = then
        self.entered = threading.Event()
        self.go = threading.Event()

    def metadata(self):
        return self.inner.metadata()

    def ready(self) -> bool:
        return True

    def predict(self, inputs, output_names=None):
        if next(iter(inputs.values())).flat[0] == POISON:
            self.entered.set()
            assert self.go.wait(30), "the test never let the stalled run go"
            if self.then is not None:
                raise self.then
        return self.inner.predict(inputs, output_names)


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


def concurrently(calls):
    """Run the zero-argument ``calls`` from as many threads, released together; returns each
    call's result or the exception it raised, in order."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        try:
            return call()
        except Exception as error:
            return error

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def in_background(call) -> Future:
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


def test_concurrent_requests_are_merged_and_each_gets_its_unbatched_result(mlp):
    model = BatchingModel(mlp, BatchingConfig(max_batch_size=32, max_queue_delay_ms=50))
    rng = np.random.default_rng(7)
    requests = [{"input": rng.standard_normal((1 + i % 3, 16)).astype(np.float32)} for i in range(32)]
    try:
        results = concurrently([lambda r=r: model.predict(r) for r in requests])
    finally:
        model.close()
    for request, result in zip(requests, results, strict=True):
        assert not isinstance(result, Exception), result
        np.testing.assert_allclose(
            result["probabilities"], mlp.predict(request)["probabilities"], rtol=1e-5, atol=1e-6
        )
    stats = model.stats_snapshot()
    assert stats["requests"] == 32
    assert stats["merged_runs"] >= 1 and stats["largest_run_requests"] > 1  # batches really formed
    assert stats["runs"] < 32
    assert stats["largest_run_rows"] <= 32


def test_only_requests_of_the_same_shape_share_a_run(row_sum):
    model = BatchingModel(row_sum, BatchingConfig(max_batch_size=32, max_queue_delay_ms=50))
    widths = [3, 5] * 8
    requests = [{"x": np.full((2, width), index, dtype=np.float32)} for index, width in enumerate(widths)]
    try:
        results = concurrently([lambda r=r: model.predict(r) for r in requests])
    finally:
        model.close()
    for index, (width, result) in enumerate(zip(widths, results, strict=True)):
        assert not isinstance(result, Exception), result
        np.testing.assert_array_equal(result["y"], np.full((2, 1), index * width, dtype=np.float32))
    assert model.stats_snapshot()["runs"] >= 2  # one run per width at least


def test_requests_asking_for_different_outputs_get_only_theirs(iris):
    model = BatchingModel(iris, BatchingConfig(max_batch_size=32, max_queue_delay_ms=50))
    rows = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
    asks = [["label"], ["probabilities"], None] * 4
    try:
        results = concurrently([lambda a=a: model.predict({"input": rows}, a) for a in asks])
    finally:
        model.close()
    expected = iris.predict({"input": rows})
    for ask, result in zip(asks, results, strict=True):
        assert not isinstance(result, Exception), result
        assert sorted(result) == sorted(ask or expected)
        for name in result:
            np.testing.assert_allclose(result[name], expected[name], rtol=1e-6)


def test_a_request_that_fails_in_the_model_fails_alone(gather):
    model = BatchingModel(gather, BatchingConfig(max_batch_size=32, max_queue_delay_ms=200))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    good = [{"x": x + k, "i": np.array([[k % 4], [3]], dtype=np.int64)} for k in range(8)]
    bad = {"x": x, "i": np.array([[1], [9]], dtype=np.int64)}  # index 9 of 4: valid INT64, fails at run time
    try:
        results = concurrently([lambda r=r: model.predict(r) for r in [*good[:4], bad, *good[4:]]])
    finally:
        model.close()
    failed = results.pop(4)
    assert type(failed) is BadRequest and failed.status_code == 400
    assert failed.message.startswith("the model failed on this input: GatherElements node")
    assert to_http(failed) == (400, {"error": failed.message})
    for request, result in zip(good, results, strict=True):
        assert not isinstance(result, Exception), result
        np.testing.assert_array_equal(result["y"], np.take_along_axis(request["x"], request["i"], axis=1))
    stats = model.stats_snapshot()
    assert stats["merged_runs"] >= 1 and stats["split_retries"] >= 1


def test_a_full_queue_refuses_at_once_and_close_runs_what_waits(mlp):
    model = BatchingModel(mlp, BatchingConfig(max_batch_size=32, max_queue_delay_ms=60_000, max_queue_size=2))
    request = {"input": np.ones((1, 16), dtype=np.float32)}
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(model.predict, request) for _ in range(2)]
        while model.stats_snapshot()["requests"] < 2:
            threading.Event().wait(0.01)
        with pytest.raises(Overloaded, match="TIERSERVE_MAX_QUEUE_SIZE"):
            model.predict(request)
        model.close()  # stops waiting for the delay: the queued requests run now
        for future in waiting:
            np.testing.assert_allclose(
                future.result(timeout=10)["probabilities"], mlp.predict(request)["probabilities"]
            )
    assert model.stats_snapshot()["rejected"] == 1
    assert not model.ready()
    with pytest.raises(ModelUnavailable, match="shutting down or was unloaded") as raised:
        model.predict(request)
    assert raised.value.status_code == 503


def test_a_dead_batcher_fails_every_waiting_request_with_503_and_is_not_ready(mlp):
    stalling = Stalling(mlp, then=Crash())
    model = BatchingModel(stalling, BatchingConfig(max_batch_size=32, max_queue_delay_ms=0))
    poisoned = {"input": np.full((1, 16), POISON, dtype=np.float32)}
    request = {"input": np.ones((2, 16), dtype=np.float32)}  # another shape: never in the crashing run
    try:
        crashing = in_background(lambda: model.predict(poisoned))
        assert stalling.entered.wait(30)
        queued = [in_background(lambda: model.predict(request)) for _ in range(2)]
        while model.stats_snapshot()["requests"] < 3:  # both wait in the queue behind the run
            threading.Event().wait(0.01)
        assert model.ready()
        stalling.go.set()  # the model raises Crash: the batcher thread dies
        for future in [crashing, *queued]:
            error = future.exception(timeout=30)  # a bound for a hang, not a timing check
            assert type(error) is ModelUnavailable and error.status_code == 503
            assert "the batcher of mlp stopped (Crash)" in error.message
    finally:
        stalling.go.set()
        model.close()
    assert not model.ready()
    with pytest.raises(ModelUnavailable, match="the batcher of mlp stopped"):
        model.predict(request)


def test_a_stuck_run_makes_waiters_give_up_with_503_and_the_model_not_ready(mlp):
    now = [0.0]
    stalling = Stalling(mlp)  # the poisoned run waits for go, then runs
    config = BatchingConfig(max_batch_size=32, max_queue_delay_ms=0, run_timeout_s=0.2)
    model = BatchingModel(stalling, config, clock=lambda: now[0])
    poisoned = {"input": np.full((1, 16), POISON, dtype=np.float32)}
    request = {"input": np.ones((1, 16), dtype=np.float32)}
    try:
        stuck = in_background(lambda: model.predict(poisoned))
        assert stalling.entered.wait(30)
        with pytest.raises(ModelUnavailable, match=r"gave no result within 0\.2 s") as raised:
            model.predict(request)  # queued behind the stuck run: gives up, leaves the queue
        assert raised.value.status_code == 503
        assert model.ready()  # by the model's clock, the run has not gone on too long yet
        now[0] += config.run_timeout_s + 1
        assert not model.ready()  # now it has: /ping would say 503
        error = stuck.exception(timeout=30)  # its caller gave up too, the same way
        assert type(error) is ModelUnavailable and error.status_code == 503
        stalling.go.set()  # the run ends: the model is ready again
        np.testing.assert_allclose(
            model.predict(request)["probabilities"], mlp.predict(request)["probabilities"]
        )
        assert model.ready()
    finally:
        stalling.go.set()
        model.close()
    # Two runs, the stuck one and the last request's: the request that gave up never ran.
    assert model.stats_snapshot()["runs"] == 2


def test_a_request_bigger_than_the_max_batch_runs_on_its_own(mlp):
    model = BatchingModel(mlp, BatchingConfig(max_batch_size=4, max_queue_delay_ms=1))
    request = {"input": np.ones((9, 16), dtype=np.float32)}
    try:
        result = model.predict(request)
    finally:
        model.close()
    np.testing.assert_allclose(result["probabilities"], mlp.predict(request)["probabilities"])
    assert model.stats_snapshot()["direct"] == 1


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


def test_a_request_whose_inputs_disagree_on_rows_is_never_stacked(gather):
    # Valid for the signature (both first dimensions are dynamic) and for the model (1 index row
    # for 2 data rows): stacked with others, its rows would shift everyone's. It runs alone.
    model = BatchingModel(gather, BatchingConfig(max_batch_size=32, max_queue_delay_ms=100))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    odd = {"x": x * 10, "i": np.array([[2]], dtype=np.int64)}
    good = [{"x": x + k, "i": np.array([[k % 4], [1]], dtype=np.int64)} for k in range(6)]
    try:
        results = concurrently([lambda r=r: model.predict(r) for r in [odd, *good]])
    finally:
        model.close()
    for request, result in zip([odd, *good], results, strict=True):
        assert not isinstance(result, Exception), result
        np.testing.assert_array_equal(result["y"], gather.predict(request)["y"])
    assert model.stats_snapshot()["direct"] == 1
