"""The GPU server over real HTTP on 127.0.0.1 (in-process, CPU provider): the same answers as
the Lambda tier, /invocations as SageMaker calls it, dynamic batching under concurrency,
isolation of bad requests, FP16 end to end, and /ping held at 503 until the model is ready."""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from support.common import BUCKET, load_event, make_invoke
from support.flaky import FlakyProxy
from support.gpu import (
    STALL,
    HeldRun,
    InProcessServer,
    fp16_model,
    gather_model,
    load,
    package,
    request,
)
from support.rawhttp import exchange
from tierserve import aws
from tierserve.model import translate_run_error
from tierserve.protocol import decode_infer_response, encode_infer_request
from tierserve.routes import HttpRequest
from tierserve.sagemaker_hosting import CUSTOM_ATTRIBUTES


@pytest.fixture
def start_server() -> Iterator:
    started: list[InProcessServer] = []

    def start(environ, **overrides) -> InProcessServer:
        server = InProcessServer({"POWERTOOLS_METRICS_DISABLED": "true", **environ}, **overrides)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def model_dir_env(packaged, cache_dir: Path) -> dict[str, str]:
    return {"TIERSERVE_MODEL_DIR": str(packaged.artifact.parent), "TIERSERVE_CACHE_DIR": str(cache_dir)}


def wait_ready(server: InProcessServer, timeout: float = 30) -> None:
    assert server.host.wait_ready(timeout), server.host.respond(HttpRequest("GET", "/ping", {}, b"")).body


def stall_body(like: dict[str, np.ndarray]) -> bytes:
    """A V2 request shaped like ``like`` whose first input starts with STALL (see HeldRun)."""
    first = next(iter(like))
    return encode_infer_request(
        {name: np.full_like(array, STALL) if name == first else array for name, array in like.items()}
    ).body


def wait_for(condition) -> None:
    for _ in range(3000):  # a bound for a hang, not a timing check
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("the condition never held")


def event_request(name: str) -> tuple[bytes, dict[str, str]]:
    event = load_event(name)
    body = base64.b64decode(event["body"]) if event.get("isBase64Encoded") else event["body"].encode()
    return body, dict(event["headers"])


def assert_same_response(lambda_result, gpu_result) -> None:
    (status_a, headers_a, body_a), (status_b, headers_b, body_b) = lambda_result, gpu_result
    assert status_a == status_b == 200, (body_a, body_b)
    length = "Inference-Header-Content-Length"
    head_a = json.loads(body_a[: int(headers_a.get(length, len(body_a)))])
    head_b = json.loads(body_b[: int(headers_b.get(length, len(body_b)))])
    strip = lambda doc: [{k: v for k, v in o.items() if k != "data"} for o in doc["outputs"]]  # noqa: E731
    assert {k: v for k, v in head_a.items() if k != "outputs"} == {
        k: v for k, v in head_b.items() if k != "outputs"
    }
    assert strip(head_a) == strip(head_b)
    outputs_a = decode_infer_response(body_a, headers_a)
    outputs_b = decode_infer_response(body_b, headers_b)
    assert outputs_a.keys() == outputs_b.keys()
    for name in outputs_a:
        np.testing.assert_allclose(outputs_a[name], outputs_b[name], rtol=1e-6)


@pytest.mark.parametrize("event", ["infer-json", "infer-binary"])
def test_both_tiers_answer_the_same_request_the_same_way(
    event, s3, uploaded_iris, cache_dir, tmp_path, monkeypatch, start_server
):
    invoke = make_invoke(monkeypatch, cache_dir)
    status, result, body = invoke(load_event(event))
    lambda_result = (status, result["headers"], body)
    server = start_server(
        {"TIERSERVE_MODEL_BUCKET": BUCKET, "TIERSERVE_MODELS": "iris@1", "TIERSERVE_CACHE_DIR": str(tmp_path)}
    )
    wait_ready(server)
    payload, headers = event_request(event)
    assert_same_response(
        lambda_result, request(server.port, "POST", "/v2/models/iris/infer", payload, headers)
    )
    # As SageMaker hands it over: /invocations, the header length as a custom attribute.
    length = headers.pop("Inference-Header-Content-Length", None)
    if length is not None:
        headers[CUSTOM_ATTRIBUTES] = f"trace=abc; inference-header-content-length={length}"
    status, reply_headers, reply = request(server.port, "POST", "/invocations", payload, headers)
    if length is not None:  # and the binary response says its header length the same way
        attribute = reply_headers[CUSTOM_ATTRIBUTES]
        assert (
            attribute == f"inference-header-content-length={reply_headers['Inference-Header-Content-Length']}"
        )
    assert_same_response(lambda_result, (status, reply_headers, reply))
    if length is not None:  # as API Gateway's service integration sends it: a bare number, answered in kind
        headers[CUSTOM_ATTRIBUTES] = length
        status, reply_headers, reply = request(server.port, "POST", "/invocations", payload, headers)
        assert reply_headers[CUSTOM_ATTRIBUTES] == reply_headers["Inference-Header-Content-Length"]
        assert_same_response(lambda_result, (status, reply_headers, reply))


