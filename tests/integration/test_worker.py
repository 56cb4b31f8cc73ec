"""The S3 worker end to end: SQS events in (built from events/sqs-s3-put.json, or sent by
moto's own S3 -> SQS notifications), the real handler, real onnxruntime, results in S3.

Every test ends with the pipeline's promise checked on the bucket listing: each input has
exactly one result (an output or an error) unless it was dead-lettered, every result answers
an input, and nothing is ever written under inputs/."""

from __future__ import annotations

import io
import json
import sys
import threading
import time
from collections.abc import Callable
from urllib.parse import quote_plus, unquote_plus

import numpy as np
import pytest
from sklearn.datasets import load_iris

from support.common import BUCKET, count_s3_calls, load_event, printed_document
from support.pipeline import ROWS, infer_request, jsonl
from support.pipeline import assert_one_result_per_input as assert_one_result
from support.pipeline import keys as bucket_keys
from support.sagemaker import SageMakerDouble, container_error, model_error, service_error, start_container
from tierserve import aws
from tierserve.errors import ModelUnavailable, UpstreamUnavailable
from tierserve.s3_pipeline import parse_input_key, parse_message
from tierserve.s3_pipeline.results import Known
from tierserve.settings import (
    CACHE_DIR_ENV,
    COLD_RETRY_S_ENV,
    DATA_BUCKET_ENV,
    GPU_ENDPOINTS_ENV,
    MAX_INPUT_MB_ENV,
    MAX_JSONL_MB_ENV,
    MAX_ROWS_ENV,
    MODEL_BUCKET_ENV,
    MODELS_ENV,
    PRELOAD_ENV,
    ROW_BATCH_SIZE_ENV,
    WORKER_CONCURRENCY_ENV,
)
from tierserve.tools.local import samples
from tierserve.tools.local.apigw import LocalLambdaContext
from tierserve.tools.local.s3_queue import QueuePoller, create_resources
from tierserve.tools.local.stack import load_handler

DATA = "test-data"
PIPELINE_ENV = (
    DATA_BUCKET_ENV,
    GPU_ENDPOINTS_ENV,
    ROW_BATCH_SIZE_ENV,
    MAX_INPUT_MB_ENV,
    MAX_ROWS_ENV,
    MAX_JSONL_MB_ENV,
    COLD_RETRY_S_ENV,
)


def npy(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **kwargs)
    return buffer.getvalue()


