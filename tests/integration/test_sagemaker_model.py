"""SageMakerModel, the GPU tier seen from the worker: against moto's sagemaker-runtime
(canned replies; the request is checked as sent) and against a loopback SageMaker double
with the GPU server's real host (tierserve.sagemaker_hosting) behind it, which also answers
SageMaker's own errors."""

from __future__ import annotations

import json
from dataclasses import replace

import boto3
import numpy as np
import onnxruntime as ort
import pytest
import requests
from botocore.config import Config

from support.sagemaker import (
    NO_CAPACITY_MESSAGE,
    SageMakerDouble,
    model_error,
    no_capacity,
    service_error,
    start_container,
)
from tierserve import aws
from tierserve.errors import (
    BadRequest,
    ModelNotFound,
    ModelStarting,
    ModelUnavailable,
    PayloadTooLarge,
    UpstreamTimeout,
    UpstreamUnavailable,
    is_retryable,
    to_http,
)
from tierserve.model import LoadTimings, OnnxModel
from tierserve.protocol import BINARY_CONTENT_TYPE, HEADER_LENGTH, encode_binary, parse_infer_request
from tierserve.sagemaker_model import SageMakerModel, parse_custom_attributes
from tierserve.settings import GpuTarget
from tierserve.tools.local.embedded_s3 import LOCAL_CREDENTIALS

ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)


@pytest.fixture
def iris(iris_onnx, iris_package) -> OnnxModel:
    session = ort.InferenceSession(str(iris_onnx), providers=["CPUExecutionProvider"])
    return OnnxModel(iris_package.manifest, session, LoadTimings(0, 0, 0, False))


@pytest.fixture
def double(iris_package, tmp_path):
    container = start_container(iris_package.artifact.parent, tmp_path / "container-cache")
    server = SageMakerDouble({"iris-gpu": container})
    yield server
    server.stop()
    container.close()


@pytest.fixture
def components(iris_package, tmp_path):
    """An endpoint that hosts iris as the inference component ``iris-ic``."""
    container = start_container(iris_package.artifact.parent, tmp_path / "container-cache")
    server = SageMakerDouble({"iris-gpu": container}, components={"iris-ic": "iris-gpu"})
    yield server
    server.stop()
    container.close()


def client_for(url: str, *, attempts: int = 3, read_timeout: float = 5) -> object:
    return boto3.client(
        "sagemaker-runtime",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(retries={"mode": "standard", "max_attempts": attempts}, read_timeout=read_timeout),
    )


# ---------------------------------------------------------------- the loopback GPU server


def test_predict_round_trips_an_oip_binary_request(double, iris, iris_package):
    model = SageMakerModel(iris_package.manifest, "iris-gpu", client_factory=lambda: client_for(double.url))
    outputs = model.predict({"input": ROWS})
    expected = iris.predict({"input": ROWS})
    np.testing.assert_allclose(outputs["probabilities"], expected["probabilities"], atol=1e-6)
    assert outputs["label"].tolist() == expected["label"].tolist()
    [call] = double.calls
    assert call["endpoint"] == "iris-gpu"
    assert call["headers"]["content-type"] == BINARY_CONTENT_TYPE
    header_length = int(call["attributes"][HEADER_LENGTH])
    head = json.loads(call["body"][:header_length])
    assert head["inputs"][0]["parameters"]["binary_data_size"] == ROWS.nbytes
    assert head["parameters"] == {"binary_data_output": True}
    assert call["body"][header_length:] == encode_binary(ROWS)
    container = call["container"]  # the GPU server answered in binary, its header length as an attribute
    assert container.status == 200 and container.headers["Content-Type"] == BINARY_CONTENT_TYPE
    assert container.headers["X-Amzn-SageMaker-Custom-Attributes"].startswith(f"{HEADER_LENGTH}=")


# ---------------------------------------------------------------- inference components

IRIS_TARGET = GpuTarget("iris-gpu", "iris-ic")


