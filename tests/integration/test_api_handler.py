"""The Lambda API handler end to end: API Gateway events in, real onnxruntime on a model
fetched from the embedded S3, OIP responses out."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from support.common import BUCKET, count_s3_calls, load_event, make_invoke
from support.gpu import gather_model, package
from tierserve import aws
from tierserve.lambda_proxy import PROXY_ENVELOPE_BYTES
from tierserve.protocol import decode_infer_response
from tierserve.settings import MB
from tierserve.tools.local import samples
from tierserve.tools.packaging import package_model, upload, upload_package


def _iris_reference() -> np.ndarray:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    features, labels = load_iris(return_X_y=True)
    classifier = LogisticRegression(max_iter=500).fit(features.astype(np.float32), labels)
    rows = json.loads(load_event("infer-json")["body"])["inputs"][0]["data"]
    return classifier.predict_proba(np.asarray(rows, dtype=np.float32))


def test_json_infer_matches_the_source_model_and_echoes_id(invoke):
    status, result, body = invoke(load_event("infer-json"))
    assert status == 200, body
    document = json.loads(body)
    assert document["id"] == "req-1"
    assert [o["name"] for o in document["outputs"]] == ["probabilities"]  # the outputs filter
    probabilities = decode_infer_response(body, result["headers"])["probabilities"]
    np.testing.assert_allclose(probabilities, _iris_reference(), atol=1e-5)


def test_binary_infer_round_trips_through_base64(invoke):
    status, result, body = invoke(load_event("infer-binary"))
    assert status == 200, body
    assert result["isBase64Encoded"] is True
    assert result["headers"]["Content-Type"] == "application/octet-stream"
    outputs = decode_infer_response(body, result["headers"])
    np.testing.assert_allclose(outputs["probabilities"], _iris_reference(), atol=1e-5)
    assert outputs["label"].tolist() == [0, 2]


def test_versioned_route_and_flat_data(invoke):
    status, _, body = invoke(load_event("infer-version"))
    assert status == 200, body
    assert json.loads(body)["model_version"] == "1"


def test_second_request_in_the_same_environment_makes_no_s3_call(invoke):
    assert invoke(load_event("infer-json"))[0] == 200
    calls = count_s3_calls(aws.s3_client())
    for _ in range(3):
        assert invoke(load_event("infer-json"))[0] == 200
    assert calls == []


def test_first_request_reads_manifest_then_artifact(invoke):
    calls = count_s3_calls(aws.s3_client())
    assert invoke(load_event("infer-json"))[0] == 200
    assert calls == ["GetObject", "GetObject"]


@pytest.mark.parametrize(
    ("event", "status", "fragment"),
    [
        ("bad-shape", 400, "expects [-1, 4]"),
        ("bad-datatype", 400, "expects FP32"),
        ("bad-missing-input", 400, "unknown input 'other'"),
        ("bad-json", 400, "not valid JSON"),
        ("bad-count", 400, "needs 8"),
        ("bad-unknown-model", 404, "'resnet' is not served here"),
        ("bad-unknown-version", 404, "deployed version: 1"),
    ],
)
def test_bad_requests_get_a_4xx_that_names_the_problem(invoke, event, status, fragment):
    got, _, body = invoke(load_event(event))
    assert got == status, body
    assert fragment in json.loads(body)["error"]


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ("metadata", {"name": "iris", "versions": ["1"], "platform": "onnxruntime_onnx"}),
        ("ready", {"name": "iris", "ready": True}),
        ("server-metadata", {"name": "tierserve", "extensions": ["binary_tensor_data"]}),
        ("health-live", {"live": True}),
    ],
)
def test_metadata_ready_and_health_routes(invoke, event, expected):
    status, _, body = invoke(load_event(event))
    assert status == 200, body
    document = json.loads(body)
    assert {k: document[k] for k in expected} == expected


def test_metadata_lists_the_signature(invoke):
    document = json.loads(invoke(load_event("metadata"))[2])
    assert document["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert {o["name"] for o in document["outputs"]} == {"label", "probabilities"}


def test_unknown_route_is_a_json_404(invoke):
    event = load_event("metadata")
    event["path"] = "/v1/models/iris"
    status, _, body = invoke(event)
    assert status == 404
    assert "no route" in json.loads(body)["error"]


@pytest.mark.parametrize(("event_name", "allowed"), [("metadata", "GET"), ("infer-json", "POST")])
def test_a_method_the_route_does_not_take_is_a_405_naming_the_ones_it_does(invoke, event_name, allowed):
    event = load_event(event_name)
    event["httpMethod"] = "DELETE"
    status, result, body = invoke(event)
    assert status == 405
    assert result["headers"]["Allow"] == allowed
    assert json.loads(body)["error"] == f"DELETE is not allowed on {event['path']}; use {allowed}"


def test_sample_rows_classify_like_scikit_learn(invoke):
    rows = samples.iris_rows()
    event = load_event("infer-version")
    event["body"] = json.dumps(
        {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}]}
    )
    status, result, body = invoke(event)
    assert status == 200
    labels = decode_infer_response(body, result["headers"])["label"]
    from sklearn.datasets import load_iris

    assert (labels == load_iris(return_X_y=True)[1]).mean() > 0.95


def _infer_event(rows: np.ndarray, **document: object) -> dict:
    event = load_event("infer-version")
    event["body"] = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}
            ],
            **document,
        }
    )
    return event


def test_a_response_over_the_limit_is_a_413_that_says_how_to_shrink_it(
    s3, uploaded_iris, cache_dir, monkeypatch
):
    rows = np.tile(samples.iris_rows(), (4, 1))  # 600 rows: a JSON response of about 40 KB
    monkeypatch.setenv("TIERSERVE_MAX_RESPONSE_MB", str(20_000 / MB))
    invoke = make_invoke(monkeypatch, cache_dir)
    status, _, body = invoke(_infer_event(rows))
    assert status == 413, body[:300]
    message = json.loads(body)["error"]
    assert "the response would be" in message and "over the limit of 20,000" in message
    assert "binary_data_output" in message and "fewer rows" in message
    # The binary response the message suggests fits.
    status, result, body = invoke(_infer_event(rows, parameters={"binary_data_output": True}))
    assert status == 200, body[:300]
    assert decode_infer_response(body, result["headers"])["label"].shape == (600,)


def test_a_binary_response_is_measured_as_lambda_sends_it_base64_encoded(
    s3, uploaded_iris, cache_dir, monkeypatch
):
    event = _infer_event(samples.iris_rows(), parameters={"binary_data_output": True})
    status, _, body = make_invoke(monkeypatch, cache_dir)(event)
    assert status == 200
    base64_size = 4 * math.ceil(len(body) / 3) + PROXY_ENVELOPE_BYTES
    # A limit the raw body fits under, but not its base64 form.
    monkeypatch.setenv("TIERSERVE_MAX_RESPONSE_MB", str((len(body) + base64_size) / 2 / MB))
    status, _, reply = make_invoke(monkeypatch, cache_dir)(event)
    assert status == 413, reply[:300]
    assert f"the response would be {base64_size:,} bytes" in json.loads(reply)["error"]
    assert "binary_data_output" not in json.loads(reply)["error"]  # already binary: not suggested


def test_an_input_the_model_fails_on_is_a_400_through_the_handler(s3, cache_dir, tmp_path, monkeypatch):
    # y[r] = x[r, i[r]]: any INT64 index passes validation; one out of [0, 4) fails in the model.
    upload(package(gather_model(tmp_path / "gather.onnx"), "gather", tmp_path / "pkg"), s3, BUCKET, "models")
    invoke = make_invoke(monkeypatch, cache_dir, models="gather@1")

    def infer(indices: list[list[int]]) -> tuple[int, bytes]:
        event = load_event("infer-version")
        event["path"] = "/v2/models/gather/infer"
        x = {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": list(range(8))}
        i = {"name": "i", "shape": [2, 1], "datatype": "INT64", "data": indices}
        event["body"] = json.dumps({"inputs": [x, i]})
        status, _, body = invoke(event)
        return status, body

    status, body = infer([[1], [9]])
    assert status == 400, body
    error = json.loads(body)["error"]
    assert error.startswith("the model failed on this input: GatherElements node")
    assert "Out of range value in index tensor" in error and "onnxruntime_src" not in error
    status, body = infer([[1], [3]])
    assert status == 200, body
    assert json.loads(body)["outputs"][0]["data"] == [1.0, 7.0]


def test_one_function_serves_each_catalog_version_and_the_default_unversioned(
    s3, uploaded_iris, cache_dir, monkeypatch, tmp_path
):
    """As the CDK app configures a Lambda-tier model with several catalog versions: the default
    (listed first) answers the unversioned routes, every version its /versions/{v} routes."""
    other = samples.mlp(tmp_path / "v2.onnx", features=4, hidden=8, layers=1, classes=3, seed=3)
    upload_package(
        package_model(other, name="iris", version="2", out_dir=tmp_path / "pkg"), s3, BUCKET, "models"
    )
    invoke = make_invoke(monkeypatch, cache_dir, models="iris@2,iris@1")

    def answer(path: str) -> dict:
        event = load_event("infer-version")
        event["path"], event["pathParameters"] = path, {"proxy": path.removeprefix("/")}
        status, _, body = invoke(event)
        assert status == 200, body
        return json.loads(body)

    assert answer("/v2/models/iris/infer")["model_version"] == "2"
    assert answer("/v2/models/iris/versions/2/infer")["model_version"] == "2"
    old = answer("/v2/models/iris/versions/1/infer")
    assert old["model_version"] == "1" and [o["name"] for o in old["outputs"]] == ["label", "probabilities"]
    event = load_event("infer-version")
    event["path"] = "/v2/models/iris/versions/3/infer"
    event["pathParameters"] = {"proxy": event["path"].removeprefix("/")}
    status, _, body = invoke(event)
    assert status == 404 and "deployed versions: 2, 1" in json.loads(body)["error"]