def npy_claiming(rows: int) -> bytes:
    """A tiny .npy file whose header declares ``rows`` rows of four floats."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (rows, 4)})
    return buffer.getvalue() + bytes(32)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


class Worker:
    """The worker handler as Lambda runs it, and S3 events for objects the test puts."""

    def __init__(self, s3, handler: Callable) -> None:
        self.s3, self.handler = s3, handler
        self.module = sys.modules["worker"]
        self._ids = 0

    def put(self, key: str, body: bytes, bucket: str = DATA, **event_fields) -> str:
        """Put an object and return the S3 notification body S3 would send for it."""
        put = self.s3.put_object(Bucket=bucket, Key=key, Body=body)
        return self.message(key, bucket=bucket, etag=put["ETag"].strip('"'), size=len(body), **event_fields)

    def message(self, key: str, *, bucket: str = DATA, **object_fields) -> str:
        body = json.loads(load_event("sqs-s3-put")["Records"][0]["body"])
        record = body["Records"][0]
        record["s3"]["bucket"] = {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"}
        names = {"etag": "eTag", "version_id": "versionId"}  # as S3 spells them
        item = {"key": quote_plus(key)}
        item.update({names.get(k, k): v for k, v in object_fields.items() if v is not None})
        record["s3"]["object"] = item
        return json.dumps(body)

    def deliver(self, *bodies: str, context: LocalLambdaContext | None = None) -> list[int]:
        """Invoke the handler with one SQS batch; the indexes of the messages it reported failed."""
        template = load_event("sqs-s3-put")["Records"][0]
        records = []
        for body in bodies:
            self._ids += 1
            records.append({**template, "messageId": f"message-{self._ids}", "body": body})
        response = self.handler({"Records": records}, context or LocalLambdaContext())
        failed = {f["itemIdentifier"] for f in response["batchItemFailures"]}
        return [i for i, record in enumerate(records) if record["messageId"] in failed]

    def read(self, key: str, bucket: str = DATA) -> dict:
        return json.loads(self.s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def keys(s3, bucket: str = DATA) -> list[str]:
    return bucket_keys(s3, bucket)


def assert_one_result_per_input(s3, bucket: str = DATA, **kwargs) -> None:
    assert_one_result(s3, bucket, **kwargs)


@pytest.fixture
def data_bucket(s3) -> str:
    s3.create_bucket(Bucket=DATA)
    return DATA


@pytest.fixture
def make_worker(s3, uploaded_iris, data_bucket, cache_dir, monkeypatch) -> Callable[..., Worker]:
    def make(**env: str) -> Worker:
        monkeypatch.setenv(MODEL_BUCKET_ENV, BUCKET)
        monkeypatch.setenv(MODELS_ENV, "iris@1")
        monkeypatch.setenv(CACHE_DIR_ENV, str(cache_dir))
        monkeypatch.delenv(PRELOAD_ENV, raising=False)
        for name in PIPELINE_ENV:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        aws.clear_clients()  # made again from this environment
        return Worker(s3, load_handler({}, module="worker"))

    return make


@pytest.fixture
def worker(make_worker) -> Worker:
    return make_worker()


# ---------------------------------------------------------------- every format


def test_a_json_request_file_gets_its_oip_output(worker):
    message = worker.put(
        "inputs/iris/req.json", infer_request(id="req-7", parameters={"binary_data_output": True})
    )
    assert worker.deliver(message) == []
    document = worker.read("outputs/iris/req.json.json")
    assert (document["model_name"], document["model_version"], document["id"]) == ("iris", "1", "req-7")
    outputs = {o["name"]: o for o in document["outputs"]}
    assert outputs["label"]["data"] == [0, 2]  # JSON outputs even when the request asked for binary
    assert outputs["probabilities"]["shape"] == [2, 3]
    head = worker.s3.head_object(Bucket=DATA, Key="inputs/iris/req.json")
    assert document["parameters"] == {
        "input_bucket": DATA,
        "input_key": "inputs/iris/req.json",
        "input_etag": head["ETag"].strip('"'),
        "input_format": "json",
    }
    result = worker.s3.head_object(Bucket=DATA, Key="outputs/iris/req.json.json")
    assert result["ContentType"] == "application/json"
    assert result["Metadata"]["tierserve-model"] == "iris@1"
    assert result["Metadata"]["tierserve-input-etag"] == head["ETag"].strip('"')
    assert "tierserve-processed-at" in result["Metadata"]
    assert_one_result_per_input(worker.s3)


def test_an_npy_tensor_gets_the_same_outputs_as_json(worker):
    assert worker.deliver(worker.put("inputs/iris/a.json", infer_request())) == []
    assert worker.deliver(worker.put("inputs/iris/a.npy", npy(np.asarray(ROWS, np.float32)))) == []
    from_json = worker.read("outputs/iris/a.json.json")["outputs"]
    from_npy = worker.read("outputs/iris/a.npy.json")["outputs"]
    assert from_npy == from_json
    assert worker.read("outputs/iris/a.npy.json")["parameters"]["input_format"] == "npy"
    assert_one_result_per_input(worker.s3)


def test_jsonl_rows_run_in_several_batches_and_join_in_order(make_worker):
    worker = make_worker(**{ROW_BATCH_SIZE_ENV: "16"})
    rows = samples.iris_rows()
    objects = [{"input": row} for row in rows[:75].tolist()] + rows[75:].tolist()  # both row forms
    calls = []
    model_predict = worker.module.pipeline._run

    def counting_run(ref, manifest, batches, names):
        def counted():
            for batch in batches:
                calls.append(batch[1])
                yield batch

        return model_predict(ref, manifest, counted(), names)

    worker.module.pipeline._run = counting_run
    assert worker.deliver(worker.put("inputs/iris/all.jsonl", jsonl(objects))) == []
    document = worker.read("outputs/iris/all.jsonl.json")
    assert calls == [16] * 9 + [6]
    assert document["parameters"]["rows"] == 150
    labels = {o["name"]: o for o in document["outputs"]}["label"]
    assert labels["shape"] == [150]
    assert (np.asarray(labels["data"]) == load_iris(return_X_y=True)[1]).mean() > 0.95
    # the same rows as one .json request give the same numbers
    assert worker.deliver(worker.put("inputs/iris/all.json", infer_request(rows.tolist()))) == []
    assert worker.read("outputs/iris/all.json.json")["outputs"] == document["outputs"]
    assert_one_result_per_input(worker.s3)


def test_keys_with_spaces_and_unicode_arrive_url_encoded(worker):
    key = "inputs/iris/my data/rows é 1.jsonl"
    assert worker.deliver(worker.put(key, jsonl(ROWS))) == []
    assert worker.read("outputs/iris/my data/rows é 1.jsonl.json")["parameters"]["input_key"] == key
    assert_one_result_per_input(worker.s3)


# ---------------------------------------------------------------- inputs that cannot be served


@pytest.mark.parametrize(
    ("key", "body", "env", "status", "fragment"),
    [
        ("inputs/iris/bad.json", b"{not json", {}, 400, "not valid JSON"),
        ("inputs/iris/shape.json", infer_request([[1, 2, 3]]), {}, 400, "expects [-1, 4]"),
        ("inputs/iris/table.csv", b"1,2,3,4\n", {}, 400, "no supported extension"),
        (
            "inputs/iris/obj.npy",
            npy(np.array([{"x": 1}], dtype=object), allow_pickle=True),
            {},
            400,
            "pickled",
        ),
        ("inputs/iris/rows.jsonl", b"[1,2,3,4]\n[1,2]\n", {}, 400, "lines 1-2"),
        ("inputs/resnet/x.json", infer_request(), {}, 404, "'resnet' is not served here"),
        ("inputs/iris/big.json", infer_request(), {MAX_INPUT_MB_ENV: "0.0001"}, 413, MAX_INPUT_MB_ENV),
        (
            "inputs/iris/big.npy",
            npy(np.zeros((50, 4), np.float32)),
            {MAX_INPUT_MB_ENV: "0.0001"},
            413,
            "limit",
        ),
        ("inputs/iris/many.jsonl", jsonl(ROWS * 3), {MAX_ROWS_ENV: "5"}, 413, "more than 5 rows"),
        ("inputs/iris/huge.jsonl", jsonl(ROWS * 50), {MAX_JSONL_MB_ENV: "0.001"}, 413, MAX_JSONL_MB_ENV),
        (
            "inputs/iris/deep.json",
            b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":' + nested(100_000) + b"}]}",
            {},
            400,
            "",  # protocol.py words the reason; that it is an error, not a retry, is the point
        ),
        ("inputs/iris/deep.jsonl", jsonl(ROWS) + nested(100_000) + b"\n", {}, 400, "line 3"),
        ("inputs/iris/claims.npy", npy_claiming(10**12), {}, 413, "over the limit"),
        ("inputs/iris/short.npy", npy_claiming(3), {}, 400, "not the 48 bytes"),
    ],
    ids=[
        "json",
        "shape",
        "extension",
        "pickle",
        "jsonl-row",
        "unknown-model",
        "json-size",
        "npy-size",
        "rows",
        "jsonl-size",
        "json-nested",
        "jsonl-nested",
        "npy-header-huge",
        "npy-header-short",
    ],
)
def test_an_input_that_cannot_be_served_leaves_its_reason_and_is_not_retried(
    make_worker, key, body, env, status, fragment
):
    worker = make_worker(**env)
    assert worker.deliver(worker.put(key, body)) == []
    error_key = "errors/" + key.removeprefix("inputs/") + ".json"
    document = worker.read(error_key)
    assert document["status"] == status
    assert fragment in document["error"]
    assert document["model_name"] == key.split("/")[1]
    assert document["parameters"]["input_key"] == key
    assert not [k for k in keys(worker.s3) if k.startswith("outputs/")]
    assert_one_result_per_input(worker.s3)


@pytest.mark.parametrize(
    ("failure", "status", "fragment"),
    [
        (MemoryError(), 413, "too large to decode"),
        (RecursionError("maximum recursion depth exceeded"), 400, "nested too deeply"),
        (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), 400, "not valid Unicode"),
    ],
    ids=["memory", "recursion", "unicode"],
)
def test_a_decoding_failure_that_would_fail_every_time_is_an_error_not_a_retry(
    worker, monkeypatch, failure, status, fragment
):
    def parse(*args, **kwargs):
        raise failure

    monkeypatch.setattr("tierserve.s3_pipeline.formats.parse_infer_request", parse)
    assert worker.deliver(worker.put("inputs/iris/x.json", infer_request())) == []
    document = worker.read("errors/iris/x.json.json")
    assert document["status"] == status and fragment in document["error"]
    assert_one_result_per_input(worker.s3)


def test_a_request_id_with_a_lone_surrogate_is_served(worker):
    body = infer_request().replace(b'{"inputs"', b'{"id": "\\ud800-7", "inputs"', 1)
    assert worker.deliver(worker.put("inputs/iris/x.json", body)) == []
    raw = worker.s3.get_object(Bucket=DATA, Key="outputs/iris/x.json.json")["Body"].read()
    assert json.loads(raw)["id"] == "\ud800-7"
    assert_one_result_per_input(worker.s3)


def test_the_response_is_encoded_once_with_its_parameters(worker, monkeypatch):
    """The output file is the encoded response with the parameters added, not parsed back and
    dumped again (a 100,000-row output would exist three times over)."""
    from tierserve.s3_pipeline import worker as module

    encoded: list[bytes] = []
    encode = module.encode_infer_response

    def spy_encode(*args, **kwargs):
        response = encode(*args, **kwargs)
        encoded.append(response.body)
        return response

    parsed: list[object] = []
    from tierserve import protocol
    from tierserve.s3_pipeline import formats

    def spy_loads(text, *args, **kwargs):
        parsed.append(text)
        return json.loads(text, *args, **kwargs)

    monkeypatch.setattr(module, "encode_infer_response", spy_encode)
    for parser in (protocol, formats):  # every JSON reader the worker's path could reach
        monkeypatch.setattr(parser, "loads", spy_loads)
    assert worker.deliver(worker.put("inputs/iris/x.npy", npy(np.asarray(ROWS, np.float32)))) == []
    [body] = encoded
    assert not [text for text in parsed if text == body]
    document = worker.read("outputs/iris/x.npy.json")
    assert document["parameters"]["input_format"] == "npy"
    assert {k: v for k, v in document.items() if k != "parameters"} == json.loads(body)


def test_test_events_and_keys_outside_inputs_write_nothing(worker):
    test_event = load_event("sqs-s3-test-event")["Records"][0]["body"]
    elsewhere = worker.put("uploads/iris/x.json", infer_request())
    folder = worker.message("inputs/iris/", size=0)
    assert worker.deliver(test_event, elsewhere, folder) == []
    assert keys(worker.s3) == ["uploads/iris/x.json"]


def test_a_poison_message_is_failed_alone_and_writes_nothing(worker):
    good = worker.put("inputs/iris/good.json", infer_request())
    sneaky = worker.put("inputs/iris/../escape.json", infer_request())
    assert worker.deliver("this is not an S3 event", good, sneaky, '{"Records": []}') == [0, 2, 3]
    assert keys(worker.s3) == [
        "inputs/iris/../escape.json",
        "inputs/iris/good.json",
        "outputs/iris/good.json.json",
    ]
    assert_one_result_per_input(worker.s3, dead_lettered={"inputs/iris/../escape.json"})


def test_when_every_message_fails_each_is_reported_not_raised(worker):
    assert worker.deliver("garbage", "more garbage") == [0, 1]
    assert keys(worker.s3) == []


# ---------------------------------------------------------------- transient faults


def test_s3_down_is_a_batch_item_failure_then_redelivery_succeeds(flaky, worker):
    message = worker.put("inputs/iris/x.jsonl", jsonl(ROWS))
    flaky.down = True
    assert worker.deliver(message) == [0]
    assert keys(worker.s3) == ["inputs/iris/x.jsonl"]
    flaky.down = False
    assert worker.deliver(message) == []
    assert worker.read("outputs/iris/x.jsonl.json")["parameters"]["rows"] == 2
    assert_one_result_per_input(worker.s3)


def test_a_few_failing_s3_requests_are_retried_by_the_next_delivery(flaky, worker):
    message = worker.put("inputs/iris/x.json", infer_request())
    assert worker.deliver(message) == []  # warm the model: the faults below hit the data path
    worker.s3.delete_object(Bucket=DATA, Key="outputs/iris/x.json.json")
    flaky.fail_next = 4  # more than botocore's own attempts for one call
    assert worker.deliver(message) == [0]
    assert worker.deliver(message) == []
    assert_one_result_per_input(worker.s3)


def fail_s3_once(operation: str, code: str = "SlowDown", status: int = 503) -> list[str]:
    """Make the worker's next ``operation`` call fail once, as S3 would; returns the failures seen."""
    from botocore.exceptions import ClientError

    failures: list[str] = []

    def fail(params, **_):
        if not failures:
            failures.append(params.get("Key", params.get("Prefix")))
            raise ClientError(
                {
                    "Error": {"Code": code, "Message": "injected"},
                    "ResponseMetadata": {"HTTPStatusCode": status},
                },
                operation,
            )

    aws.s3_client().meta.events.register(f"before-parameter-build.s3.{operation}", fail)
    return failures