def test_every_call_names_the_models_inference_component(components, iris, iris_package):
    model = SageMakerModel.serving(
        iris_package.manifest, IRIS_TARGET, client_factory=lambda: client_for(components.url)
    )
    for _ in range(2):
        outputs = model.predict({"input": ROWS})
        assert outputs["label"].tolist() == iris.predict({"input": ROWS})["label"].tolist()
    assert [(c["endpoint"], c["component"]) for c in components.calls] == [("iris-gpu", "iris-ic")] * 2
    parameters = model.metadata()["parameters"]
    assert (parameters["sagemaker_endpoint"], parameters["sagemaker_inference_component"]) == (
        "iris-gpu",
        "iris-ic",
    )


def test_a_call_that_names_no_component_of_a_component_endpoint_is_refused(components, iris_package):
    """What the double checks is what SageMaker checks: without the name, no model answers."""
    model = SageMakerModel(
        iris_package.manifest, "iris-gpu", client_factory=lambda: client_for(components.url, attempts=1)
    )
    with pytest.raises(ModelUnavailable, match="TIERSERVE_GPU_ENDPOINTS"):
        model.predict({"input": ROWS})
    [call] = components.calls
    assert call["component"] is None and "container" not in call


def test_a_model_with_no_copy_running_is_starting_and_retryable(components, iris_package):
    components.cold.add("iris-ic")
    model = SageMakerModel.serving(
        iris_package.manifest,
        IRIS_TARGET,
        client_factory=lambda: client_for(components.url, attempts=3),
        cold_start_minutes=7,
        retry_after_s=30,
    )
    with pytest.raises(ModelStarting) as raised:
        model.predict({"input": ROWS})
    error = raised.value
    assert error.retry_after_s == 30
    assert "model iris is starting from zero" in error.message and "about 7" in error.message
    assert "iris-gpu/iris-ic" in error.message and "Retry after 30 s" in error.message
    assert NO_CAPACITY_MESSAGE not in error.message, "ours, not SageMaker's words"
    assert is_retryable(error) and to_http(error)[0] == 503
    assert len(components.calls) == 1, "a 400 is not retried by botocore: the caller decides when"
    components.cold.discard("iris-ic")  # the copy is up
    assert model.predict({"input": ROWS})["label"].shape == (2,)


def test_the_no_capacity_answer_through_fail_with_is_the_same_error(double, iris_package):
    double.fail_with = no_capacity()
    model = SageMakerModel(iris_package.manifest, "iris-gpu", client_factory=lambda: client_for(double.url))
    with pytest.raises(
        ModelStarting, match=r"its GPU endpoint \(iris-gpu\).*about 10.*Retry after 60 s"
    ) as raised:
        model.predict({"input": ROWS})
    assert raised.value.retry_after_s == 60


def test_the_model_attribute_picks_the_model_the_container_serves(double, iris_package):
    other = replace(iris_package.manifest, name="resnet")
    model = SageMakerModel(other, "iris-gpu", client_factory=lambda: client_for(double.url, attempts=1))
    with pytest.raises(ModelNotFound, match="resnet"):
        model.predict({"input": ROWS})
    [call] = double.calls
    assert call["attributes"]["model"] == "resnet" and call["container"].status == 404


def test_an_endpoint_sagemaker_does_not_know_is_a_deployment_fault(double, iris_package):
    model = SageMakerModel(
        iris_package.manifest, "no-such-endpoint", client_factory=lambda: client_for(double.url, attempts=1)
    )
    with pytest.raises(ModelUnavailable, match="TIERSERVE_GPU_ENDPOINTS"):
        model.predict({"input": ROWS})


def test_requested_outputs_pass_through(double, iris_package):
    model = SageMakerModel(iris_package.manifest, "iris-gpu", client_factory=lambda: client_for(double.url))
    assert list(model.predict({"input": ROWS}, ["label"])) == ["label"]
    assert model.ready() is True
    assert model.metadata()["parameters"]["sagemaker_endpoint"] == "iris-gpu"


