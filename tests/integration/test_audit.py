"""One audit record per inference, on every tier: who called (from the request's context),
which model and version, the status, the latency and the request id; never tensor data."""

from __future__ import annotations

import base64
import copy
import json

import pytest

from support.common import load_event, make_handler
from support.gpu import InProcessServer, request
from support.operations import audit_records
from support.rawhttp import exchange, post
from tierserve.settings import CACHE_DIR_ENV, MODEL_BUCKET_ENV, MODELS_ENV, PRELOAD_ENV
from tierserve.tools.local.api_server import LocalApi
from tierserve.tools.local.apigw import LocalLambdaContext
from tierserve.tools.local.stack import load_handler

FIELDS = {"audit", "caller", "model", "version", "status", "latency_ms", "request_id", "tier"}
# What the sample requests and their answers hold: none of it may reach an audit record.
TENSOR_TEXT = ("5.1", "3.5", "6.7", "probabilities", "data", "inputs", "outputs", "binary")
LINE_FIELDS = {"level", "message", "timestamp", "service", *FIELDS, "cache", "key"}


def assert_no_tensor_data(record: dict) -> None:
    """Only the audit's own fields, no list or object among them, and no string that quotes a
    tensor (the numbers are the status and the latency; the timestamp has digits of its own)."""
    assert set(record) <= LINE_FIELDS, set(record) - LINE_FIELDS
    assert not [v for v in record.values() if isinstance(v, list | dict)], record
    text = json.dumps({k: v for k, v in record.items() if isinstance(v, str) and k != "timestamp"})
    leaked = [fragment for fragment in TENSOR_TEXT if fragment in text]
    assert not leaked, (leaked, text)


def identified(event: dict, **identity: str) -> dict:
    event = copy.deepcopy(event)
    event["requestContext"]["apiId"] = "abc123"  # a deployed API's, not the local one
    event["requestContext"]["identity"].update(identity)
    return event


@pytest.mark.parametrize(
    ("identity", "authorizer", "caller"),
    [
        (
            {"userArn": "arn:aws:iam::123456789012:user/alice"},
            None,
            "iam:arn:aws:iam::123456789012:user/alice",
        ),
        ({"apiKeyId": "k9x7", "userArn": None}, None, "api_key:k9x7"),
        ({}, {"principalId": "user-42"}, "authorizer:user-42"),
        ({}, None, "anonymous"),
    ],
)
def test_the_lambda_tier_records_who_called_which_model(invoke, identity, authorizer, caller):
    event = identified(load_event("infer-json"), **identity)
    if authorizer:
        event["requestContext"]["authorizer"] = authorizer
    with audit_records() as records:
        assert invoke(event)[0] == 200
    [record] = records
    assert set(record) >= FIELDS
    assert record["audit"] == "inference" and record["message"] == "inference"
    assert (record["caller"], record["model"], record["version"]) == (caller, "iris", "1")
    assert (record["status"], record["tier"]) == (200, "lambda")
    assert record["request_id"] == event["requestContext"]["requestId"]
    assert record["latency_ms"] > 0
    assert record["level"] == "INFO"  # logged although the suite's log level is WARNING
    assert_no_tensor_data(record)


def test_refused_and_unknown_requests_are_recorded_with_their_status(invoke):
    with audit_records() as records:
        assert invoke(load_event("bad-shape"))[0] == 400
        assert invoke(load_event("bad-unknown-model"))[0] == 404
        assert invoke(load_event("metadata"))[0] == 200  # not an inference: no record
    refused, unknown = records
    assert (refused["status"], refused["model"], refused["version"]) == (400, "iris", "1")
    assert (unknown["status"], unknown["model"], unknown.get("version")) == (404, "resnet", None)
    for record in records:
        assert record["caller"] == "local"  # the events' apiId is the local API's
        assert_no_tensor_data(record)


def test_a_body_refused_before_its_route_ran_is_recorded_too(invoke):
    """Binary tensors that reached the function as text, a body marked base64 that is not:
    refused before the data plane sees them, and still inference attempts of a model."""
    event = load_event("infer-binary")
    as_text = {
        **event,
        "body": base64.b64decode(event["body"]).decode("utf-8", "replace"),
        "isBase64Encoded": False,
    }
    with audit_records() as records:
        assert invoke(identified(as_text, userArn="arn:aws:iam::123456789012:user/bob"))[0] == 400
        assert invoke({**event, "body": "not base64!"})[0] == 400
    text, not_base64 = records
    assert (text["status"], text["model"], text["caller"]) == (
        400,
        "iris",
        "iam:arn:aws:iam::123456789012:user/bob",
    )
    assert text["request_id"] == event["requestContext"]["requestId"]
    assert (not_base64["status"], not_base64["model"], not_base64["tier"]) == (400, "iris", "lambda")
    for record in records:
        assert_no_tensor_data(record)


