"""`tierserve local` captures the sample models' requests, so `tierserve drift iris --local`
works after some requests: the sample iris carries the baseline of its training data."""

from __future__ import annotations

import json
import os
import time
import urllib.request

import numpy as np
import pytest

from tierserve import aws
from tierserve.tools import cli
from tierserve.tools.local import samples
from tierserve.tools.local import stack as local_stack
from tierserve.tools.local.embedded_s3 import embedded_client

WAIT_S = 60


@pytest.fixture(scope="module")
def iris_stack(tmp_path_factory):
    saved = dict(os.environ)
    work_dir = tmp_path_factory.mktemp("drift-local")
    iris = next(s for s in local_stack.SAMPLES if s.name == "iris")
    stack = local_stack.start(work_dir, port=0, chosen=(iris,))
    yield stack
    stack.stop()
    os.environ.clear()
    os.environ.update(saved)
    aws.clear_clients()


def post_rows(url: str, rows: np.ndarray) -> None:
    body = {
        "inputs": [
            {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}
        ]
    }
    request = urllib.request.Request(
        f"{url}/v2/models/iris/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200


def captured_rows(stack) -> int:
    s3 = embedded_client(stack.state["s3_endpoint"])
    listed = s3.list_objects_v2(Bucket=stack.state["data_bucket"], Prefix="capture/iris/1/").get(
        "Contents", []
    )
    bodies = [s3.get_object(Bucket=stack.state["data_bucket"], Key=o["Key"])["Body"].read() for o in listed]
    return sum(
        json.loads(line)["inputs"]["input"]["shape"][0] for body in bodies for line in body.splitlines()
    )


@pytest.fixture(scope="module")
def drifted_traffic(iris_stack):
    """150 requests of iris rows with longer, wider petals, once they are all in the embedded S3."""
    rows = samples.iris_rows() + np.array([0.0, 0.0, 2.0, 0.8], dtype=np.float32)
    for start in range(0, len(rows), 5):
        post_rows(iris_stack.state["api_url"], rows[start : start + 5])
    deadline = time.monotonic() + WAIT_S
    while captured_rows(iris_stack) < len(rows):  # batches go out every few seconds
        assert time.monotonic() < deadline, "the capture never reached the embedded S3"
        time.sleep(0.5)
    return iris_stack


def test_requests_to_the_local_stack_are_captured_and_drift_reads_them(drifted_traffic, tmp_path, capsys):
    iris_stack = drifted_traffic
    assert "tierserve drift iris --local" in local_stack.describe(iris_stack)
    out = tmp_path / "iris.png"
    args = [
        "drift",
        "iris",
        "--local",
        "--work-dir",
        str(iris_stack.work_dir),
        "--window",
        "1h",
        "--out",
        str(out),
    ]
    assert cli.main(args) == 3
    printed = capsys.readouterr().out
    assert "iris@1: 30 requests, 150 rows" in printed and "verdict: drift" in printed
    assert out.read_bytes().startswith(b"\x89PNG")


def test_the_drift_handler_runs_under_the_lambda_runtime_emulator_on_the_local_stack(drifted_traffic):
    """The scheduled event through the image's handler string and the runtime's JSON."""
    iris_stack = drifted_traffic
    event = json.loads((local_stack.REPO_ROOT / "events" / "drift-schedule.json").read_text())
    response, log_path = local_stack.invoke_in_emulator(iris_stack.work_dir, event, "drift.handler")
    result = response["models"]["iris@1"]
    assert result["verdict"] == "drift", log_path.read_text()[-2000:]
    s3 = embedded_client(iris_stack.state["s3_endpoint"])
    assert (
        s3.head_object(Bucket=iris_stack.state["data_bucket"], Key=result["plot"])["ContentType"]
        == "image/png"
    )