@pytest.mark.parametrize(
    ("operation", "action", "result"),
    [
        ("PutObject", "writing", "outputs/iris/x.json.json"),
        ("HeadObject", "reading", "errors/iris/x.json.json"),  # the other kind, once the output is written
    ],
)
def test_an_s3_failure_says_what_the_worker_was_doing(worker, operation, action, result):
    from tierserve.s3_pipeline import S3Object

    put = worker.s3.put_object(Bucket=DATA, Key="inputs/iris/x.json", Body=infer_request())
    failures = fail_s3_once(operation)
    with pytest.raises(UpstreamUnavailable) as raised:
        worker.module.pipeline.handle(S3Object(DATA, "inputs/iris/x.json", etag=put["ETag"].strip('"')))
    assert failures == [result]
    assert f"while {action} s3://{DATA}/{result} (SlowDown)" in raised.value.message


def test_a_result_left_beside_the_newer_one_by_a_failed_delete_is_removed_on_redelivery(worker, monkeypatch):
    ticks = iter(range(1_000_000, 2_000_000))
    monkeypatch.setattr(worker.module.pipeline.results, "_clock", lambda: float(next(ticks)))
    assert worker.deliver(worker.put("inputs/iris/x.json", b"{broken")) == []
    fixed = worker.put("inputs/iris/x.json", infer_request())
    failures = fail_s3_once("DeleteObject")
    with pytest.raises(UpstreamUnavailable, match=f"while deleting s3://{DATA}/errors/iris/x.json.json"):
        worker.module.pipeline.handle_message(fixed)  # the output is written; removing the error fails
    assert failures == ["errors/iris/x.json.json"]
    assert keys(worker.s3) == ["errors/iris/x.json.json", "inputs/iris/x.json", "outputs/iris/x.json.json"]
    assert worker.deliver(fixed) == []  # redelivered: a duplicate, and the stale error goes
    assert keys(worker.s3) == ["inputs/iris/x.json", "outputs/iris/x.json.json"]
    assert_one_result_per_input(worker.s3)


