"""Triton's statistics extension on the long-lived servers, read with the real tritonclient:
the GPU server and the local API count inferences, executions, successes and failures and
their durations in Triton's JSON, per model and version; the local API merges its GPU servers'."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from support.common import make_handler
from support.gpu import InProcessServer
from tierserve.settings import ModelRef
from tierserve.stats import DURATIONS, STATISTICS
from tierserve.tools.local.api_server import LocalApi
from tierserve.tools.packaging import package_model

ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)


@pytest.fixture(autouse=True)
def fresh_statistics():
    STATISTICS.clear()
    yield
    STATISTICS.clear()


def infer(
    client: triton.InferenceServerClient, model: str, rows: np.ndarray = ROWS, *, binary: bool = True
) -> None:
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    client.infer(model, [tensor])


def assert_consistent(stat: dict) -> None:
    """What Triton's figures promise whatever the timing: every execution is in one batch size,
    every inference row in one execution, durations only where something was counted."""
    inference = stat["inference_stats"]
    assert set(inference) == set(DURATIONS)
    batches = stat["batch_stats"]
    assert sum(b["compute_infer"]["count"] for b in batches) == stat["execution_count"]
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in batches) == stat["inference_count"]
    assert stat["execution_count"] <= inference["success"]["count"] * 2  # at most one run per row here
    for name, duration in inference.items():
        assert (duration["count"] == 0) <= (duration["ns"] == 0), name


def test_the_gpu_server_answers_statistics_to_tritonclient(iris_package, cache_dir):
    server = InProcessServer(
        {"TIERSERVE_MODEL_DIR": str(iris_package.artifact.parent), "TIERSERVE_CACHE_DIR": str(cache_dir)}
    )
    try:
        assert server.host.wait_ready(30)
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        before = client.get_inference_statistics("iris")
        assert before["model_stats"][0]["inference_count"] == 0
        for _ in range(3):
            infer(client, "iris")
        with pytest.raises(InferenceServerException):
            infer(client, "iris", np.zeros((1, 3), dtype=np.float32))  # the wrong shape: a failure
        [stat] = client.get_inference_statistics("iris", "1")["model_stats"]
        every = client.get_inference_statistics()["model_stats"]
        with pytest.raises(InferenceServerException, match="not served here"):
            client.get_inference_statistics("resnet")
        with pytest.raises(InferenceServerException, match="version '9'"):
            client.get_inference_statistics("iris", "9")
    finally:
        server.stop()
    assert (stat["name"], stat["version"]) == ("iris", "1")
    assert stat["inference_count"] == 6  # rows, as Triton counts them
    assert 1 <= stat["execution_count"] <= 3  # the batcher may have merged some
    inference = stat["inference_stats"]
    assert (inference["success"]["count"], inference["fail"]["count"]) == (3, 1)
    assert inference["fail"]["ns"] > 0 and inference["success"]["ns"] > 0
    assert inference["compute_infer"]["count"] == inference["queue"]["count"] == 3
    assert stat["last_inference"] > 0
    assert_consistent(stat)
    assert [s["name"] for s in every] == ["iris"]


def test_the_local_api_answers_statistics_and_merges_its_gpu_servers(
    s3, uploaded_iris, iris_onnx, cache_dir, tmp_path, monkeypatch
):
    gpu_package = package_model(iris_onnx, name="iris-gpu", version="2", out_dir=tmp_path / "iris-gpu")
    gpu = InProcessServer(
        {
            "TIERSERVE_MODEL_DIR": str(gpu_package.artifact.parent),
            "TIERSERVE_CACHE_DIR": str(tmp_path / "gpu"),
        }
    )
    handler = make_handler(monkeypatch, cache_dir)
    api = LocalApi(
        handler,
        functions={"iris": handler},
        upstreams={"iris-gpu": f"http://127.0.0.1:{gpu.port}"},
        port=0,
        served=[ModelRef("iris", "1")],
    ).start()
    try:
        assert gpu.host.wait_ready(30)
        client = triton.InferenceServerClient(api.url.removeprefix("http://"))
        for _ in range(2):  # JSON tensors here; binary requests through the local API are the clients tests'
            infer(client, "iris", binary=False)
        infer(client, "iris-gpu")
        [lambda_tier] = client.get_inference_statistics("iris")["model_stats"]
        [gpu_tier] = client.get_inference_statistics("iris-gpu", "2")["model_stats"]
        every = {s["name"]: s for s in client.get_inference_statistics()["model_stats"]}
        with pytest.raises(InferenceServerException, match="not served here"):
            client.get_inference_statistics("resnet")
    finally:
        api.stop()
        gpu.stop()
    assert (lambda_tier["name"], lambda_tier["version"], lambda_tier["inference_count"]) == ("iris", "1", 4)
    assert lambda_tier["execution_count"] == 2  # one run per request: a Lambda environment does not batch
    assert lambda_tier["inference_stats"]["success"]["count"] == 2
    assert (gpu_tier["name"], gpu_tier["version"], gpu_tier["inference_count"]) == ("iris-gpu", "2", 2)
    assert set(every) == {"iris", "iris-gpu"}
    for stat in every.values():
        assert_consistent(stat)
