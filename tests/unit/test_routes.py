"""The route table and the data plane's typed results, without HTTP: operations are callables
that return documents or inference results (never responses), one router answers 404 and 405
from the table, and each transport measures an inference response its own way."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest

from tierserve.dataplane import DataPlane, InferResult
from tierserve.errors import MethodNotAllowed, ModelUnavailable, PayloadTooLarge, RouteNotFound
from tierserve.lambda_proxy import PROXY_ENVELOPE_BYTES, sent_size
from tierserve.protocol import decode_infer_response, encode_infer_request
from tierserve.registry import ModelRegistry
from tierserve.routes import ROUTES, HttpRequest, Router, encode_infer, encode_result, error_response
from tierserve.sagemaker_hosting import (
    SAGEMAKER_ROUTES,
    ModelDirSource,
    ModelHost,
    ServerSettings,
    build_registry,
    model_dir_ref,
)
from tierserve.settings import MB, Settings
from tierserve.store import ArtifactStore

ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)


@pytest.fixture
def plane(iris_package, cache_dir) -> DataPlane:
    folder = iris_package.artifact.parent
    ref = model_dir_ref(folder)
    registry = ModelRegistry(
        Settings(models=(ref,), cache_dir=cache_dir, memory_budget_mb=64),
        partial(ArtifactStore, ModelDirSource(folder, ref), cache_dir, 64 * MB),
    )
    return DataPlane(registry)


def test_every_route_runs_a_callable_operation_of_its_target():
    for route in (*ROUTES, *SAGEMAKER_ROUTES):
        assert callable(route.operation) and not isinstance(route.operation, str)
    assert {route.operation.__qualname__.split(".")[0] for route in ROUTES} == {"DataPlane"}
    assert {(r.method, r.rule) for r in SAGEMAKER_ROUTES} == {("GET", "/ping"), ("POST", "/invocations")}
    assert len({(r.method, r.rule) for r in ROUTES}) == len(ROUTES)


def test_the_data_plane_returns_documents_and_inference_results(plane):
    assert plane.live() == {"live": True} and plane.ready() == {"ready": True}
    assert plane.model_metadata("iris")["name"] == "iris"
    encoded = encode_infer_request({"input": ROWS})
    result = plane.infer("iris", encoded.body, encoded.headers)
    assert isinstance(result, InferResult)
    assert (result.model.name, result.model.version) == ("iris", "1")
    assert np.asarray(result.outputs["label"]).tolist() == [0, 2]
    body = encode_infer(result)
    assert decode_infer_response(body.body, body.headers)["label"].tolist() == [0, 2]


def test_readiness_that_gives_a_reason_makes_ready_raise_it(plane):
    waiting = DataPlane(plane.registry, readiness=lambda: "warming up iris@1")
    with pytest.raises(ModelUnavailable, match="not ready: warming up iris@1"):
        waiting.ready()


def test_the_router_answers_404_and_405_from_the_table(plane):
    router = Router((ROUTES, plane), max_response_bytes=MB)
    route, target, params = router.find("GET", "/v2/models/iris/versions/1/ready/")
    assert route.operation is DataPlane.model_ready and target is plane
    assert params == {"model": "iris", "version": "1"}
    with pytest.raises(MethodNotAllowed) as refused:
        router.find("PATCH", "/v2/models/iris")
    assert refused.value.allowed == ("GET",) and refused.value.headers == {"Allow": "GET"}
    with pytest.raises(RouteNotFound, match=r"no route for GET /v1/models; routes: GET /v2"):
        router.find("GET", "/v1/models")
    reply = router.serve(HttpRequest("DELETE", "/v2/health/live"))
    assert reply.status == 405 and reply.headers["Allow"] == "GET"
    assert json.loads(reply.body) == {"error": "DELETE is not allowed on /v2/health/live; use GET"}
    long = router.serve(HttpRequest("GET", "/x" * 5_000))
    assert long.status == 404 and len(json.loads(long.body)["error"]) < 400  # the echo is bounded


def test_an_error_becomes_its_response_and_a_bug_leaks_nothing():
    refused = error_response(MethodNotAllowed("no", ("GET", "POST")))
    assert refused.status == 405 and refused.headers["Allow"] == "GET, POST"
    bug = error_response(KeyError("/secret/path"))
    assert bug.status == 500 and "secret" not in bug.body.decode() and "Allow" not in bug.headers


def test_each_transport_measures_an_inference_response_its_own_way(plane):
    encoded = encode_infer_request({"input": np.tile(ROWS, (200, 1))}, binary_outputs=True)
    result = plane.infer("iris", encoded.body, encoded.headers)
    raw = len(encode_infer(result).body)
    lambda_size = sent_size(encode_infer(result))
    assert lambda_size > raw + PROXY_ENVELOPE_BYTES  # base64 and the proxy envelope
    measure_raw = lambda e: len(e.body)  # noqa: E731 - the GPU server's measure
    assert encode_result(result, raw, measure_raw).status == 200
    with pytest.raises(PayloadTooLarge, match=f"the response would be {lambda_size:,} bytes"):
        encode_result(result, raw, sent_size)


def test_the_gpu_servers_table_has_the_sagemaker_routes_before_the_oip_ones(iris_package, cache_dir):
    environ = {
        "TIERSERVE_MODEL_DIR": str(iris_package.artifact.parent),
        "TIERSERVE_CACHE_DIR": str(cache_dir),
    }
    settings = ServerSettings.from_env(environ)
    host = ModelHost(build_registry(settings, environ), settings)  # not started: not ready
    assert host.router.find("GET", "/ping")[0].operation is ModelHost.ping
    post_ping = host.respond(HttpRequest("POST", "/ping"))
    assert (
        post_ping.status == 405
        and json.loads(post_ping.body)["error"] == "POST is not allowed on /ping; use GET"
    )
    nowhere = json.loads(host.respond(HttpRequest("GET", "/nowhere")).body)["error"]
    assert "GET /ping, POST /invocations" in nowhere
    ready = host.respond(HttpRequest("GET", "/v2/health/ready"))
    assert ready.status == 503 and json.loads(ready.body) == {"error": "not ready: loading"}