def test_a_redelivered_older_result_never_removes_a_newer_one(worker, monkeypatch):
    ticks = iter(range(1_000_000, 2_000_000))
    monkeypatch.setattr(worker.module.pipeline.results, "_clock", lambda: float(next(ticks)))
    first = worker.put("inputs/iris/x.json", infer_request())
    assert worker.deliver(first) == []
    broken = worker.put("inputs/iris/x.json", b"{broken")
    fail_s3_once("DeleteObject")
    assert worker.deliver(broken) == [0]  # the error is written, removing the old output fails
    assert worker.deliver(first) == []  # the old event again: a duplicate of the older output
    assert "errors/iris/x.json.json" in keys(worker.s3)
    assert worker.deliver(broken) == []  # the newer event again: the older output goes
    assert keys(worker.s3) == ["errors/iris/x.json.json", "inputs/iris/x.json"]


def test_with_sequencers_a_duplicate_removes_the_older_result_of_the_other_kind(versioned, worker):
    old, _ = put_version(worker, "inputs/iris/x.json", b"{broken", "0A")
    new, _ = put_version(worker, "inputs/iris/x.json", infer_request(), "0B")
    assert worker.deliver(old) == []
    fail_s3_once("DeleteObject")
    assert worker.deliver(new) == [0]
    assert worker.deliver(old) == []  # stale: it removes nothing
    assert len([k for k in keys(worker.s3) if k.startswith(("outputs/", "errors/"))]) == 2
    assert worker.deliver(new) == []
    assert keys(worker.s3) == ["inputs/iris/x.json", "outputs/iris/x.json.json"]


# ---------------------------------------------------------------- idempotency and ordering


def test_duplicate_deliveries_leave_one_output_and_write_nothing_again(worker):
    message = worker.put("inputs/iris/x.json", infer_request())
    assert worker.deliver(message, message) == []
    first = worker.s3.get_object(Bucket=DATA, Key="outputs/iris/x.json.json")["Body"].read()
    calls = count_s3_calls(aws.s3_client())
    assert worker.deliver(message) == []
    # A small input is read and run; its conditional write is refused, and the look that
    # follows finds the duplicate: nothing is written or removed.
    assert calls == ["GetObject", "PutObject", "HeadObject", "HeadObject"]
    assert worker.s3.get_object(Bucket=DATA, Key="outputs/iris/x.json.json")["Body"].read() == first
    assert_one_result_per_input(worker.s3)