def test_the_containers_own_400_is_a_bad_request_with_its_message(double, iris_package):
    model = SageMakerModel(iris_package.manifest, "iris-gpu", client_factory=lambda: client_for(double.url))
    with pytest.raises(BadRequest) as raised:
        model.predict({"input": np.zeros((1, 3), np.float32)})
    assert "expects [-1, 4]" in raised.value.message
    assert len(double.calls) == 1  # a client error is not retried


@pytest.mark.parametrize(
    ("failure", "expected", "fragment"),
    [
        (model_error(400, "input 'input' is not FP32"), BadRequest, "is not FP32"),
        (model_error(413, "request over 6 MB"), PayloadTooLarge, "over 6 MB"),
        (model_error(404, "model 'iris' is not served here"), ModelNotFound, "not served here"),
        (model_error(500, "CUDA out of memory"), UpstreamUnavailable, "failed (500)"),
        (model_error(503, "queue full"), UpstreamUnavailable, "failed (503)"),
        (service_error(503, "ServiceUnavailable"), UpstreamUnavailable, "retry"),
        (service_error(429, "ModelNotReadyException"), UpstreamUnavailable, "retry"),
        (service_error(400, "ThrottlingException", "Rate exceeded"), UpstreamUnavailable, "retry"),
        (
            service_error(400, "ValidationError", "Endpoint nope of account 0 not found."),
            ModelUnavailable,
            "not found",
        ),
        (service_error(403, "AccessDeniedException"), ModelUnavailable, "sagemaker:InvokeEndpoint"),
    ],
    ids=[
        "model-400",
        "model-413",
        "model-404",
        "model-500",
        "model-503",
        "503",
        "not-ready",
        "throttled",
        "no-endpoint",
        "denied",
    ],
)
def test_sagemaker_errors_become_typed_errors(double, iris_package, failure, expected, fragment):
    double.fail_with = failure
    model = SageMakerModel(
        iris_package.manifest, "iris-gpu", client_factory=lambda: client_for(double.url, attempts=1)
    )
    with pytest.raises(expected) as raised:
        model.predict({"input": ROWS})
    assert fragment in raised.value.message