def test_metadata_reports_execution_providers_and_batching(iris_package, cache_dir, start_server):
    server = start_server(model_dir_env(iris_package, cache_dir))
    wait_ready(server)
    status, _, body = request(server.port, "GET", "/v2/models/iris")
    assert status == 200, body
    parameters = json.loads(body)["parameters"]
    assert parameters["execution_providers"] == ["CPUExecutionProvider"]
    assert parameters["dynamic_batching"] == {"max_batch_size": 32, "max_queue_delay_ms": 5.0}
    assert request(server.port, "GET", "/v2/health/ready")[0] == 200
    assert json.loads(request(server.port, "GET", "/ping")[2]) == {"status": "ready", "models": ["iris@1"]}


def test_a_lone_client_never_waits_in_the_batchers_queue(mlp_onnx, tmp_path, start_server):
    """One client over HTTP, with a queue delay no request could sit out: every request runs at
    once on its own thread (inline), none is queued or held for companions."""
    packaged = package(mlp_onnx, "mlp", tmp_path / "pkg")
    server = start_server(
        {**model_dir_env(packaged, tmp_path / "cache"), "TIERSERVE_MAX_QUEUE_DELAY_MS": "60000"}
    )
    wait_ready(server)
    reference = load(packaged, mlp_onnx)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)  # one keep-alive client
    try:
        for index in range(20):
            x = np.full((1, 16), index / 10, dtype=np.float32)
            encoded = encode_infer_request({"input": x}, binary=True, binary_outputs=True)
            connection.request("POST", "/v2/models/mlp/infer", body=encoded.body, headers=encoded.headers)
            response = connection.getresponse()
            body = response.read()
            assert response.status == 200, body
            np.testing.assert_allclose(
                decode_infer_response(body, response.headers)["probabilities"],
                reference.predict({"input": x})["probabilities"],
                rtol=1e-5,
                atol=1e-6,
            )
    finally:
        connection.close()
    stats = server.model("mlp").stats_snapshot()
    assert (stats["requests"], stats["inline"], stats["merged_runs"], stats["held_for_companions"]) == (
        20,
        20,
        0,
        0,
    )
    assert stats["longest_queue_wait_s"] == 0.0


def test_concurrent_requests_are_batched_and_each_gets_its_own_result(mlp_onnx, tmp_path, start_server):
    packaged = package(mlp_onnx, "mlp", tmp_path / "pkg")
    server = start_server(
        {**model_dir_env(packaged, tmp_path / "cache"), "TIERSERVE_MAX_QUEUE_DELAY_MS": "20"}
    )
    wait_ready(server)
    reference = load(packaged, mlp_onnx)
    rng = np.random.default_rng(11)
    inputs = [rng.standard_normal((1 + i % 4, 16)).astype(np.float32) for i in range(32)]
    held = HeldRun(server, "mlp", stall_body({"input": inputs[0][:1]}))

    def call(index: int) -> tuple[int, dict[str, np.ndarray]]:
        encoded = encode_infer_request(
            {"input": inputs[index]}, binary=index % 2 == 0, binary_outputs=index % 2 == 0
        )
        status, headers, body = request(
            server.port, "POST", "/v2/models/mlp/infer", encoded.body, encoded.headers
        )
        return status, decode_infer_response(body, headers) if status == 200 else body

    with ThreadPoolExecutor(len(inputs)) as pool:
        futures = [pool.submit(call, index) for index in range(len(inputs))]
        wait_for(lambda: held.queued() == len(inputs))  # all of them wait behind the held run
        assert held.release()[0] == 200
        results = [future.result(timeout=60) for future in futures]
    for x, (status, outputs) in zip(inputs, results, strict=True):
        assert status == 200, outputs
        np.testing.assert_allclose(
            outputs["probabilities"], reference.predict({"input": x})["probabilities"], rtol=1e-5, atol=1e-6
        )
    stats = server.model("mlp").stats_snapshot()
    assert stats["merged_runs"] >= 1 and stats["largest_run_requests"] > 1, stats