def test_the_gpu_server_records_sagemaker_calls_with_their_inference_id(iris_package, cache_dir):
    server = InProcessServer(
        {"TIERSERVE_MODEL_DIR": str(iris_package.artifact.parent), "TIERSERVE_CACHE_DIR": str(cache_dir)}
    )
    try:
        assert server.host.wait_ready(30)
        body = load_event("infer-json")["body"].encode()
        with audit_records() as records:
            status, _, _ = request(
                server.port, "POST", "/invocations", body, {"X-Amzn-SageMaker-Inference-Id": "inv-1"}
            )
            assert status == 200
            assert request(server.port, "POST", "/v2/models/iris/infer", b"{}")[0] == 400
    finally:
        server.stop()
    invocation, direct = records
    assert (invocation["caller"], invocation["request_id"], invocation["tier"]) == (
        "sagemaker",
        "inv-1",
        "gpu",
    )
    assert (invocation["model"], invocation["version"], invocation["status"]) == ("iris", "1", 200)
    assert (direct["caller"], direct["status"]) == ("direct", 400)
    assert direct["request_id"]  # one is made when the caller names none
    for record in records:
        assert_no_tensor_data(record)


def test_the_local_api_records_its_callers_as_local(s3, uploaded_iris, cache_dir, monkeypatch):
    handler = make_handler(monkeypatch, cache_dir)
    api = LocalApi(handler, functions={"iris": handler}, port=0).start()
    try:
        port = int(api.url.rsplit(":", 1)[1])
        body = load_event("infer-json")["body"].encode()
        with audit_records() as records:
            reply = exchange(port, post("/v2/models/iris/infer", body, "Content-Type: application/json\r\n"))
            assert reply.status == 200
    finally:
        api.stop()
    [record] = records
    assert (record["caller"], record["model"], record["status"], record["tier"]) == (
        "local",
        "iris",
        200,
        "lambda",
    )
    assert_no_tensor_data(record)


def test_the_s3_worker_records_who_put_each_input(s3, uploaded_iris, cache_dir, monkeypatch):
    data = "audit-data"
    s3.create_bucket(Bucket=data)
    monkeypatch.setenv(MODEL_BUCKET_ENV, "test-models")
    monkeypatch.setenv(MODELS_ENV, "iris@1")
    monkeypatch.setenv(CACHE_DIR_ENV, str(cache_dir))
    monkeypatch.delenv(PRELOAD_ENV, raising=False)
    handler = load_handler({}, module="worker")
    records = []
    for index, (key, body) in enumerate(
        (("inputs/iris/rows.jsonl", b"[5.1,3.5,1.4,0.2]\n"), ("inputs/iris/bad.jsonl", b"[1, 2]\n"))
    ):
        etag = s3.put_object(Bucket=data, Key=key, Body=body)["ETag"].strip('"')
        message = json.loads(load_event("sqs-s3-put")["Records"][0]["body"])
        message["Records"][0]["s3"]["bucket"] = {"name": data, "arn": f"arn:aws:s3:::{data}"}
        message["Records"][0]["s3"]["object"] = {"key": key, "eTag": etag, "size": len(body)}
        records.append(
            {**load_event("sqs-s3-put")["Records"][0], "messageId": f"m-{index}", "body": json.dumps(message)}
        )
    context = LocalLambdaContext()
    with audit_records() as audited:
        assert handler({"Records": records}, context)["batchItemFailures"] == []
    by_key = {record["key"]: record for record in audited}
    served, refused = by_key["inputs/iris/rows.jsonl"], by_key["inputs/iris/bad.jsonl"]
    assert (served["caller"], served["model"], served["version"], served["status"]) == (
        "s3:AWS:EXAMPLE",
        "iris",
        "1",
        200,
    )
    assert (refused["status"], refused["tier"]) == (400, "s3")
    assert served["request_id"] == refused["request_id"] == context.aws_request_id  # the invocation's
    for record in audited:
        assert_no_tensor_data({k: v for k, v in record.items() if k != "key"})  # the key is a path
