"""The SageMaker contract without HTTP: settings from the environment, where the binary
header's length may hide, warm-up inputs, the model directory, the routes before the model
is ready, and /ping turning 503 when a loaded model stops serving."""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from tierserve.batching import BatchingConfig, BatchingModel
from tierserve.catalog import TensorSpec
from tierserve.errors import ArtifactRejected, ModelUnavailable
from tierserve.execution_providers import CUDA
from tierserve.model import OnnxModel
from tierserve.protocol import encode_infer_request
from tierserve.registry import ModelRegistry
from tierserve.routes import HttpRequest
from tierserve.sagemaker_hosting import (
    CUSTOM_ATTRIBUTES,
    ModelDirSource,
    ModelHost,
    ServerSettings,
    build_registry,
    example_inputs,
    invocation_headers,
    model_dir_ref,
)
from tierserve.settings import MB, Settings, SettingsError
from tierserve.store import ArtifactStore


def test_settings_defaults_follow_the_sagemaker_contract():
    settings = ServerSettings.from_env({})
    assert settings.port == 8080
    assert settings.model_dir == Path("/opt/ml/model")
    assert settings.batching == BatchingConfig(max_batch_size=32, max_queue_delay_ms=5.0, max_queue_size=256)
    assert settings.providers.requested is None and settings.providers.trt_fp16 is True
    assert settings.io_binding == "auto"


def test_settings_read_every_variable():
    settings = ServerSettings.from_env(
        {
            "SAGEMAKER_BIND_TO_PORT": "9001",
            "TIERSERVE_MODEL_DIR": "/models",
            "TIERSERVE_MAX_BATCH_SIZE": "8",
            "TIERSERVE_MAX_QUEUE_DELAY_MS": "2.5",
            "TIERSERVE_MAX_QUEUE_SIZE": "64",
            "TIERSERVE_RUN_TIMEOUT_S": "30",
            "TIERSERVE_PROVIDERS": "cuda,cpu",
            "TIERSERVE_TRT_FP16": "false",
            "TIERSERVE_TRT_CACHE_DIR": "/cache/trt",
            "TIERSERVE_IO_BINDING": "off",
            "TIERSERVE_DRAIN_TIMEOUT_S": "5",
        }
    )
    assert (settings.port, settings.model_dir, settings.io_binding, settings.drain_timeout_s) == (
        9001,
        Path("/models"),
        "off",
        5.0,
    )
    assert settings.batching == BatchingConfig(8, 2.5, 64, run_timeout_s=30.0)
    assert settings.providers.requested == (CUDA, "CPUExecutionProvider")
    assert settings.providers.trt_fp16 is False and settings.providers.trt_cache_dir == Path("/cache/trt")


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("TIERSERVE_MAX_BATCH_SIZE", "many", "is not a whole number; set it to 1 to 4096"),
        ("TIERSERVE_MAX_BATCH_SIZE", "0", "is under 1; set it to 1 to 4096"),
        (
            "TIERSERVE_MAX_QUEUE_DELAY_MS",
            "soon",
            "is not a number; set it to a number of milliseconds from 0",
        ),
        ("TIERSERVE_RUN_TIMEOUT_S", "0", "is 0; set it to a number of seconds over 0"),
        ("TIERSERVE_TRT_FP16", "perhaps", "is not true or false"),
        ("TIERSERVE_PROVIDERS", "tpu", "names an execution provider this server does not know"),
        ("TIERSERVE_IO_BINDING", "sometimes", "is not one of auto, on, off"),
    ],
)
def test_bad_settings_name_the_variable_and_the_problem(variable, value, fragment):
    """Every variable of every reader: tests/unit/test_settings_reader.py."""
    with pytest.raises(SettingsError, match=fragment) as raised:
        ServerSettings.from_env({variable: value})
    assert str(raised.value).startswith(f"{variable}={value!r}")


def test_the_binary_header_length_is_found_where_a_sagemaker_caller_can_put_it():
    plain = {"Content-Type": "application/octet-stream"}
    length = "inference-header-content-length"
    assert invocation_headers({**plain, "Inference-Header-Content-Length": "12"}, {})[length.title()] == "12"
    assert invocation_headers(plain, {length: "34"})[length] == "34"
    triton = {"Content-Type": "application/vnd.sagemaker-triton.binary+json;json-header-size=56"}
    assert invocation_headers(triton, {})[length] == "56"
    assert length not in {k.lower() for k in invocation_headers(plain, {"other": "1"})}