@pytest.mark.parametrize("io_binding", ["off", "on"])
def test_a_bad_request_among_good_ones_fails_alone(io_binding, tmp_path, start_server):
    source = gather_model(tmp_path / "gather.onnx")
    packaged = package(source, "gather", tmp_path / "pkg")
    # A long queue delay so the concurrent requests surely share a run.
    server = start_server(
        {
            **model_dir_env(packaged, tmp_path / "cache"),
            "TIERSERVE_MAX_QUEUE_DELAY_MS": "300",
            "TIERSERVE_IO_BINDING": io_binding,
        }
    )
    wait_ready(server)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    good = [{"x": x + k, "i": np.array([[k % 4], [3]], dtype=np.int64)} for k in range(6)]
    bodies = [encode_infer_request(r).body for r in good]
    bodies += [
        b'{"inputs": [',  # malformed JSON: refused before the queue
        encode_infer_request({"x": x, "i": np.ones((3, 1), dtype=np.int64)}).body,  # rows disagree
        encode_infer_request({"x": x, "i": np.array([[1], [9]], dtype=np.int64)}).body,  # fails in the model
    ]
    # The requests queue behind a run held in flight, so the good ones and the failing one surely
    # share the next run (the policy merges only requests that meet a busy model).
    held = HeldRun(server, "gather", stall_body({"x": x[:1], "i": np.zeros((1, 1), dtype=np.int64)}))

    def call(body: bytes) -> tuple[int, bytes]:
        status, _, reply = request(server.port, "POST", "/v2/models/gather/infer", body)
        return status, reply

    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(call, body) for body in bodies]
        wait_for(lambda: held.queued() == 7)  # the six good ones and the failing one
        assert held.release()[0] == 200
        results = [future.result(timeout=60) for future in futures]
    for case, (status, reply) in zip(good, results[:6], strict=True):
        assert status == 200, reply
        expected = np.take_along_axis(case["x"], case["i"], axis=1)
        np.testing.assert_array_equal(decode_infer_response(reply, None)["y"], expected)
    assert results[6][0] == 400 and "not valid JSON" in json.loads(results[6][1])["error"]
    # Rows that disagree pass validation (dynamic dimensions) and run alone: the model refuses them.
    # (IO binding reports every run failure alike, so its message reads as a failure on this input.)
    assert results[7][0] == 400, results[7][1]
    assert "indices' shape should have values within bounds" in json.loads(results[7][1])["error"]
    # An index out of range fails inside the model: the client's input, a 400 naming the node.
    assert results[8][0] == 400, results[8][1]
    error = json.loads(results[8][1])["error"]
    assert "the model failed on this input: GatherElements node" in error and "Out of range" in error
    assert "onnxruntime_src" not in error  # no source paths or C++ signatures
    stats = server.model("gather").stats_snapshot()
    assert stats["merged_runs"] >= 1 and stats["split_retries"] >= 1, stats


DEVICE_AND_UNKNOWN_FAILURES = [
    "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv node. Name:'conv1' "
    "Status Message: CUDA error cudaErrorMemoryAllocation:out of memory",
    "Error in execution: Non-zero status code returned while running MatMul node. Name:'mm' Status Message: "
    "/onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:376 void* onnxruntime::BFCArena::AllocateRaw"
    "Internal(size_t, bool) Failed to allocate memory for requested buffer of size 1073741824",
    "[ONNXRuntimeError] : 1 : FAIL : TensorRT EP failed to create engine from network for fused node",
    "[ONNXRuntimeError] : 1 : FAIL : an unrecognised failure with no node named",
]


@pytest.mark.parametrize("message", DEVICE_AND_UNKNOWN_FAILURES, ids=["cuda", "arena", "tensorrt", "unknown"])
@pytest.mark.parametrize("kind", [ort.capi.onnxruntime_pybind11_state.Fail, RuntimeError])
def test_device_faults_are_not_blamed_on_the_input(kind, message):
    # None: the caller re-raises, the client gets a logged 500 and may retry elsewhere.
    assert translate_run_error(kind(message)) is None


