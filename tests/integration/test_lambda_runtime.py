"""The handlers as Lambda runs them: the Lambda Runtime Interface Emulator (the binary in
``sam local invoke``'s container) drives ``awslambdaric`` over the Runtime API on the host,
with the shared events/ files and the model in the embedded S3. What the in-process tests
cannot see: the image's handler strings resolve, init and invocations go through the real
runtime client, the responses survive its JSON marshalling, and the environment stays warm
across invocations."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from urllib.parse import quote_plus

import numpy as np
import onnxruntime as ort
import pytest

from support.common import BUCKET, EVENTS_DIR, load_event, printed_document
from tierserve.protocol import decode_infer_response
from tierserve.settings import CACHE_DIR_ENV, DATA_BUCKET_ENV, MODEL_BUCKET_ENV, MODELS_ENV
from tierserve.tools import cli
from tierserve.tools.local import samples
from tierserve.tools.local import stack as local_stack
from tierserve.tools.local.apigw import proxy_response_body, proxy_response_headers
from tierserve.tools.local.emulator import FUNCTIONS_PATH, FunctionError, LambdaEmulator

ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)  # the events' rows
DATA = "test-data"


def image_handler() -> str:
    """The handler string the Lambda image starts (its Dockerfile's CMD)."""
    command = next(
        line for line in (FUNCTIONS_PATH / "Dockerfile").read_text().splitlines() if line.startswith("CMD")
    )
    return json.loads(command.removeprefix("CMD").strip())[0]


@pytest.fixture
def start_function(embedded_s3, uploaded_iris, tmp_path):
    emulators: list[LambdaEmulator] = []

    def start(handler: str, **environ: str) -> LambdaEmulator:
        env = {
            **embedded_s3.env,
            MODEL_BUCKET_ENV: BUCKET,
            MODELS_ENV: "iris@1",
            CACHE_DIR_ENV: str(tmp_path / "cache"),
            "POWERTOOLS_LOG_LEVEL": "INFO",
            **environ,
        }
        emulator = LambdaEmulator.start(handler, env, log_path=tmp_path / f"{handler}.log")
        emulators.append(emulator)
        return emulator

    yield start
    for emulator in emulators:
        emulator.stop()


def source_probabilities(iris_onnx: Path) -> np.ndarray:
    session = ort.InferenceSession(str(iris_onnx), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"input": ROWS})[0]


def test_the_api_image_handler_serves_the_shared_events_and_stays_warm(start_function, iris_onnx):
    function = start_function(image_handler())
    expected = source_probabilities(iris_onnx)

    answer = function.invoke(load_event("infer-json"))
    assert answer["statusCode"] == 200, answer
    document = json.loads(proxy_response_body(answer))
    assert document["id"] == "req-1" and [o["name"] for o in document["outputs"]] == ["probabilities"]
    np.testing.assert_allclose(np.reshape(document["outputs"][0]["data"], (2, 3)), expected, rtol=1e-6)

    answer = function.invoke(load_event("infer-binary"))
    assert answer["statusCode"] == 200 and answer["isBase64Encoded"] is True, answer
    outputs = decode_infer_response(proxy_response_body(answer), proxy_response_headers(answer))
    np.testing.assert_allclose(outputs["probabilities"], expected, rtol=1e-6)

    for event, status, fragment in [
        ("bad-shape", 400, "has shape [2, 3] but the model expects [-1, 4]"),
        ("bad-unknown-model", 404, "model 'resnet' is not served here"),
        ("bad-json", 400, "not valid JSON"),
    ]:
        answer = function.invoke(load_event(event))
        assert answer["statusCode"] == status, (event, answer)
        assert fragment in json.loads(proxy_response_body(answer))["error"], (event, answer)

    log = function.log_path.read_text()
    loads = [json.loads(line) for line in log.splitlines() if '"message":"model loaded"' in line]
    assert len(loads) == 1, log  # one load in this environment: every later invocation was warm
    assert loads[0]["function_request_id"] and loads[0]["model"] == "iris@1"
    assert "Traceback" not in log