def test_warm_up_inputs_follow_the_signature(iris_package):
    inputs = example_inputs(iris_package.manifest, batch_size=4)
    assert inputs["input"].shape == (4, 4) and inputs["input"].dtype == np.float32
    manifest = dataclasses.replace(
        iris_package.manifest,
        inputs=(TensorSpec("image", "FP16", (-1, 3, -1, -1)), TensorSpec("text", "BYTES", (2,))),
    )
    inputs = example_inputs(manifest, batch_size=8)
    assert inputs["image"].shape == (8, 3, 1, 1) and inputs["image"].dtype == np.float16
    assert inputs["text"].tolist() == ["", ""]


def test_the_model_directory_names_its_model(iris_package, tmp_path):
    folder = iris_package.artifact.parent
    assert str(model_dir_ref(folder)) == "iris@1"
    with pytest.raises(ModelUnavailable, match="TIERSERVE_MODEL_BUCKET"):
        model_dir_ref(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(ArtifactRejected, match="not a valid manifest"):
        model_dir_ref(tmp_path)


def test_s3_without_a_model_list_is_a_configuration_error():
    with pytest.raises(ModelUnavailable, match="TIERSERVE_MODELS must name"):
        build_registry(ServerSettings.from_env({}), {"TIERSERVE_MODEL_BUCKET": "models"})


def test_before_loading_ping_and_readiness_say_503_and_other_routes_answer(iris_package, cache_dir):
    environ = {
        "TIERSERVE_MODEL_DIR": str(iris_package.artifact.parent),
        "TIERSERVE_CACHE_DIR": str(cache_dir),
    }
    settings = ServerSettings.from_env(environ)
    host = ModelHost(build_registry(settings, environ), settings)  # not started: nothing loads
    ping = host.respond(HttpRequest("GET", "/ping", {}, b""))
    assert ping.status == 503 and "not ready: loading" in json.loads(ping.body)["error"]
    assert host.respond(HttpRequest("GET", "/v2/health/ready", {}, b"")).status == 503
    assert host.respond(HttpRequest("GET", "/v2/health/live", {}, b"")).status == 200
    assert host.respond(HttpRequest("GET", "/invocations", {}, b"")).status == 405
    assert host.respond(HttpRequest("GET", "/nowhere", {}, b"")).status == 404
    unknown = host.respond(HttpRequest("POST", "/invocations", {CUSTOM_ATTRIBUTES: "model=resnet"}, b"{}"))
    assert unknown.status == 404 and "resnet" in json.loads(unknown.body)["error"]


class Fatal(BaseException):
    """Not an ``Exception``: it ends the batcher thread that meets it."""


class FatalOnPoison(OnnxModel):
    """The real iris session, except that a request whose first value is -13 raises :class:`Fatal`."""

    def predict(self, inputs, output_names=None):
        if next(iter(inputs.values())).flat[0] == -13:
            raise Fatal
        return super().predict(inputs, output_names)


def test_ping_turns_503_once_a_loaded_model_stops_serving(iris_package, cache_dir):
    folder = iris_package.artifact.parent
    ref = model_dir_ref(folder)
    server = ServerSettings(model_dir=folder, batching=BatchingConfig(max_queue_delay_ms=1))
    registry = ModelRegistry(
        Settings(models=(ref,), cache_dir=cache_dir, memory_budget_mb=64),
        partial(ArtifactStore, ModelDirSource(folder, ref), cache_dir, 64 * MB),
        model_factory=lambda *args: BatchingModel(FatalOnPoison(*args), server.batching),
    )
    host = ModelHost(registry, server).start()
    try:
        assert host.wait_ready(30)
        assert host.respond(HttpRequest("GET", "/ping", {}, b"")).status == 200
        good = encode_infer_request({"input": np.ones((1, 4), dtype=np.float32)})
        assert host.respond(HttpRequest("POST", "/invocations", good.headers, good.body)).status == 200
        poisoned = encode_infer_request({"input": np.full((1, 4), -13, dtype=np.float32)})
        dead = host.respond(HttpRequest("POST", "/invocations", poisoned.headers, poisoned.body))
        assert dead.status == 503 and "the batcher of iris stopped (Fatal)" in json.loads(dead.body)["error"]
        ping = host.respond(HttpRequest("GET", "/ping", {}, b""))
        assert ping.status == 503
        assert (
            json.loads(ping.body)["error"]
            == "not ready: iris@1 stopped serving (its batcher died or a run is stuck)"
        )
        assert host.respond(HttpRequest("GET", "/v2/health/ready", {}, b"")).status == 503
        assert not host.ready
    finally:
        host.close()
