"""Every metric tierserve emits carries the model it is about, as EMF dimensions read from the
real handlers' output: each line declares ``[service]`` and ``[service, model, version]``, so
the service-wide and the per-model figures come from one value; a model nobody serves never
becomes a dimension."""

from __future__ import annotations

import json

import pytest

from support.common import load_event, make_invoke
from support.gpu import InProcessServer, request
from support.operations import dimension_sets, emf, emf_lines, lines_with, metric_names  # noqa: F401
from tierserve import aws, telemetry
from tierserve.settings import CACHE_DIR_ENV, MODEL_BUCKET_ENV, MODELS_ENV, PRELOAD_ENV
from tierserve.tools.local.apigw import LocalLambdaContext
from tierserve.tools.local.kinesis_stream import create_streams
from tierserve.tools.local.stack import load_handler

pytestmark = pytest.mark.usefixtures("emf")

MODEL_SETS = [["service"], ["service", "model", "version"]]
MODEL_METRICS = {
    "InferenceRequests",
    "InferenceLatencyMs",
    "InferenceMs",
    "ModelCacheMiss",
    "ModelFetchMs",
    "ModelDecompressMs",
    "ModelSessionMs",
}


def values(line: dict, metric: str) -> list[float]:
    value = line[metric]
    return value if isinstance(value, list) else [value]


def assert_about(line: dict, model: str, version: str) -> None:
    assert dimension_sets(line) == MODEL_SETS
    assert (line["service"], line["model"], line["version"]) == ("tierserve", model, version)


def test_the_api_handler_emits_its_model_on_every_metric(s3, uploaded_iris, cache_dir, monkeypatch, capsys):
    invoke = make_invoke(monkeypatch, cache_dir)
    capsys.readouterr()
    assert invoke(load_event("infer-json"))[0] == 200
    lines = emf_lines(capsys.readouterr().out)
    [cold] = lines_with(lines, "ColdStart")
    assert dimension_sets(cold) == [["function_name", "service"], ["service", "model", "version"]]
    assert (cold["function_name"], cold["model"], cold["version"]) == ("tierserve-local", "iris", "1")
    [model_line] = [line for line in lines if "ColdStart" not in metric_names(line)]
    assert_about(model_line, "iris", "1")
    assert metric_names(model_line) >= MODEL_METRICS

    assert invoke(load_event("bad-shape"))[0] == 400  # a second invocation: warm, and refused
    [line] = emf_lines(capsys.readouterr().out)
    assert_about(line, "iris", "1")
    assert {"InferenceRequests", "InferenceClientErrors", "InferenceLatencyMs"} <= metric_names(line)
    assert "ColdStart" not in metric_names(line)


def test_a_model_nobody_serves_counts_in_the_service_set_alone(
    s3, uploaded_iris, cache_dir, monkeypatch, capsys
):
    invoke = make_invoke(monkeypatch, cache_dir)
    assert invoke(load_event("bad-unknown-model"))[0] == 404
    lines = [line for line in emf_lines(capsys.readouterr().out) if "ColdStart" not in metric_names(line)]
    [line] = lines
    assert dimension_sets(line) == [["service"]]
    assert {"InferenceRequests", "InferenceClientErrors"} <= metric_names(line)
    assert "model" not in line


def test_the_s3_worker_counts_each_input_under_its_model(s3, uploaded_iris, cache_dir, monkeypatch, capsys):
    data = "metrics-data"
    s3.create_bucket(Bucket=data)
    monkeypatch.setenv(MODEL_BUCKET_ENV, "test-models")
    monkeypatch.setenv(MODELS_ENV, "iris@1")
    monkeypatch.setenv(CACHE_DIR_ENV, str(cache_dir))
    monkeypatch.delenv(PRELOAD_ENV, raising=False)
    handler = load_handler({}, module="worker")
    bodies = []
    for key, body in (
        ("inputs/iris/rows.jsonl", b"[5.1,3.5,1.4,0.2]\n[6.7,3.0,5.2,2.3]\n"),
        ("inputs/iris/bad.jsonl", b"[1, 2]\n"),
        ("inputs/nobody/x.json", b"{}"),
    ):
        etag = s3.put_object(Bucket=data, Key=key, Body=body)["ETag"].strip('"')
        message = json.loads(load_event("sqs-s3-put")["Records"][0]["body"])
        message["Records"][0]["s3"]["bucket"] = {"name": data, "arn": f"arn:aws:s3:::{data}"}
        message["Records"][0]["s3"]["object"] = {"key": key, "eTag": etag, "size": len(body)}
        bodies.append(json.dumps(message))
    template = load_event("sqs-s3-put")["Records"][0]
    records = [{**template, "messageId": f"m-{i}", "body": b} for i, b in enumerate(bodies)]
    capsys.readouterr()
    assert handler({"Records": records}, LocalLambdaContext())["batchItemFailures"] == []
    lines = emf_lines(capsys.readouterr().out)
    [iris] = [line for line in lines if line.get("model") == "iris"]
    assert_about(iris, "iris", "1")
    assert {"PipelineOutput", "PipelineError", "PipelineRows", "InferenceMs"} <= metric_names(iris)
    assert values(iris, "PipelineRows") == [2]
    [service_only] = [line for line in lines if dimension_sets(line) == [["service"]]]
    assert "PipelineError" in metric_names(service_only)  # inputs/nobody/: no model of ours
    assert not [line for line in lines if line.get("model") == "nobody"]


