"""The response cache on the Lambda tier and the GPU server: a repeated request is answered
from the cache (the model does not run), a different caller or request is not, a model
without the opt-in never caches, and where callers cannot be told apart (the GPU server) only
a model that shares answers is cached."""

from __future__ import annotations

import copy
import json

import pytest

from support.common import BUCKET, load_event, make_invoke
from support.gpu import InProcessServer, request
from support.operations import audit_records
from tierserve.catalog import ResponseCachePolicy
from tierserve.stats import STATISTICS
from tierserve.tools.packaging import package_model, upload_package


def cached(iris_onnx, folder, **policy):
    return package_model(
        iris_onnx,
        name="iris",
        version="1",
        out_dir=folder / "iris",
        response_cache=ResponseCachePolicy(**policy),
    )


@pytest.fixture(scope="module")
def cached_package(iris_onnx, tmp_path_factory):
    return cached(iris_onnx, tmp_path_factory.mktemp("cached"), max_entries=4)


@pytest.fixture(scope="module")
def shared_package(iris_onnx, tmp_path_factory):
    return cached(iris_onnx, tmp_path_factory.mktemp("shared"), max_entries=4, shared_across_callers=True)


def as_caller(event: dict, user: str) -> dict:
    event = copy.deepcopy(event)
    event["requestContext"]["apiId"] = "abc123"
    event["requestContext"]["identity"]["userArn"] = f"arn:aws:iam::123456789012:user/{user}"
    return event


def test_the_lambda_tier_answers_a_repeated_request_from_the_cache(
    s3, cached_package, cache_dir, monkeypatch
):
    upload_package(cached_package, s3, BUCKET, "models")
    invoke = make_invoke(monkeypatch, cache_dir)
    alice, bob = as_caller(load_event("infer-json"), "alice"), as_caller(load_event("infer-json"), "bob")
    with audit_records() as records:
        first = invoke(alice)
        again = invoke(alice)
        other_caller = invoke(bob)
        other_request = invoke(as_caller(load_event("infer-binary"), "alice"))
    assert first[0] == again[0] == other_caller[0] == other_request[0] == 200
    assert again[2] == first[2]  # the same answer, byte for byte
    assert [r["cache"] for r in records] == ["miss", "hit", "miss", "miss"]


def test_a_model_without_the_opt_in_never_caches(invoke):
    with audit_records() as records:
        for _ in range(2):
            assert invoke(load_event("infer-json"))[0] == 200
    assert [r.get("cache") for r in records] == [None, None]


def gpu_statistics(package, cache_dir, requests: int = 3) -> tuple[list, dict]:
    """``requests`` identical requests to the GPU server, and its statistics of the model."""
    STATISTICS.clear()
    server = InProcessServer(
        {"TIERSERVE_MODEL_DIR": str(package.artifact.parent), "TIERSERVE_CACHE_DIR": str(cache_dir)}
    )
    try:
        assert server.host.wait_ready(30)
        body = load_event("infer-json")["body"].encode()
        answers = [request(server.port, "POST", "/invocations", body) for _ in range(requests)]
        stats_status, _, document = request(server.port, "GET", "/v2/models/iris/stats")
        assert stats_status == 200
    finally:
        server.stop()
        STATISTICS.clear()
    [stat] = json.loads(document)["model_stats"]
    return answers, stat


def test_the_gpu_server_caches_only_what_may_be_shared(cached_package, cache_dir):
    # SageMaker does not tell the container who called: answers kept per caller cannot be kept apart.
    answers, stat = gpu_statistics(cached_package, cache_dir)
    assert [a[0] for a in answers] == [200, 200, 200]
    inference = stat["inference_stats"]
    assert (inference["cache_hit"]["count"], inference["cache_miss"]["count"]) == (0, 0)
    assert stat["execution_count"] == 3


def test_the_gpu_server_counts_cache_hits_as_triton_does(shared_package, cache_dir):
    answers, stat = gpu_statistics(shared_package, cache_dir)
    assert [a[0] for a in answers] == [200, 200, 200]
    assert answers[1][2] == answers[2][2] == answers[0][2]
    inference = stat["inference_stats"]
    assert (inference["cache_hit"]["count"], inference["cache_miss"]["count"]) == (2, 1)
    assert stat["execution_count"] == 1  # the model ran once
    assert (stat["inference_count"], inference["success"]["count"]) == (6, 3)