def test_the_default_client_retries_a_bounded_number_of_times(double, iris_package, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", double.url)
    for key, value in LOCAL_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    model = SageMakerModel(iris_package.manifest, "iris-gpu")
    double.fail_with, double.fail_times = service_error(503, "ServiceUnavailable"), 1
    assert model.predict({"input": ROWS})["label"].shape == (2,)
    assert len(double.calls) == 2  # one failure, one retry
    double.calls.clear()
    double.fail_with = service_error(503, "ServiceUnavailable")
    with pytest.raises(UpstreamUnavailable):
        model.predict({"input": ROWS})
    assert len(double.calls) == aws.POLICIES["sagemaker-runtime"].attempts


def test_a_slow_endpoint_is_an_upstream_timeout(double, iris_package):
    double.delay_s = 1.0
    model = SageMakerModel(
        iris_package.manifest,
        "iris-gpu",
        client_factory=lambda: client_for(double.url, attempts=1, read_timeout=0.2),
    )
    with pytest.raises(UpstreamTimeout):
        model.predict({"input": ROWS})


def test_an_unreachable_endpoint_is_upstream_unavailable(iris_package):
    model = SageMakerModel(
        iris_package.manifest, "iris-gpu", client_factory=lambda: client_for("http://127.0.0.1:9", attempts=1)
    )
    with pytest.raises(UpstreamUnavailable, match="cannot be reached"):
        model.predict({"input": ROWS})


def test_a_request_over_the_payload_limit_is_refused_before_sending(double, iris_package):
    model = SageMakerModel(
        iris_package.manifest,
        "iris-gpu",
        client_factory=lambda: client_for(double.url),
        max_payload_bytes=100,
    )
    with pytest.raises(PayloadTooLarge, match="TIERSERVE_ROW_BATCH_SIZE"):
        model.predict({"input": np.zeros((64, 4), np.float32)})
    assert double.calls == []


# ---------------------------------------------------------------- moto's sagemaker-runtime

# moto's server decodes request bodies as UTF-8, so these inputs are floats whose little-endian
# bytes are ASCII ("AAAA" is 12.078431); a real endpoint takes any bytes.
ASCII_ROWS = np.frombuffer(b"AAAABBBBCCCCDDDDEEEEFFFFGGGGHHHH", dtype="<f4").reshape(2, 4)


@pytest.fixture
def moto_runtime(s3, embedded_s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", embedded_s3.endpoint)

    def canned(body: str | bytes, *, content_type: str, attributes: str = "") -> None:
        text = body.decode("latin-1") if isinstance(body, bytes) else body
        result = {"Body": text, "ContentType": content_type, "InvokedProductionVariant": "AllTraffic"}
        if attributes:
            result["CustomAttributes"] = attributes
        requests.post(
            f"{embedded_s3.endpoint}/moto-api/static/sagemaker/endpoint-results",
            json={"account_id": "123456789012", "region": "us-east-1", "results": [result]},
            timeout=10,
        ).raise_for_status()

    return canned


def captured_requests() -> list[object]:
    sent: list[object] = []
    aws.sagemaker_runtime_client().meta.events.register(
        "before-send.sagemaker-runtime.InvokeEndpoint", lambda request, **_: sent.append(request)
    )
    return sent


def test_moto_json_reply_and_the_request_as_sent(moto_runtime, iris_package):
    reply = {
        "model_name": "iris",
        "model_version": "1",
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [2], "data": [0, 2]}],
    }
    moto_runtime(json.dumps(reply), content_type="application/json")
    sent = captured_requests()
    outputs = SageMakerModel(iris_package.manifest, "iris-gpu").predict({"input": ASCII_ROWS})
    assert outputs["label"].tolist() == [0, 2]
    [request] = sent
    assert request.url.endswith("/endpoints/iris-gpu/invocations")
    assert request.headers["Content-Type"] == BINARY_CONTENT_TYPE.encode()
    attributes = parse_custom_attributes(request.headers["X-Amzn-SageMaker-Custom-Attributes"].decode())
    assert attributes["model"] == "iris"
    length = attributes[HEADER_LENGTH]
    parsed = parse_infer_request(
        request.body, {HEADER_LENGTH: length}, iris_package.manifest, max_bytes=1 << 20
    )
    np.testing.assert_array_equal(parsed.inputs["input"], ASCII_ROWS)


def test_moto_binary_reply_with_the_header_length_attribute(moto_runtime, iris_package):
    probabilities = np.frombuffer(b"0000" * 6, dtype="<f4").reshape(2, 3)
    head = json.dumps(
        {
            "model_name": "iris",
            "model_version": "1",
            "outputs": [
                {
                    "name": "probabilities",
                    "datatype": "FP32",
                    "shape": [2, 3],
                    "parameters": {"binary_data_size": 24},
                }
            ],
        }
    ).encode()
    moto_runtime(
        head + encode_binary(probabilities),
        content_type=BINARY_CONTENT_TYPE,
        attributes=f"{HEADER_LENGTH}={len(head)}",
    )
    outputs = SageMakerModel(iris_package.manifest, "iris-gpu").predict(
        {"input": ASCII_ROWS}, ["probabilities"]
    )
    np.testing.assert_array_equal(outputs["probabilities"], probabilities)


def test_a_reply_that_is_not_oip_is_an_upstream_fault(moto_runtime, iris_package):
    moto_runtime("<html>bad gateway</html>", content_type="text/html")
    with pytest.raises(UpstreamUnavailable, match="not an OIP response"):
        SageMakerModel(iris_package.manifest, "iris-gpu").predict({"input": ASCII_ROWS})