def test_a_large_input_delivered_again_is_skipped_before_it_is_read(worker):
    from tierserve.s3_pipeline.worker import LOOK_FIRST_BYTES

    rows = jsonl(ROWS * (LOOK_FIRST_BYTES // len(jsonl(ROWS)) + 1))
    message = worker.put("inputs/iris/big.jsonl", rows)
    assert worker.deliver(message) == []
    calls = count_s3_calls(aws.s3_client())
    assert worker.deliver(message) == []
    assert calls == ["HeadObject", "HeadObject"]  # seen as a duplicate: no GetObject, no model run
    assert_one_result_per_input(worker.s3)


def test_a_batch_of_new_inputs_costs_a_get_and_a_put_each_and_one_listing(worker):
    assert worker.deliver(worker.put("inputs/iris/warm.json", infer_request())) == []  # the model loads
    messages = [worker.put(f"inputs/iris/b/{i}.json", infer_request()) for i in range(6)]
    calls = count_s3_calls(aws.s3_client())
    assert worker.deliver(*messages) == []
    assert sorted(calls) == ["GetObject"] * 6 + ["ListObjectsV2"] + ["PutObject"] * 6
    assert_one_result_per_input(worker.s3)


def test_the_listing_of_a_batch_finds_errors_to_replace(worker):
    broken = [worker.put(f"inputs/iris/b/{i}.json", b"{broken") for i in range(3)]
    assert worker.deliver(*broken) == []
    fixed = [worker.put(f"inputs/iris/b/{i}.json", infer_request()) for i in range(3)]
    new = [worker.put(f"inputs/iris/b/new-{i}.json", infer_request()) for i in range(3)]
    calls = count_s3_calls(aws.s3_client())
    assert worker.deliver(*fixed, *new) == []
    assert keys(worker.s3) == sorted(
        [f"inputs/iris/b/{i}.json" for i in range(3)]
        + [f"inputs/iris/b/new-{i}.json" for i in range(3)]
        + [f"outputs/iris/b/{i}.json.json" for i in range(3)]
        + [f"outputs/iris/b/new-{i}.json.json" for i in range(3)]
    )
    # The listed errors are looked at once the outputs are written, and removed; the new
    # inputs, which the listing shows without an error, need no look at all.
    assert calls.count("HeadObject") == 3 and calls.count("DeleteObject") == 3


def test_a_batch_whose_listing_fails_looks_for_each_result_instead(worker):
    broken = worker.put("inputs/iris/b/0.json", b"{broken")
    assert worker.deliver(broken) == []
    failures = fail_s3_once("ListObjectsV2", "AccessDenied", 403)
    fixed = worker.put("inputs/iris/b/0.json", infer_request())
    new = worker.put("inputs/iris/b/1.json", infer_request())
    assert worker.deliver(fixed, new) == []
    assert failures
    assert keys(worker.s3) == [
        "inputs/iris/b/0.json",
        "inputs/iris/b/1.json",
        "outputs/iris/b/0.json.json",
        "outputs/iris/b/1.json.json",
    ]


def test_the_same_input_processed_again_writes_the_same_bytes(make_worker):
    worker = make_worker()
    message = worker.put("inputs/iris/x.jsonl", jsonl(ROWS * 20))
    assert worker.deliver(message) == []
    first = worker.s3.get_object(Bucket=DATA, Key="outputs/iris/x.jsonl.json")["Body"].read()
    worker.s3.delete_object(Bucket=DATA, Key="outputs/iris/x.jsonl.json")
    cold = make_worker(**{ROW_BATCH_SIZE_ENV: "7"})  # a new environment, other batch boundaries
    assert cold.deliver(message) == []
    assert cold.s3.get_object(Bucket=DATA, Key="outputs/iris/x.jsonl.json")["Body"].read() == first


def test_a_crash_after_the_output_is_written_is_redelivered_to_the_same_single_output(worker, monkeypatch):
    message = worker.put("inputs/iris/x.json", infer_request())
    from tierserve.s3_pipeline import results

    finished = results.finished

    def crash_once(*args):
        monkeypatch.setattr(results, "finished", finished)
        raise RuntimeError("the execution environment died before acknowledging")

    monkeypatch.setattr(results, "finished", crash_once)
    assert worker.deliver(message) == [0]
    written = worker.s3.get_object(Bucket=DATA, Key="outputs/iris/x.json.json")["Body"].read()
    assert worker.deliver(message) == []
    assert worker.s3.get_object(Bucket=DATA, Key="outputs/iris/x.json.json")["Body"].read() == written
    assert keys(worker.s3) == ["inputs/iris/x.json", "outputs/iris/x.json.json"]


@pytest.fixture
def versioned(s3, data_bucket):
    s3.put_bucket_versioning(Bucket=DATA, VersioningConfiguration={"Status": "Enabled"})


def put_version(worker, key: str, body: bytes, sequencer: str) -> tuple[str, str]:
    put = worker.s3.put_object(Bucket=DATA, Key=key, Body=body)
    message = worker.message(
        key, etag=put["ETag"].strip('"'), size=len(body), version_id=put["VersionId"], sequencer=sequencer
    )
    return message, put["VersionId"]


def test_an_older_event_redelivered_late_never_overwrites_a_newer_result(versioned, worker):
    old, old_version = put_version(
        worker, "inputs/iris/x.json", infer_request(ROWS[:1]), "0055AED6DCD90281E5"
    )
    new, new_version = put_version(worker, "inputs/iris/x.json", infer_request(ROWS), "0055AED6DCD90281E6")
    assert worker.deliver(new) == []
    assert worker.deliver(old) == []  # out of order: acknowledged, and skipped
    document = worker.read("outputs/iris/x.json.json")
    assert document["parameters"]["input_version_id"] == new_version != old_version
    assert {o["name"]: o for o in document["outputs"]}["label"]["data"] == [0, 2]
    result = worker.s3.head_object(Bucket=DATA, Key="outputs/iris/x.json.json")
    assert result["Metadata"]["tierserve-sequencer"] == "0055AED6DCD90281E6"


def test_events_in_order_replace_the_result_with_the_newer_one(versioned, worker):
    old, _ = put_version(worker, "inputs/iris/x.json", infer_request(ROWS[:1]), "0A")
    new, new_version = put_version(worker, "inputs/iris/x.json", infer_request(ROWS), "0B")
    assert worker.deliver(old) == []
    assert worker.deliver(new) == []
    assert worker.read("outputs/iris/x.json.json")["parameters"]["input_version_id"] == new_version


def test_in_an_unversioned_bucket_an_overwritten_inputs_old_event_is_skipped(worker):
    old = worker.put("inputs/iris/x.json", infer_request(ROWS[:1]))
    new = worker.put("inputs/iris/x.json", infer_request(ROWS))
    assert worker.deliver(old) == []  # the object's ETag no longer matches: its own event follows
    assert keys(worker.s3) == ["inputs/iris/x.json"]
    assert worker.deliver(new) == []
    assert {o["name"]: o for o in worker.read("outputs/iris/x.json.json")["outputs"]}["label"]["data"] == [
        0,
        2,
    ]


def test_a_deleted_input_is_skipped(worker):
    message = worker.put("inputs/iris/x.json", infer_request())
    worker.s3.delete_object(Bucket=DATA, Key="inputs/iris/x.json")
    assert worker.deliver(message) == []
    assert keys(worker.s3) == []


def test_a_fixed_input_replaces_its_error_and_a_broken_one_its_output(worker):
    assert worker.deliver(worker.put("inputs/iris/x.json", b"{broken")) == []
    assert keys(worker.s3) == ["errors/iris/x.json.json", "inputs/iris/x.json"]
    assert worker.deliver(worker.put("inputs/iris/x.json", infer_request())) == []
    assert keys(worker.s3) == ["inputs/iris/x.json", "outputs/iris/x.json.json"]
    assert worker.deliver(worker.put("inputs/iris/x.json", b"{broken again")) == []
    assert keys(worker.s3) == ["errors/iris/x.json.json", "inputs/iris/x.json"]


# ---------------------------------------------------------------- buckets


def test_inputs_in_the_model_bucket_work_and_leave_models_alone(worker):
    before = keys(worker.s3, BUCKET)
    assert worker.deliver(worker.put("inputs/iris/x.json", infer_request(), bucket=BUCKET)) == []
    assert keys(worker.s3, BUCKET) == sorted([*before, "inputs/iris/x.json", "outputs/iris/x.json.json"])
    assert_one_result_per_input(worker.s3, BUCKET, extra_prefixes=("models/",))


def test_results_can_go_to_a_separate_data_bucket(s3, make_worker):
    s3.create_bucket(Bucket="test-results")
    worker = make_worker(**{DATA_BUCKET_ENV: "test-results"})
    assert worker.deliver(worker.put("inputs/iris/x.json", infer_request())) == []
    assert keys(s3, "test-results") == ["outputs/iris/x.json.json"]
    assert keys(s3) == ["inputs/iris/x.json"]


# ---------------------------------------------------------------- the GPU tier


@pytest.fixture
def gpu(make_worker, iris_package, tmp_path, monkeypatch):
    """The worker with iris on the GPU tier: SageMaker (a loopback double) in front of the GPU
    server's real host, loaded from the package as a SageMaker model directory, hosted as the
    inference component ``iris-ic`` (the deployed shape)."""
    container = start_container(iris_package.artifact.parent, tmp_path / "container-cache")
    double = SageMakerDouble({"iris-gpu": container}, components={"iris-ic": "iris-gpu"})
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", double.url)
    worker = make_worker(**{GPU_ENDPOINTS_ENV: "iris=iris-gpu/iris-ic", ROW_BATCH_SIZE_ENV: "2"})
    yield worker, double
    double.stop()
    container.close()


def test_a_gpu_tier_model_is_served_through_its_sagemaker_endpoint(gpu):
    worker, double = gpu
    assert worker.deliver(worker.put("inputs/iris/x.jsonl", jsonl(ROWS * 2 + ROWS[:1]))) == []
    labels = {o["name"]: o for o in worker.read("outputs/iris/x.jsonl.json")["outputs"]}["label"]
    assert labels["data"] == [0, 2, 0, 2, 0]
    assert [(call["endpoint"], call["component"]) for call in double.calls] == [("iris-gpu", "iris-ic")] * 3
    registry = worker.module.pipeline.registry
    assert registry.loaded(registry.resolve("iris")) is None  # never loaded into the worker
    assert_one_result_per_input(worker.s3)


def test_a_gpu_endpoint_that_is_down_is_retried_and_one_that_refuses_is_an_error(gpu):
    worker, double = gpu
    message = worker.put("inputs/iris/x.json", infer_request())
    double.fail_with = service_error(503, "ServiceUnavailable")
    assert worker.deliver(message) == [0]
    assert keys(worker.s3) == ["inputs/iris/x.json"]
    double.fail_with = model_error(400, "the GPU server does not like this input")
    assert worker.deliver(message) == []
    assert "does not like" in worker.read("errors/iris/x.json.json")["error"]
    assert_one_result_per_input(worker.s3)


# ---------------------------------------------------------------- hostile answers from the GPU tier

NESTED = "[" * 100_000 + "]" * 100_000
MODEL_ERROR_HEADERS = {"x-amzn-ErrorType": "ModelError", "Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (NESTED, "[[["),
        ("x" * 5_000_000, "xxx"),
        ('{"error": {"nested": [1, 2]}}', '{"error": {"nested": [1, 2]}}'),
        ('{"error": 1e400}', '{"error": 1e400}'),
        ('{"error": "bad \\ud800 input\\u0000"}', "bad \\ud800 input"),
    ],
    ids=["nested", "huge", "error-not-text", "error-1e400", "surrogate"],
)
def test_a_hostile_error_body_from_the_gpu_server_still_leaves_an_error_document(gpu, body, fragment):
    worker, double = gpu
    double.fail_with = container_error(400, body)
    assert worker.deliver(worker.put("inputs/iris/x.json", infer_request())) == []
    document = worker.read("errors/iris/x.json.json")
    assert document["status"] == 400 and fragment in document["error"]
    assert len(document["error"]) <= 500
    assert_one_result_per_input(worker.s3)


@pytest.mark.parametrize(
    ("status", "raw", "fragment"),
    [
        (424, NESTED.encode(), "cannot be read"),
        (424, b"\xff\xfe\x00 not UTF-8", "cannot be read"),
        (424, b"[1, 2]", "cannot be read"),
        (424, b'{"OriginalStatusCode": 1e400, "OriginalMessage": "x"}', "cannot be read"),
        (424, b'{"OriginalStatusCode": "four hundred", "OriginalMessage": "x"}', "cannot be read"),
        (500, b"<html>" + b"x" * 1_000_000 + b"</html>", "unavailable"),
    ],
    ids=["nested", "not-utf8", "array", "status-1e400", "status-text", "huge-html-500"],
)
def test_a_sagemaker_answer_that_cannot_be_read_is_a_typed_transient_fault(gpu, status, raw, fragment):
    """No error escapes the mapping: the record is retried (as any upstream fault), nothing is
    written, and the error is the typed one the worker logs."""
    from tierserve.s3_pipeline import S3Object

    worker, double = gpu
    double.reply_with = (status, MODEL_ERROR_HEADERS, raw)
    message = worker.put("inputs/iris/x.json", infer_request())
    etag = worker.s3.head_object(Bucket=DATA, Key="inputs/iris/x.json")["ETag"].strip('"')
    with pytest.raises(UpstreamUnavailable, match=fragment):
        worker.module.pipeline.handle(S3Object(DATA, "inputs/iris/x.json", etag=etag))
    assert worker.deliver(message) == [0]
    assert keys(worker.s3) == ["inputs/iris/x.json"]


# ---------------------------------------------------------------- the invocation's deadline


def short_invocation(timeout_ms: int = 4_000) -> LocalLambdaContext:
    return LocalLambdaContext(function_name="tierserve-worker", timeout_ms=timeout_ms)


def test_a_stalled_gpu_endpoint_is_reported_failed_before_the_invocation_ends(gpu):
    """botocore alone would wait 3 x 65 s on a hung endpoint; the invocation has 4 s."""
    worker, double = gpu
    message = worker.put("inputs/iris/x.json", infer_request())
    double.delay_s = 120
    context = short_invocation()
    assert worker.deliver(message, context=context) == [0]
    assert context.get_remaining_time_in_millis() > 0  # answered before Lambda's timeout
    assert keys(worker.s3) == ["inputs/iris/x.json"]  # nothing written
    assert double.calls  # it did try


def test_records_still_waiting_for_a_thread_at_the_deadline_are_failed_too(gpu, make_worker):
    _, double = gpu
    worker = make_worker(**{GPU_ENDPOINTS_ENV: "iris=iris-gpu/iris-ic", WORKER_CONCURRENCY_ENV: "1"})
    messages = [worker.put(f"inputs/iris/{n}.json", infer_request()) for n in range(3)]
    double.delay_s = 120
    context = short_invocation()
    assert worker.deliver(*messages, context=context) == [0, 1, 2]
    assert context.get_remaining_time_in_millis() > 0
    assert not [k for k in keys(worker.s3) if not k.startswith("inputs/")]


def test_a_stalled_s3_is_reported_failed_before_the_invocation_ends(flaky, worker):
    message = worker.put("inputs/iris/x.json", infer_request())
    flaky.stalled = True
    context = short_invocation()
    assert worker.deliver(message, context=context) == [0]
    assert context.get_remaining_time_in_millis() > 0
    assert flaky.requests >= 1
    flaky.stalled = False
    assert keys(worker.s3) == ["inputs/iris/x.json"]
    assert worker.deliver(message) == []  # S3 is back: served on redelivery
    assert_one_result_per_input(worker.s3)


def test_a_record_still_running_at_the_deadline_is_reported_not_killed(worker, monkeypatch):
    """Work that never consults the deadline (a model run that takes too long): the handler
    still answers in time, and the record is a batch item failure."""
    release = threading.Event()
    monkeypatch.setattr(worker.module.pipeline, "handle_message", lambda body, deadline: release.wait(30))
    context = short_invocation()
    try:
        assert worker.deliver(worker.put("inputs/iris/x.json", infer_request()), context=context) == [0]
        assert context.get_remaining_time_in_millis() > 0
    finally:
        release.set()
    assert keys(worker.s3) == ["inputs/iris/x.json"]


def test_results_for_a_data_bucket_that_does_not_exist_name_its_setting(make_worker):
    from tierserve.s3_pipeline import S3Object

    worker = make_worker(**{DATA_BUCKET_ENV: "no-such-results"})
    put = worker.s3.put_object(Bucket=DATA, Key="inputs/iris/x.json", Body=infer_request())
    with pytest.raises(ModelUnavailable) as raised:
        worker.module.pipeline.handle(S3Object(DATA, "inputs/iris/x.json", etag=put["ETag"].strip('"')))
    assert "s3://no-such-results/outputs/iris/x.json.json does not exist: check TIERSERVE_DATA_BUCKET" in (
        raised.value.message
    )
    assert "MODEL_BUCKET" not in raised.value.message


# ---------------------------------------------------------------- S3 -> SQS -> worker, for real


@pytest.fixture
def notified(s3, embedded_s3, data_bucket, worker):
    """moto's S3 notifies its SQS (redrive: 2 receives, then the DLQ); a poller plays Lambda."""
    sqs = embedded_s3.client("sqs")
    queues = create_resources(s3, sqs, bucket=DATA, max_receive_count=2, visibility_timeout_s=1)
    attempts: list[str] = []

    def handler(event, context):
        attempts.extend(record["body"] for record in event["Records"])
        return worker.handler(event, context)

    return QueuePoller(sqs, queues, handler, wait_s=0), sqs, queues, attempts


def poll_until(poller: QueuePoller, done: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if poller.poll_once().received == 0:
            if done():
                return
            time.sleep(0.1)
    raise AssertionError("the pipeline did not settle in time")


def queue_depth(sqs, url: str) -> int:
    attributes = sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return sum(int(v) for v in attributes.values())


def test_files_put_into_s3_are_served_through_real_notifications(s3, notified):
    poller, sqs, queues, attempts = notified
    files = {
        "inputs/iris/req.json": infer_request(),
        "inputs/iris/t.npy": npy(np.asarray(ROWS, np.float32)),
        "inputs/iris/batch 1.jsonl": jsonl(ROWS * 40),
        "inputs/iris/broken.json": b"{",
    }
    for key, body in files.items():
        s3.put_object(Bucket=DATA, Key=key, Body=body)
    poll_until(poller, lambda: queue_depth(sqs, queues.url) == 0)
    assert any('"s3:TestEvent"' in body for body in attempts)  # S3 says hello first
    assert queue_depth(sqs, queues.dlq_url) == 0
    assert worker_outputs(s3) == ["batch 1.jsonl", "req.json", "t.npy"]
    assert keys(s3) == sorted(
        [*files, *[f"outputs/iris/{n}.json" for n in worker_outputs(s3)], "errors/iris/broken.json.json"]
    )
    assert_one_result_per_input(s3)


def worker_outputs(s3) -> list[str]:
    return sorted(
        k.removeprefix("outputs/iris/").removesuffix(".json") for k in keys(s3) if k.startswith("outputs/")
    )


def test_transient_failures_end_in_the_dlq_only_after_max_receive_count(s3, notified, flaky):
    poller, sqs, queues, attempts = notified
    poll_until(poller, lambda: queue_depth(sqs, queues.url) == 0)  # the test event
    attempts.clear()
    flaky.down = True
    s3.put_object(Bucket=DATA, Key="inputs/iris/x.json", Body=infer_request())
    poll_until(
        poller, lambda: queue_depth(sqs, queues.dlq_url) == 1 and queue_depth(sqs, queues.url) == 0, 60
    )
    assert len(attempts) == 2  # received and failed maxReceiveCount times, then dead-lettered
    [dead] = sqs.receive_message(QueueUrl=queues.dlq_url)["Messages"]
    assert unquote_plus(json.loads(dead["Body"])["Records"][0]["s3"]["object"]["key"]) == "inputs/iris/x.json"
    assert keys(s3) == ["inputs/iris/x.json"]  # nothing written, nothing lost: the DLQ holds it
    assert_one_result_per_input(s3, dead_lettered={"inputs/iris/x.json"})
    # redriven once S3 is back, it is served
    flaky.down = False
    sqs.send_message(QueueUrl=queues.url, MessageBody=dead["Body"])
    sqs.delete_message(QueueUrl=queues.dlq_url, ReceiptHandle=dead["ReceiptHandle"])
    poll_until(poller, lambda: queue_depth(sqs, queues.url) == 0)
    assert_one_result_per_input(s3)


JOB = f"jobs/iris/{'c' * 32}/{'a' * 32}/1"


@pytest.mark.parametrize(
    ("key", "error", "output"),
    [
        ("inputs/iris/x.json", "errors/iris/x.json.json", "outputs/iris/x.json.json"),
        (f"{JOB}/input.json", f"{JOB}/error.json", f"{JOB}/output.json"),  # a job then reads failed
    ],
    ids=["file", "job"],
)
def test_a_fault_that_outlasts_the_receive_limit_leaves_an_error_that_a_redrive_replaces(
    s3, notified, flaky, key, error, output
):
    """The model's bucket down past maxReceiveCount (the data bucket up): the last delivery
    writes the input's error document, marked as given up, saying why and what to do (a job
    reads failed, not pending for days), and the message still goes to the DLQ; redriven
    once the bucket is back, the input is served and its output replaces that error."""
    poller, sqs, queues, attempts = notified
    poll_until(poller, lambda: queue_depth(sqs, queues.url) == 0)  # the test event
    attempts.clear()
    flaky.down, flaky.down_paths = True, f"/{BUCKET}/"
    s3.put_object(Bucket=DATA, Key=key, Body=infer_request())
    poll_until(
        poller, lambda: queue_depth(sqs, queues.dlq_url) == 1 and queue_depth(sqs, queues.url) == 0, 60
    )
    assert len(attempts) == 2
    assert keys(s3) == sorted([error, key])
    document = json.loads(s3.get_object(Bucket=DATA, Key=error)["Body"].read())
    assert document["status"] == 503
    assert "gave up after 2 deliveries" in document["error"] and "redrive it" in document["error"]
    assert s3.head_object(Bucket=DATA, Key=error)["Metadata"]["tierserve-gave-up"] == "true"
    flaky.down = False
    [dead] = sqs.receive_message(QueueUrl=queues.dlq_url)["Messages"]
    sqs.send_message(QueueUrl=queues.url, MessageBody=dead["Body"])
    sqs.delete_message(QueueUrl=queues.dlq_url, ReceiptHandle=dead["ReceiptHandle"])
    poll_until(poller, lambda: queue_depth(sqs, queues.url) == 0)
    assert keys(s3) == sorted([key, output])  # the error replaced


def test_giving_up_never_displaces_a_result_that_answers_the_input(worker):
    """A delivery that gave up while another served the same version (a duplicate delivery):
    the output stays, and no error joins it."""
    message = worker.put("inputs/iris/x.json", infer_request())
    assert worker.deliver(message) == []
    pipeline = worker.module.pipeline
    assert pipeline.give_up(message, UpstreamUnavailable("S3 is unavailable"), deliveries=2) == []
    assert keys(worker.s3) == ["inputs/iris/x.json", "outputs/iris/x.json.json"]
    # Raced: the output came after giving up looked, before its error was written.
    [item] = parse_message(message)
    written = pipeline.results.write(
        DATA, item, parse_input_key(item.key), "errors", b"{}", Known(), "iris@1", gave_up=True
    )
    assert written.status == "skipped" and "already answers this version" in written.reason
    assert keys(worker.s3) == ["inputs/iris/x.json", "outputs/iris/x.json.json"]


def test_a_fault_that_passes_before_max_receive_count_is_served_without_the_dlq(s3, notified, flaky):
    poller, sqs, queues, attempts = notified
    poll_until(poller, lambda: queue_depth(sqs, queues.url) == 0)
    attempts.clear()
    s3.put_object(Bucket=DATA, Key="inputs/iris/x.jsonl", Body=jsonl(ROWS))
    flaky.fail_next = 4
    poll_until(poller, lambda: queue_depth(sqs, queues.url) == 0)
    assert len(attempts) == 2  # failed once, served on redelivery
    assert queue_depth(sqs, queues.dlq_url) == 0
    assert_one_result_per_input(s3)


# ---------------------------------------------------------------- a cold GPU model, through SQS


@pytest.fixture
def cold_gpu(s3, embedded_s3, data_bucket, make_worker, iris_package, tmp_path, monkeypatch):
    """iris on the GPU tier, its inference component with no copy running (the double's
    ``cold``), behind moto's S3 -> SQS notifications (redrive: 2 receives, then the DLQ; a
    visibility timeout of 1 s) and a poller playing Lambda. Returns a function that starts it
    with a given ``TIERSERVE_COLD_RETRY_S``."""
    container = start_container(iris_package.artifact.parent, tmp_path / "container-cache")
    double = SageMakerDouble({"iris-gpu": container}, components={"iris-ic": "iris-gpu"})
    double.cold.add("iris-ic")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", double.url)
    sqs = embedded_s3.client("sqs")
    queues = create_resources(s3, sqs, bucket=DATA, max_receive_count=2, visibility_timeout_s=1)
    deliveries: list[dict] = []

    def start(cold_retry_s: str) -> tuple[QueuePoller, Worker]:
        worker = make_worker(**{GPU_ENDPOINTS_ENV: "iris=iris-gpu/iris-ic", COLD_RETRY_S_ENV: cold_retry_s})

        def handler(event, context):
            deliveries.extend(event["Records"])
            return worker.handler(event, context)

        poller = QueuePoller(sqs, queues, handler, wait_s=0)
        poll_until(poller, lambda: queue_depth(sqs, queues.url) == 0)  # S3's test event
        deliveries.clear()
        return poller, worker

    yield start, double, sqs, queues, deliveries
    double.stop()
    container.close()


def test_an_input_for_a_cold_model_waits_past_max_receive_count_and_is_served_once_warm(s3, cold_gpu):
    start, double, sqs, queues, deliveries = cold_gpu
    poller, worker = start("0")  # no wait between tries: the test sees many deliveries
    s3.put_object(Bucket=DATA, Key="inputs/iris/x.json", Body=infer_request())
    # Three times maxReceiveCount deliveries, every one refused for no capacity...
    end = time.monotonic() + 60  # a bound for a hang: with no wait, each poll delivers it again
    while len(deliveries) < 6 and queue_depth(sqs, queues.dlq_url) == 0 and time.monotonic() < end:
        poller.poll_once()
    assert {call["component"] for call in double.calls} == {"iris-ic"}
    # ...and none of them dead-lettered it, or wrote a result for it.
    assert queue_depth(sqs, queues.dlq_url) == 0
    assert keys(s3) == ["inputs/iris/x.json"]
    # The original was received up to the limit, then waited on as a copy that starts again.
    counts = [int(d["attributes"]["ApproximateReceiveCount"]) for d in deliveries]
    assert max(counts) == 2 and counts[:3] == [1, 2, 1]
    assert len({d["messageId"] for d in deliveries}) >= 3
    # A copy of the model starts: the next delivery is served.
    double.cold.clear()
    poll_until(poller, lambda: queue_depth(sqs, queues.url) == 0)
    labels = {o["name"]: o for o in worker.read("outputs/iris/x.json.json")["outputs"]}["label"]
    assert labels["data"] == [0, 2]
    assert queue_depth(sqs, queues.dlq_url) == 0
    assert_one_result_per_input(s3)


def test_a_cold_delivery_stays_hidden_for_its_wait_not_the_queues_visibility_timeout(s3, cold_gpu):
    start, _double, sqs, queues, deliveries = cold_gpu
    poller, _ = start("30")
    s3.put_object(Bucket=DATA, Key="inputs/iris/x.json", Body=infer_request())
    for _ in range(200):  # a bound for a hang
        if deliveries:
            break
        poller.poll_once()
    time.sleep(1.5)  # past the queue's visibility timeout (1 s): an ordinary failure is back
    assert poller.poll_once().received == 0  # this one waits its 30 s
    attributes = sqs.get_queue_attributes(
        QueueUrl=queues.url, AttributeNames=["ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    assert attributes["ApproximateNumberOfMessagesNotVisible"] == "1"
    assert queue_depth(sqs, queues.dlq_url) == 0 and keys(s3) == ["inputs/iris/x.json"]


def test_a_cold_model_in_a_direct_delivery_is_a_batch_item_failure(gpu, capsys, monkeypatch):
    """Without SQS to talk to (the event's queue is not there), a cold model's message is
    reported failed like any transient fault, and nothing is written; the wait is counted."""
    worker, double = gpu
    double.cold.add("iris-ic")
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")  # read when the handler flushes
    capsys.readouterr()
    assert worker.deliver(worker.put("inputs/iris/x.json", infer_request())) == [0]
    emf = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"_aws"')]
    # (values recorded by earlier tests while metrics were disabled may be flushed with it)
    assert any("PipelineColdWaits" in document for document in emf), emf
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "true")
    assert keys(worker.s3) == ["inputs/iris/x.json"]
    double.cold.clear()
    assert worker.deliver(worker.put("inputs/iris/x.json", infer_request())) == []
    assert_one_result_per_input(worker.s3)


# ---------------------------------------------------------------- tierserve local put


def test_tierserve_local_put_prints_the_output_or_the_error(embedded_s3, worker, tmp_path, capsys):
    from tierserve.tools import cli
    from tierserve.tools.local.s3_queue import start_local_pipeline

    local = start_local_pipeline(embedded_s3, worker.handler, state_dir=tmp_path)
    try:
        rows = tmp_path / "rows.jsonl"
        rows.write_bytes(jsonl(ROWS))
        put = ["local", "put", str(rows), "--model", "iris", "--work-dir", str(tmp_path), "--timeout", "30"]
        assert cli.main(put) == 0
        document = printed_document(capsys.readouterr().out)
        assert {o["name"]: o for o in document["outputs"]}["label"]["data"] == [0, 2]
        assert document["parameters"]["input_key"] == "inputs/iris/rows.jsonl"
        broken = tmp_path / "broken.json"
        broken.write_bytes(b"{")
        assert cli.main([*put[:2], str(broken), *put[3:], "--path", "2026/broken.json"]) == 1
        assert (
            printed_document(capsys.readouterr().out)["parameters"]["input_key"]
            == "inputs/iris/2026/broken.json"
        )
    finally:
        local.stop()
    assert_one_result_per_input(worker.s3, "tierserve-data")


def test_tierserve_local_put_without_a_running_stack_says_so(tmp_path, capsys):
    from tierserve.tools import cli

    (tmp_path / "x.json").write_bytes(infer_request())
    assert (
        cli.main(["local", "put", str(tmp_path / "x.json"), "--model", "iris", "--work-dir", str(tmp_path)])
        == 1
    )
    assert "start `tierserve local` first" in capsys.readouterr().err
