"""A manifest whose signature is not the model's (here: the iris input declared FP64, the model
takes FP32) is refused when the session is created, with a 503 that names the mismatch, on the
Lambda API handler and on the GPU server's host; before, the model was served and every
request that followed the manifest was blamed on the client."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from support.common import BUCKET, load_event, make_invoke
from tierserve.catalog import TensorSpec
from tierserve.protocol import encode_infer_request
from tierserve.routes import HttpRequest
from tierserve.sagemaker_hosting import ModelHost, ServerSettings, build_registry
from tierserve.tools.packaging import PackagedModel, upload_package

MISMATCH = (
    "iris@1: its manifest does not match the model: input 'input' is FP32 in the model, FP64 in the manifest"
)
ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]])


def fp64_request() -> dict:
    """The infer-json event with the input as the (wrong) manifest declares it: FP64."""
    event = load_event("infer-json")
    event["body"] = encode_infer_request({"input": ROWS.astype(np.float64)}).body.decode()
    return event


def assert_refused(status: int, body: bytes) -> None:
    assert status == 503, body[:300]
    message = json.loads(body)["error"]
    assert MISMATCH in message and "Package the model again" in message, message


@pytest.fixture
def fp64_manifest(iris_package: PackagedModel) -> PackagedModel:
    wrong = replace(iris_package.manifest, inputs=(TensorSpec("input", "FP64", (-1, 4)),))
    return PackagedModel(wrong, iris_package.artifact)


@pytest.mark.filterwarnings("ignore:No application metrics to publish")
def test_the_api_handler_refuses_the_model_with_a_503_every_time(s3, fp64_manifest, cache_dir, monkeypatch):
    upload_package(fp64_manifest, s3, BUCKET, "models")
    invoke = make_invoke(monkeypatch, cache_dir)
    for _ in range(2):  # nothing of the refused model is kept: the second request is refused again
        status, _, body = invoke(fp64_request())
        assert_refused(status, body)
    status, _, body = invoke(load_event("ready"))
    assert_refused(status, body)
    assert not cache_dir.exists() or list(cache_dir.iterdir()) == []  # nothing of it is cached


def test_the_gpu_servers_host_refuses_the_model_with_a_503(fp64_manifest, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(fp64_manifest.artifact, folder / fp64_manifest.artifact.name)
    (folder / "manifest.json").write_text(fp64_manifest.manifest.to_json())
    environ = {"TIERSERVE_MODEL_DIR": str(folder), "TIERSERVE_CACHE_DIR": str(tmp_path / "cache")}
    settings = ServerSettings.from_env(environ)
    host = ModelHost(build_registry(settings, environ), settings)
    ready = host.respond(HttpRequest("GET", "/v2/models/iris/ready"))
    assert_refused(ready.status, ready.body)
    infer = fp64_request()
    response = host.respond(
        HttpRequest("POST", "/v2/models/iris/infer", infer["headers"], infer["body"].encode())
    )
    assert_refused(response.status, response.body)
