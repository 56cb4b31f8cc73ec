"""The statistics' figures from the inference records: a merged batch is one execution of all
its rows, each request's queue time is its own, and who called is read from API Gateway's
request context in a fixed order."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from support.gpu import STALL, Stalling, load, package
from tierserve import audit
from tierserve.batching import BatchingConfig, BatchingModel
from tierserve.settings import ModelRef
from tierserve.stats import STATISTICS


@pytest.fixture
def mlp(mlp_onnx, tmp_path):
    return load(package(mlp_onnx, "mlp", tmp_path), mlp_onnx)


@pytest.fixture(autouse=True)
def fresh_statistics():
    STATISTICS.clear()
    yield
    STATISTICS.clear()


def test_a_merged_run_is_one_execution_of_every_row(mlp):
    # A run held in flight: the two requests sent meanwhile queue behind it and share one run.
    stalling = Stalling(mlp)
    model = BatchingModel(stalling, BatchingConfig(max_batch_size=4, max_queue_delay_ms=5))
    ref = ModelRef("mlp", "1")
    records: list[audit.InferenceRecord] = []
    rows = np.ones((2, 16), dtype=np.float32)
    held = np.full((1, 16), STALL, dtype=np.float32)

    def request(inputs: np.ndarray, keep: bool) -> None:
        with audit.http_inference(
            caller="test", request_id="r", tier="gpu", model="mlp", version=None
        ) as record:
            audit.served(ref)
            record.rows = len(inputs)
            model.predict({"input": inputs})
            record.status = 200
            if keep:
                records.append(record)

    first = threading.Thread(target=request, args=(held, False))
    first.start()
    assert stalling.entered.wait(30), "the held run never reached the model"
    threads = [threading.Thread(target=request, args=(rows, True)) for _ in range(2)]
    for thread in threads:
        thread.start()
    while model.stats_snapshot()["requests"] < 3:  # both queued behind the held run
        threading.Event().wait(0.01)
    stalling.go.set()
    for thread in (first, *threads):
        thread.join(30)
    model.close()
    assert [r.executed for r in records] == [False, False]  # the batcher counted the run
    assert all(r.queue_ns >= 0 for r in records)
    stat = STATISTICS.model_stat(ref)
    # The held request ran on its own (1 row, one execution); the two others in one run of 4 rows.
    assert (stat["inference_count"], stat["execution_count"]) == (5, 2)
    assert {b["batch_size"]: b["compute_infer"]["count"] for b in stat["batch_stats"]} == {1: 1, 4: 1}
    assert stat["inference_stats"]["success"]["count"] == 3


def test_a_failure_counts_as_fail_and_nothing_else():
    ref = ModelRef("mlp", "1")
    with audit.http_inference(caller="test", request_id="r", tier="gpu", model="mlp", version=None) as record:
        audit.served(ref)
        record.status = 400
    inference = STATISTICS.model_stat(ref)["inference_stats"]
    assert inference["fail"]["count"] == 1
    assert inference["success"]["count"] == inference["compute_infer"]["count"] == 0
    assert STATISTICS.model_stat(ref)["inference_count"] == 0


def test_an_unknown_model_is_in_no_statistics():
    with audit.http_inference(caller="t", request_id="r", tier="gpu", model="nobody", version=None) as record:
        record.status = 404
    assert STATISTICS.model_stat(ModelRef("nobody", "1"))["inference_stats"]["fail"]["count"] == 0


@pytest.mark.parametrize(
    ("context", "caller"),
    [
        ({"identity": {"apiKeyId": "k1", "userArn": "arn:aws:iam::1:user/a"}}, "api_key:k1"),
        (
            {"identity": {"userArn": "arn:aws:iam::1:user/a"}, "authorizer": {"principalId": "p"}},
            "iam:arn:aws:iam::1:user/a",
        ),
        ({"identity": {}, "authorizer": {"principalId": "p"}}, "authorizer:p"),
        ({"identity": {}, "apiId": "local"}, "local"),
        ({"identity": {}, "apiId": "abc"}, "anonymous"),
        (None, "anonymous"),
    ],
)
def test_the_caller_is_read_from_the_request_context(context, caller):
    assert audit.api_gateway_caller(context) == caller


def test_identities_and_names_from_requests_are_bounded():
    with audit.http_inference(
        caller="x" * 10_000, request_id="", tier="lambda", model="m" * 10_000, version=None
    ) as record:
        record.status = 404
    assert len(record.caller) == len(record.model) == audit.MAX_FIELD
    assert record.request_id  # made when the transport had none
    assert audit.request_id_from({"X-Amzn-SageMaker-Inference-Id": "abc"}) == "abc"