def test_the_worker_handler_turns_the_shared_sqs_event_into_an_output(start_function, s3, iris_onnx):
    s3.create_bucket(Bucket=DATA)
    key = "inputs/iris/2026/my sample.json"
    request = {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": ROWS.tolist()}]}
    put = s3.put_object(Bucket=DATA, Key=key, Body=json.dumps(request).encode())
    event = load_event("sqs-s3-put")
    body = json.loads(event["Records"][0]["body"])
    record = body["Records"][0]["s3"]
    record["bucket"] = {"name": DATA, "arn": f"arn:aws:s3:::{DATA}"}
    record["object"].update(key=quote_plus(key), eTag=put["ETag"].strip('"'), size=len(json.dumps(request)))
    event["Records"][0]["body"] = json.dumps(body)
    function = start_function("worker.handler", **{DATA_BUCKET_ENV: DATA})

    assert function.invoke(event) == {"batchItemFailures": []}
    assert function.invoke(load_event("sqs-s3-test-event")) == {"batchItemFailures": []}
    with pytest.raises(FunctionError, match="the function raised UnexpectedBatchTypeError") as raised:
        function.invoke(load_event("infer-json"))  # an API Gateway event is no SQS batch
    assert raised.value.payload["stackTrace"]

    document = json.loads(
        s3.get_object(Bucket=DATA, Key="outputs/iris/2026/my sample.json.json")["Body"].read()
    )
    outputs = {o["name"]: o for o in document["outputs"]}
    np.testing.assert_allclose(
        np.reshape(outputs["probabilities"]["data"], (2, 3)), source_probabilities(iris_onnx), rtol=1e-6
    )
    listing = s3.list_objects_v2(Bucket=DATA)["Contents"]
    assert sorted(item["Key"] for item in listing) == [key, "outputs/iris/2026/my sample.json.json"]


def test_the_batch_handler_serves_the_shared_map_batch_and_names_its_errors_for_the_state_machine(
    start_function, s3
):
    s3.create_bucket(Bucket=DATA)
    event = load_event("sfn-batch")
    event["BatchInput"]["bucket"] = DATA
    request = {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": ROWS.tolist()}]}
    put = s3.put_object(Bucket=DATA, Key="inputs/iris/2026/a.json", Body=json.dumps(request).encode())
    event["Items"][0]["Etag"] = put["ETag"]  # the second item was never put: skipped
    function = start_function("batch.handler", **{DATA_BUCKET_ENV: DATA})

    assert function.invoke(event) == {"items": 2, "outputs": 1, "errors": 0, "skipped": 1}
    assert (
        s3.head_object(Bucket=DATA, Key="outputs/iris/2026/a.json.json")["ContentType"] == "application/json"
    )
    # Step Functions' Retry and the map run read the error by the errorType the runtime reports.
    event["Items"].append({"Key": "inputs/mlp/2026/x.json"})
    with pytest.raises(FunctionError) as raised:
        function.invoke(event)
    assert raised.value.payload["errorType"] == "PoisonItems"
    assert "inputs/mlp/2026/x.json is not under inputs/iris/" in raised.value.payload["errorMessage"]


def test_the_stream_handler_serves_the_shared_kinesis_event_to_the_results_stream(
    start_function, s3, embedded_s3
):
    kinesis = embedded_s3.client("kinesis")
    kinesis.create_stream(StreamName="test-results", ShardCount=1)
    function = start_function("stream.handler", TIERSERVE_OUTPUT_STREAM="test-results")
    assert function.invoke(load_event("kinesis-records")) == {"batchItemFailures": []}
    (shard,) = kinesis.list_shards(StreamName="test-results")["Shards"]
    iterator = kinesis.get_shard_iterator(
        StreamName="test-results", ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    results = [json.loads(r["Data"]) for r in kinesis.get_records(ShardIterator=iterator)["Records"]]
    assert [r["parameters"]["partition_key"] for r in results] == ["sensor-7", "sensor-7"]
    assert results[1]["id"] == "req-2"


def test_tierserve_local_invoke_runs_an_event_against_the_running_local_stack(
    tmp_path, capsys, restore_environ
):
    stack = local_stack.start(
        tmp_path,
        port=0,
        chosen=(local_stack.Sample("invoked", "1", partial(samples.mlp, features=4, hidden=8)),),
    )
    try:
        event = tmp_path / "metadata.json"
        event.write_text(json.dumps(load_event("metadata")).replace("iris", "invoked"))
        assert cli.main(["local", "invoke", str(event), "--work-dir", str(tmp_path)]) == 0
        answer = printed_document(capsys.readouterr().out)
        assert answer["statusCode"] == 200
        assert json.loads(answer["body"])["inputs"] == [
            {"name": "input", "datatype": "FP32", "shape": [-1, 4]}
        ]

        assert (
            cli.main(["local", "invoke", str(EVENTS_DIR / "infer-json.json"), "--work-dir", str(tmp_path)])
            == 0
        )
        answer = printed_document(capsys.readouterr().out)
        assert answer["statusCode"] == 404 and "models served: invoked@1" in answer["body"]

        broken = tmp_path / "broken-batch.json"
        broken.write_text(json.dumps({"Records": [{"eventSource": "aws:sqs"}]}))  # no body, no id
        assert (
            cli.main(
                ["local", "invoke", str(broken), "--handler", "worker.handler", "--work-dir", str(tmp_path)]
            )
            == 1
        )
        printed = capsys.readouterr()
        assert "the function raised" in printed.err and "errorType" in printed_document(printed.out)
    finally:
        stack.stop()


def test_tierserve_local_invoke_names_what_is_missing(tmp_path, capsys):
    assert cli.main(["local", "invoke", str(tmp_path / "none.json"), "--work-dir", str(tmp_path)]) == 2
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "event.json").write_text("{")
    assert cli.main(["local", "invoke", str(tmp_path / "event.json"), "--work-dir", str(tmp_path)]) == 2
    assert "is not JSON" in capsys.readouterr().err
    (tmp_path / "event.json").write_text(json.dumps(load_event("sqs-s3-put")))
    assert cli.main(["local", "invoke", str(tmp_path / "event.json"), "--work-dir", str(tmp_path)]) == 2
    assert "is not what api.handler takes: an API Gateway proxy event" in capsys.readouterr().err
    (tmp_path / "event.json").write_text(json.dumps(load_event("metadata")))
    assert cli.main(["local", "invoke", str(tmp_path / "event.json"), "--work-dir", str(tmp_path)]) == 1
    assert "start `tierserve local` first" in capsys.readouterr().err


def test_an_emulator_that_is_gone_is_a_clear_error_not_a_traceback(start_function):
    function = start_function(image_handler())
    function.process.kill()
    function.process.wait()
    with pytest.raises(RuntimeError, match=r"the function gave no answer .*; see .*api\.handler\.log"):
        function.invoke(load_event("metadata"))


@pytest.mark.parametrize(
    ("handler", "event"), [("api.handler", "health-live"), ("worker.handler", "sqs-s3-test-event")]
)
def test_a_bad_variable_at_init_is_one_clear_line_in_the_log(start_function, handler, event):
    function = start_function(handler, TIERSERVE_THREADS="x")
    with pytest.raises(RuntimeError, match="the function failed"):
        function.invoke(load_event(event))
    log = function.log_path.read_text()
    ours = {line for line in log.splitlines() if "(rapid)" not in line and not line.startswith("START ")}
    assert ours == {
        "tierserve: TIERSERVE_THREADS='x' is not a whole number; set it to 1 to 256, or unset it for "
        "one per 1,769 MB of memory (Lambda) or one per CPU (GPU server)"
    }, log
    assert "Traceback" not in log and "Runtime exited with error: exit status 1" in log


def test_the_jobs_handler_answers_the_shared_job_events_under_the_runtime(start_function, s3):
    """``jobs.handler`` as the image runs it: the runtime interface's JSON, the job's URL behind
    the stage, the upload URL on this S3, the job's record in the data bucket."""
    s3.create_bucket(Bucket=DATA)
    function = start_function("jobs.handler", **{DATA_BUCKET_ENV: DATA})
    created = function.invoke(load_event("job-create"))
    assert created["statusCode"] == 202, created
    job = json.loads(created["body"])
    assert job["result"].startswith(
        "https://abc123defg.execute-api.us-east-1.amazonaws.com/prod/v2/models/iris/jobs/"
    )
    assert job["upload"]["url"].startswith(s3.meta.endpoint_url)
    (record,) = [item["Key"] for item in s3.list_objects_v2(Bucket=DATA, Prefix="jobs/")["Contents"]]
    assert record.endswith(f"/{job['id']}/job.json")
    missing = function.invoke(load_event("job-status"))
    assert missing["statusCode"] == 404 and "for this caller" in json.loads(missing["body"])["error"]