def test_a_node_failure_is_quoted_without_onnxruntime_internals():
    error = ort.capi.onnxruntime_pybind11_state.Fail(
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Reshape "
        "node. Name:'r' Status Message: /onnxruntime_src/onnxruntime/core/providers/cpu/tensor/reshape_"
        "helper.h:39 onnxruntime::ReshapeHelper::ReshapeHelper(const onnxruntime::TensorShape&, bool) "
        "The input tensor cannot be reshaped to the requested shape. Input shape:{2,4}, requested shape:{3}"
        + "x" * 1000
        + "\nsecond line"
    )
    translated = translate_run_error(error)
    assert translated is not None and translated.status_code == 400
    assert translated.message.startswith(
        "the model failed on this input: Reshape node 'r': The input tensor cannot be reshaped"
    )
    assert "onnxruntime_src" not in translated.message and "second line" not in translated.message
    assert len(translated.message) < 500


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_fp16_models_work_end_to_end(binary, tmp_path, start_server):
    source = fp16_model(tmp_path / "half.onnx")
    packaged = package(source, "half", tmp_path / "pkg")
    server = start_server(model_dir_env(packaged, tmp_path / "cache"))
    wait_ready(server)
    x = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float16)
    encoded = encode_infer_request({"x": x}, binary=binary, binary_outputs=binary)
    status, headers, body = request(server.port, "POST", "/invocations", encoded.body, encoded.headers)
    assert status == 200, body
    head = json.loads(body[: int(headers.get("Inference-Header-Content-Length", len(body)))])
    assert head["outputs"][0]["datatype"] == "FP16"
    y = decode_infer_response(body, headers)["y"]
    assert y.dtype == np.float16
    np.testing.assert_allclose(y, load(packaged, source).predict({"x": x})["y"], rtol=1e-3)
    assert json.loads(request(server.port, "GET", "/v2/models/half")[2])["inputs"][0]["datatype"] == "FP16"


def test_ping_is_503_until_the_model_is_loaded_and_warmed(
    embedded_s3, s3, uploaded_iris, tmp_path, monkeypatch, start_server
):
    proxy = FlakyProxy(embedded_s3.endpoint)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        aws.clear_clients()
        proxy.down = True  # S3 answers SlowDown: loading fails and is retried
        server = start_server(
            {
                "TIERSERVE_MODEL_BUCKET": BUCKET,
                "TIERSERVE_MODELS": "iris@1",
                "TIERSERVE_CACHE_DIR": str(tmp_path),
            }
        )
        deadline = time.monotonic() + 30
        while proxy.requests < 6 and time.monotonic() < deadline:  # two load attempts at least
            time.sleep(0.05)
        status, _, body = request(server.port, "GET", "/ping")
        assert status == 503 and "not ready" in json.loads(body)["error"], body
        assert request(server.port, "GET", "/v2/health/ready")[0] == 503
        assert request(server.port, "GET", "/v2/health/live")[0] == 200
        proxy.down = False
        wait_ready(server)
        assert request(server.port, "GET", "/ping")[0] == 200
    finally:
        proxy.stop()


def test_64_concurrent_keep_alive_connections_are_all_served(iris_package, cache_dir, start_server):
    server = start_server(model_dir_env(iris_package, cache_dir))
    wait_ready(server)
    encoded = encode_infer_request({"input": np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)})
    barrier = threading.Barrier(64)

    def client(_: int) -> list[int]:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        barrier.wait()
        statuses = []
        for _ in range(5):
            connection.request("POST", "/v2/models/iris/infer", body=encoded.body, headers=encoded.headers)
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
        connection.close()
        return statuses

    with ThreadPoolExecutor(64) as pool:
        statuses = [s for per_client in pool.map(client, range(64)) for s in per_client]
    assert statuses == [200] * 320
    assert server.model("iris").stats_snapshot()["merged_runs"] >= 1


def test_a_body_over_the_request_limit_is_refused_before_it_is_read(iris_package, cache_dir, start_server):
    server = start_server({**model_dir_env(iris_package, cache_dir), "TIERSERVE_MAX_REQUEST_MB": "0.5"})
    wait_ready(server)
    head = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 600000\r\n\r\n"
    reply = exchange(server.port, head + b"{")  # the rest never comes: only the length can say
    assert reply.status == 413 and reply.closes
    assert "over this server's limit of 524,288 bytes" in reply.error()
