"""The Lambda API handler end to end: API Gateway events in, real onnxruntime on a model
fetched from the embedded S3, OIP responses out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from support.common import count_s3_calls, load_event
from tierserve import store
from tierserve.local import samples
from tierserve.protocol import decode_infer_response


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
    calls = count_s3_calls(store.default_s3_client())
    for _ in range(3):
        assert invoke(load_event("infer-json"))[0] == 200
    assert calls == []


def test_first_request_reads_manifest_then_artifact(invoke):
    calls = count_s3_calls(store.default_s3_client())
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


def test_wrong_method_is_a_json_error(invoke):
    event = load_event("metadata")
    event["httpMethod"] = "DELETE"
    status, _, body = invoke(event)
    assert status in (404, 405)
    assert "error" in json.loads(body)


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
