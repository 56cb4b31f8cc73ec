"""Output limits on every tier: the Lambda handler, the GPU server (/invocations and the OIP
route) and the S3 worker answer the same limited outputs (the stream worker calls the same
``output_limits.apply``); `tierserve package --round --top-k` writes them into the manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest

from support.common import BUCKET, load_event, make_invoke
from support.gpu import InProcessServer, request
from tierserve.catalog import Manifest, OutputLimits
from tierserve.protocol import decode_infer_response
from tierserve.settings import CACHE_DIR_ENV, MODEL_BUCKET_ENV, MODELS_ENV, PRELOAD_ENV
from tierserve.tools.cli import main
from tierserve.tools.local.apigw import LocalLambdaContext
from tierserve.tools.local.stack import load_handler
from tierserve.tools.packaging import package_model, upload_package

LIMITS = OutputLimits(round=2, top_k=1)


@pytest.fixture(scope="module")
def limited_package(iris_onnx, tmp_path_factory):
    return package_model(
        iris_onnx,
        name="iris",
        version="1",
        out_dir=tmp_path_factory.mktemp("limited") / "iris",
        output_limits=LIMITS,
    )


def assert_limited(probabilities: np.ndarray) -> None:
    assert probabilities.shape == (2, 3)
    assert np.count_nonzero(probabilities, axis=-1).tolist() == [1, 1]  # top-1 only
    np.testing.assert_array_equal(np.round(probabilities, 2), probabilities)  # 2 decimals
    assert probabilities.max(axis=-1).min() > 0.5


def test_the_lambda_tier_answers_within_the_limits(s3, limited_package, cache_dir, monkeypatch):
    upload_package(limited_package, s3, BUCKET, "models")
    invoke = make_invoke(monkeypatch, cache_dir)
    for event in ("infer-json", "infer-binary"):
        status, result, body = invoke(load_event(event))
        assert status == 200, body
        assert_limited(decode_infer_response(body, result["headers"])["probabilities"])
    status, result, body = invoke(load_event("infer-binary"))
    assert decode_infer_response(body, result["headers"])["label"].tolist() == [0, 2]  # integers untouched


def test_the_gpu_tier_answers_within_the_limits(limited_package, cache_dir):
    server = InProcessServer(
        {"TIERSERVE_MODEL_DIR": str(limited_package.artifact.parent), "TIERSERVE_CACHE_DIR": str(cache_dir)}
    )
    try:
        assert server.host.wait_ready(30)
        body = load_event("infer-json")["body"].encode()
        for path in ("/v2/models/iris/infer", "/invocations"):
            status, headers, answer = request(server.port, "POST", path, body)
            assert status == 200, answer
            assert_limited(decode_infer_response(answer, headers)["probabilities"])
    finally:
        server.stop()


def test_the_s3_worker_writes_limited_outputs(s3, limited_package, cache_dir, monkeypatch):
    upload_package(limited_package, s3, BUCKET, "models")
    data = "limits-data"
    s3.create_bucket(Bucket=data)
    monkeypatch.setenv(MODEL_BUCKET_ENV, BUCKET)
    monkeypatch.setenv(MODELS_ENV, "iris@1")
    monkeypatch.setenv(CACHE_DIR_ENV, str(cache_dir))
    monkeypatch.delenv(PRELOAD_ENV, raising=False)
    handler = load_handler({}, module="worker")
    key, body = "inputs/iris/rows.jsonl", b"[5.1,3.5,1.4,0.2]\n[6.7,3.0,5.2,2.3]\n"
    etag = s3.put_object(Bucket=data, Key=key, Body=body)["ETag"].strip('"')
    message = json.loads(load_event("sqs-s3-put")["Records"][0]["body"])
    message["Records"][0]["s3"]["bucket"] = {"name": data, "arn": f"arn:aws:s3:::{data}"}
    message["Records"][0]["s3"]["object"] = {"key": key, "eTag": etag, "size": len(body)}
    record = {**load_event("sqs-s3-put")["Records"][0], "body": json.dumps(message)}
    assert handler({"Records": [record]}, LocalLambdaContext())["batchItemFailures"] == []
    document = json.loads(s3.get_object(Bucket=data, Key="outputs/iris/rows.jsonl.json")["Body"].read())
    outputs = {o["name"]: o for o in document["outputs"]}
    assert_limited(np.asarray(outputs["probabilities"]["data"], dtype=np.float32).reshape(2, 3))


def test_tierserve_package_writes_the_limits_into_the_manifest(iris_onnx, tmp_path, capsys):
    out = tmp_path / "pkg"
    code = main(
        ["package", str(iris_onnx), "--name", "iris", "--version", "1", "--out", str(out), "--round", "3",
         "--top-k", "2", "--limit-outputs", "probabilities", "--compress-seconds", "1"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    manifest = Manifest.from_json((out / "manifest.json").read_bytes())
    assert manifest.output_limits == OutputLimits(round=3, top_k=2, outputs=("probabilities",))


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--top-k", "1", "--limit-outputs", "label"], "names 'label', a INT64 output"),
        (["--limit-outputs", "probabilities"], "--limit-outputs names what --round or --top-k limit"),
        (["--response-cache-shared"], "--response-cache-shared needs --response-cache ENTRIES"),
    ],
)
def test_tierserve_package_refuses_limits_the_model_cannot_take(iris_onnx, tmp_path, capsys, argv, fragment):
    code = main(
        ["package", str(iris_onnx), "--name", "iris", "--version", "1", "--out", str(tmp_path / "p"),
         "--compress-seconds", "1", *argv]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0
    [line] = [line for line in err.splitlines() if ": error: " in line]
    assert line.startswith("tierserve package: error: ") and fragment in line, err