def test_the_gpu_server_flushes_one_line_per_model(iris_package, cache_dir, capsys):
    server = InProcessServer(
        {
            "TIERSERVE_MODEL_DIR": str(iris_package.artifact.parent),
            "TIERSERVE_CACHE_DIR": str(cache_dir),
            "POWERTOOLS_METRICS_DISABLED": "false",
        },
    )
    try:
        assert server.host.wait_ready(30)
        body = load_event("infer-json")["body"].encode()
        for _ in range(3):
            status, _, answer = request(server.port, "POST", "/v2/models/iris/infer", body)
            assert status == 200, answer
        capsys.readouterr()
        telemetry.flush_metrics()
        lines = emf_lines(capsys.readouterr().out)
    finally:
        server.stop()
    [line] = [line for line in lines if line.get("model") == "iris"]
    assert_about(line, "iris", "1")
    assert {"InferenceRequests", "InferenceMs", "BatchRows"} <= metric_names(line)
    assert values(line, "InferenceRequests") == [1, 1, 1]


def model_env(monkeypatch, cache_dir, **extra: str) -> None:
    monkeypatch.setenv(MODEL_BUCKET_ENV, "test-models")
    monkeypatch.setenv(MODELS_ENV, "iris@1")
    monkeypatch.setenv(CACHE_DIR_ENV, str(cache_dir))
    monkeypatch.delenv(PRELOAD_ENV, raising=False)
    for name, value in extra.items():
        monkeypatch.setenv(name, value)
    aws.clear_clients()


def test_the_batch_function_counts_each_item_under_its_model(
    s3, uploaded_iris, cache_dir, monkeypatch, capsys
):
    data = "batch-metrics"
    s3.create_bucket(Bucket=data)
    model_env(monkeypatch, cache_dir, TIERSERVE_DATA_BUCKET=data)
    handler = load_handler({}, module="batch")
    put = s3.put_object(Bucket=data, Key="inputs/iris/a.jsonl", Body=b"[5.1,3.5,1.4,0.2]\n")
    event = {
        "Items": [{"Key": "inputs/iris/a.jsonl", "Etag": put["ETag"], "Size": 18}],
        "BatchInput": {"bucket": data, "model": "iris", "reader": "prefix"},
    }
    capsys.readouterr()
    assert handler(event, LocalLambdaContext())["outputs"] == 1
    lines = emf_lines(capsys.readouterr().out)
    [iris] = [line for line in lines if line.get("model") == "iris"]
    assert_about(iris, "iris", "1")
    assert metric_names(iris) >= {"PipelineOutput", "PipelineRows", "InferenceMs"}
    [cold] = lines_with(lines, "ColdStart")
    assert dimension_sets(cold) == [["function_name", "service"]]  # the batch function serves every model


def test_the_stream_worker_counts_each_record_under_its_model(
    s3, embedded_s3, uploaded_iris, cache_dir, monkeypatch, capsys
):
    streams = create_streams(embedded_s3.client("kinesis"), embedded_s3.client("sqs"))
    model_env(monkeypatch, cache_dir, TIERSERVE_OUTPUT_STREAM=streams.results)
    monkeypatch.delenv("TIERSERVE_STREAM_MODEL", raising=False)
    handler = load_handler({}, module="stream")
    capsys.readouterr()
    assert handler(load_event("kinesis-records"), LocalLambdaContext())["batchItemFailures"] == []
    lines = emf_lines(capsys.readouterr().out)
    [iris] = [line for line in lines if line.get("model") == "iris" and "ColdStart" not in metric_names(line)]
    assert_about(iris, "iris", "1")
    assert metric_names(iris) >= {"StreamResult", "InferenceMs"}
    [cold] = lines_with(lines, "ColdStart")
    assert dimension_sets(cold) == [["function_name", "service"], ["service", "model", "version"]]
