"""The statistics' figures from the inference records: a merged batch is one execution of all
its rows, each request's queue time is its own, and who called is read from API Gateway's
request context in a fixed order."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from support.gpu import load, package
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
    # A queue delay nobody reaches: the run starts when the batch is full, so both requests share it.
    model = BatchingModel(mlp, BatchingConfig(max_batch_size=4, max_queue_delay_ms=60_000))
    ref = ModelRef("mlp", "1")
    records: list[audit.InferenceRecord] = []
    rows = np.ones((2, 16), dtype=np.float32)

    def request() -> None:
        with audit.http_inference(
            caller="test", request_id="r", tier="gpu", model="mlp", version=None
        ) as record:
            audit.served(ref)
            record.rows = 2
            model.predict({"input": rows})
            record.status = 200
            records.append(record)

    threads = [threading.Thread(target=request) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    model.close()
    assert [r.executed for r in records] == [False, False]  # the batcher counted the run
    assert all(r.queue_ns >= 0 for r in records)
    stat = STATISTICS.model_stat(ref)
    assert (stat["inference_count"], stat["execution_count"]) == (4, 1)
    [batch] = stat["batch_stats"]
    assert (batch["batch_size"], batch["compute_infer"]["count"]) == (4, 1)
    assert stat["inference_stats"]["success"]["count"] == 2


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
