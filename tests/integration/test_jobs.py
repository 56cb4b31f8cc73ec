"""Async jobs on the local stack, both tiers: ``POST /v2/models/{m}/jobs`` and ``GET
.../jobs/{id}`` through the real jobs handler, inputs through presigned URLs on the embedded S3,
served by the real worker through the embedded queue (the GPU-tier model through the local
SageMaker runtime to its GPU server process), results compared with onnxruntime."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from tierserve import aws
from tierserve.jobs import Jobs, JobsSettings
from tierserve.protocol import encode_infer_request
from tierserve.routes import HttpRequest
from tierserve.s3_pipeline import PipelineSettings
from tierserve.settings import ModelRef, Settings
from tierserve.tools.local import samples
from tierserve.tools.local import stack as local_stack

FEATURES = 256
CLASSES = 16
LAMBDA_MODEL, GPU_MODEL = "small", "tiny-gpu"
CHOSEN = (
    local_stack.Sample(
        LAMBDA_MODEL, "1", partial(samples.mlp, features=FEATURES, hidden=16, layers=2, classes=CLASSES)
    ),
    local_stack.Sample(GPU_MODEL, "1", partial(samples.convnet, channels=4, classes=5), tier="gpu"),
)
ALICE = {"x-api-key": "alice-key"}
BOB = {"x-api-key": "bob-key"}


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers.items()), error.read()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local_stack.LocalStack]:
    saved = dict(os.environ)
    started = local_stack.start(tmp_path_factory.mktemp("jobs-stack"), port=0, chosen=CHOSEN)
    try:
        yield started
    finally:
        started.stop()
        os.environ.clear()
        os.environ.update(saved)
        aws.clear_clients()


def session(stack: local_stack.LocalStack, name: str) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(stack.work_dir / "samples" / f"{name}.onnx"), providers=["CPUExecutionProvider"]
    )


def create(stack: local_stack.LocalStack, model: str, body: bytes = b"", headers=None) -> dict[str, Any]:
    status, answered, raw = http("POST", f"{stack.api.url}/v2/models/{model}/jobs", body, headers or ALICE)
    assert status == 202, raw
    answered = {k.lower(): v for k, v in answered.items()}
    document = json.loads(raw)
    assert re.fullmatch(r"[0-9a-f]{32}", document["id"])
    assert document["status"] == "pending"
    assert (
        answered["location"]
        == document["result"]
        == f"{stack.api.url}/v2/models/{model}/jobs/{document['id']}"
    )
    return document


def wait_done(url: str, headers=None, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status, _, raw = http("GET", url, headers=headers or ALICE)
        assert status == 200, raw
        document = json.loads(raw)
        if document["status"] not in ("pending", "running"):
            return document
        assert time.monotonic() < deadline, document
        time.sleep(0.25)


def test_an_inline_json_job_is_served_and_answered_inline(stack):
    rows = np.random.default_rng(1).standard_normal((3, FEATURES)).astype(np.float32)
    body = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [3, FEATURES], "datatype": "FP32", "data": rows.ravel().tolist()}
            ]
        }
    ).encode()
    job = create(stack, LAMBDA_MODEL, body, {**ALICE, "Content-Type": "application/json"})
    done = wait_done(job["result"])
    assert done["status"] == "succeeded", done
    assert done["model_name"] == LAMBDA_MODEL and done["model_version"] == "1"
    (output,) = done["result"]["outputs"]
    expected = session(stack, LAMBDA_MODEL).run(None, {"input": rows})[0]
    assert np.array_equal(np.asarray(output["data"], np.float32).reshape(output["shape"]), expected)


def test_a_50_mb_npy_job_goes_up_by_presigned_put_and_comes_back_by_presigned_get(stack):
    rows = (
        np.random.default_rng(2).standard_normal((50 * 2**20 // (FEATURES * 4), FEATURES)).astype(np.float32)
    )
    buffer = io.BytesIO()
    np.save(buffer, rows)
    data = buffer.getvalue()
    assert len(data) > 50 * 2**20
    ask = json.dumps({"upload": {"format": "npy", "bytes": len(data)}}).encode()
    job = create(stack, LAMBDA_MODEL, ask)
    upload = job["upload"]
    assert upload["method"] == "PUT" and upload["format"] == "npy"
    assert upload["url"].startswith(stack.s3.endpoint + "/")  # the embedded S3, for curl too
    assert upload["headers"] == {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))}
    assert http("GET", job["result"], headers=ALICE)[2].count(b'"awaiting upload"') == 1
    status, _, raw = http("PUT", upload["url"], data, upload["headers"])
    assert status == 200, raw
    done = wait_done(job["result"])
    assert done["status"] == "succeeded", done
    assert "result" not in done and done["result_bytes"] > 6 * 2**20  # over the inline limit
    status, _, raw = http("GET", done["result_url"])  # presigned: no credentials of ours
    assert status == 200
    (output,) = json.loads(raw)["outputs"]
    expected = session(stack, LAMBDA_MODEL).run(None, {"input": rows})[0]
    assert np.array_equal(np.asarray(output["data"], np.float32).reshape(output["shape"]), expected)


def test_a_gpu_tier_job_in_the_binary_extension_is_served_through_sagemaker(stack):
    images = np.random.default_rng(3).standard_normal((2, 3, 224, 224)).astype(np.float32)
    encoded = encode_infer_request({"image": images}, binary=True)
    job = create(stack, GPU_MODEL, encoded.body, {**ALICE, **encoded.headers})
    done = wait_done(job["result"])
    assert done["status"] == "succeeded", done
    (output,) = done["result"]["outputs"]
    expected = session(stack, GPU_MODEL).run(None, {"image": images})[0]
    np.testing.assert_allclose(
        np.asarray(output["data"], np.float32).reshape(output["shape"]), expected, rtol=1e-5
    )


def test_a_poison_input_ends_failed_with_the_pipelines_reason(stack):
    wrong = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    job = create(stack, LAMBDA_MODEL, json.dumps(wrong).encode())
    done = wait_done(job["result"])
    assert done["status"] == "failed" and done["error_status"] == 400
    assert "shape [1, 3]" in done["error"] and f"[-1, {FEATURES}]" in done["error"]
    job = create(stack, LAMBDA_MODEL, json.dumps({"upload": {"format": "npy"}}).encode())
    assert http("PUT", job["upload"]["url"], b"not numpy at all", job["upload"]["headers"])[0] == 200
    done = wait_done(job["result"])
    assert done["status"] == "failed" and ".npy" in done["error"], done


def test_another_callers_id_and_a_random_id_are_both_404(stack):
    job = create(stack, LAMBDA_MODEL, json.dumps({"upload": True}).encode(), ALICE)
    url = job["result"]
    assert http("GET", url, headers=ALICE)[0] == 200
    answers = [
        http("GET", url, headers=BOB),
        http("GET", url, headers={}),  # anonymous
        http("GET", re.sub(r"[0-9a-f]{32}$", os.urandom(16).hex(), url), headers=ALICE),
        http(
            "GET", url.replace(f"/{LAMBDA_MODEL}/", f"/{GPU_MODEL}/"), headers=ALICE
        ),  # another model's route
    ]
    assert [status for status, _, _ in answers] == [404, 404, 404, 404]
    messages = {
        re.sub(r"[0-9a-f]{32}", "ID", json.loads(raw)["error"]).replace(GPU_MODEL, LAMBDA_MODEL)
        for *_, raw in answers
    }
    assert len(messages) == 1, messages  # one answer: nothing says the id exists for someone else
    assert "other credentials" in messages.pop()


def test_jobs_routes_refuse_what_they_cannot_take(stack):
    url = f"{stack.api.url}/v2/models"
    status, _, raw = http("POST", f"{url}/nope/jobs", b"", ALICE)
    assert status == 404 and "not served" in json.loads(raw)["error"]
    status, _, raw = http("POST", f"{url}/{LAMBDA_MODEL}/jobs", b"[1, 2]", ALICE)
    assert status == 400 and '"upload"' in json.loads(raw)["error"]
    status, _, raw = http("POST", f"{url}/{LAMBDA_MODEL}/jobs", b'{"upload": {"format": "csv"}}', ALICE)
    assert status == 400 and "npy" in json.loads(raw)["error"]
    too_big = json.dumps({"upload": {"format": "npy", "bytes": 65 * 2**20}}).encode()
    status, _, raw = http("POST", f"{url}/{LAMBDA_MODEL}/jobs", too_big, ALICE)
    assert status == 413 and "TIERSERVE_MAX_INPUT_MB" in json.loads(raw)["error"]
    status, _, raw = http("POST", f"{url}/{LAMBDA_MODEL}/versions/9/jobs", b"", ALICE)
    assert status == 404 and "deployed version: 1" in json.loads(raw)["error"]
    status, headers, _ = http("DELETE", f"{url}/{LAMBDA_MODEL}/jobs/{'0' * 32}", None, ALICE)
    assert status == 405 and {k.lower(): v for k, v in headers.items()}["allow"] == "GET"


def test_the_synchronous_413_names_the_jobs_route(stack):
    rows = np.zeros((7 * 2**20 // (FEATURES * 4) + 1, FEATURES), np.float32)
    encoded = encode_infer_request({"input": rows}, binary=True)
    status, _, raw = http(
        "POST", f"{stack.api.url}/v2/models/{LAMBDA_MODEL}/infer", encoded.body, encoded.headers
    )
    assert status == 413
    assert f"POST /v2/models/{LAMBDA_MODEL}/jobs" in json.loads(raw)["error"]


def test_a_job_created_while_the_gpu_model_is_cold_waits_past_the_dead_letter_limit_then_is_served(stack):
    """The worker meets no capacity more often than the queue's maxReceiveCount allows, yet the
    job stays pending (the cold model's deliveries wait in the queue: s3_pipeline/cold.py) and is
    served once a copy runs; nothing reaches the dead-letter queue."""
    from tierserve.tools.local.s3_queue import MAX_RECEIVE_COUNT

    runtime = stack.sagemaker_runtime
    refused: list[str] = []
    refusal = runtime.refusal

    def counting(endpoint: str, component: str | None):
        found = refusal(endpoint, component)
        if found is not None:
            refused.append(component or endpoint)
        return found

    runtime.refusal = counting  # a probe: SageMaker's answers are the runtime's own
    runtime.cold.add(GPU_MODEL)
    try:
        encoded = encode_infer_request({"image": np.ones((1, 3, 224, 224), np.float32)}, binary=True)
        job = create(stack, GPU_MODEL, encoded.body, {**ALICE, **encoded.headers})
        deadline = time.monotonic() + 90
        while len(refused) <= MAX_RECEIVE_COUNT:  # past the receives that would dead-letter it
            assert time.monotonic() < deadline, f"the worker asked the cold model {len(refused)} times"
            time.sleep(0.1)
        status, _, raw = http("GET", job["result"], headers=ALICE)
        assert status == 200 and json.loads(raw)["status"] == "pending", raw  # waiting, not failed
    finally:
        runtime.cold.discard(GPU_MODEL)
        runtime.refusal = refusal
    done = wait_done(job["result"])
    assert done["status"] == "succeeded", done
    assert done["result"]["outputs"][0]["shape"] == [1, 5]
    sqs = stack.s3.client("sqs")
    dead = sqs.get_queue_attributes(
        QueueUrl=stack.pipeline.queues.dlq_url, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]["ApproximateNumberOfMessages"]
    assert dead == "0"


def jobs_service(expires_s: int) -> Jobs:
    """The jobs service in this process, on the stack's S3 (through this process's environment)."""
    settings = JobsSettings(
        Settings(models=(ModelRef("iris", "1"),)),
        PipelineSettings(data_bucket=local_stack.DATA_BUCKET),
        url_expires_s=expires_s,
    )
    return Jobs(settings)


def test_presigned_urls_expire_and_name_one_key(stack):
    """moto checks neither a presigned URL's expiry nor its signature; the embedded S3's front
    checks both as S3 documents (tierserve.tools.local.embedded_s3)."""
    request = HttpRequest("POST", "/v2/models/iris/jobs", {"Host": "api.example"}, b"")
    lasting = json.loads(jobs_service(600).create("iris", request).body)
    other_key = lasting["upload"]["url"].replace(lasting["id"], "0" * 32)
    status, _, raw = http("PUT", other_key, b"{}", lasting["upload"]["headers"])
    assert status == 403 and b"SignatureDoesNotMatch" in raw  # the signature covers the key
    status, _, raw = http("PUT", lasting["upload"]["url"], b"{}", {"Content-Type": "text/plain"})
    assert status == 403 and b"SignatureDoesNotMatch" in raw  # and the headers it names
    jobs = jobs_service(1)
    created = json.loads(jobs.create("iris", request).body)
    time.sleep(2.1)
    status, _, raw = http("PUT", created["upload"]["url"], b"{}", created["upload"]["headers"])
    assert status == 403 and b"Request has expired" in raw
    status = json.loads(jobs.status("iris", created["id"], request).body)
    assert status["status"] == "failed" and "upload URL expired" in status["error"]


def test_the_readme_example_flow_is_what_curl_does(stack, tmp_path: Path):
    """An upload job with no body, its input PUT by curl with the headers the answer names."""
    import shutil
    import subprocess

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    job = create(stack, LAMBDA_MODEL)
    rows = [[0.5] * FEATURES]
    body = {"inputs": [{"name": "input", "shape": [1, FEATURES], "datatype": "FP32", "data": rows}]}
    (tmp_path / "request.json").write_text(json.dumps(body))
    headers = [arg for name, value in job["upload"]["headers"].items() for arg in ("-H", f"{name}: {value}")]
    put = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-T",
            str(tmp_path / "request.json"),
            *headers,
            job["upload"]["url"],
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert put.stdout == "200", put
    assert wait_done(job["result"])["status"] == "succeeded"


# ---------------------------------------------------------------- tierserve infer


def infer(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``tierserve infer ...`` as users run it: its own process, the real CLI."""
    import subprocess
    import sys

    environment = {k: v for k, v in os.environ.items() if not k.startswith("TIERSERVE_")}
    environment.update(env or {})
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from tierserve.tools.cli import main; raise SystemExit(main())",
            "infer",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )
    return done.returncode, done.stdout, done.stderr


def test_tierserve_infer_sends_a_small_input_synchronously(stack, tmp_path: Path):
    rows = np.random.default_rng(4).standard_normal((2, FEATURES)).astype(np.float32)
    np.save(tmp_path / "rows.npy", rows)
    code, out, err = infer(LAMBDA_MODEL, str(tmp_path / "rows.npy"), "--url", stack.api.url)
    assert code == 0, err
    assert "job" not in err  # the sync route: no job was created
    (output,) = json.loads(out)["outputs"]
    expected = session(stack, LAMBDA_MODEL).run(None, {"input": rows})[0]
    assert np.allclose(np.asarray(output["data"], np.float32).reshape(output["shape"]), expected)


def test_tierserve_infer_sends_a_large_input_as_a_job_with_a_progress_bar(stack, tmp_path: Path):
    rows = (
        np.random.default_rng(5).standard_normal((8 * 2**20 // (FEATURES * 4), FEATURES)).astype(np.float32)
    )
    np.save(tmp_path / "big.npy", rows)
    out_file = tmp_path / "result.json"
    code, _, err = infer(
        LAMBDA_MODEL,
        str(tmp_path / "big.npy"),
        "--url",
        stack.api.url,
        "--out",
        str(out_file),
        "--api-key",
        "carol",
    )
    assert code == 0, err
    assert (
        re.search(r"job [0-9a-f]{32} created", err) and "uploading big.npy [" in err and "8.0/8.0 MB" in err
    )
    (output,) = json.loads(out_file.read_bytes())["outputs"]
    expected = session(stack, LAMBDA_MODEL).run(None, {"input": rows})[0]
    assert np.array_equal(np.asarray(output["data"], np.float32).reshape(output["shape"]), expected)


def test_tierserve_infer_async_returns_the_job_signed_with_sigv4_and_scoped_to_the_signer(
    stack, tmp_path: Path
):
    (tmp_path / "rows.jsonl").write_text(json.dumps([0.25] * FEATURES) + "\n")
    signer = {"AWS_ACCESS_KEY_ID": "AKIDALICE", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_REGION": "us-east-1"}
    code, out, err = infer(
        LAMBDA_MODEL,
        str(tmp_path / "rows.jsonl"),
        "--url",
        stack.api.url,
        "--async",
        "--auth",
        "iam",
        env=signer,
    )
    assert code == 0, err
    job = json.loads(out)
    assert job["status"] == "pending" and job["result"].endswith(job["id"])
    signed_by_alice = {
        "Authorization": "AWS4-HMAC-SHA256 Credential=AKIDALICE/20260101/us-east-1/execute-api/aws4_request"
    }
    assert wait_done(job["result"], signed_by_alice)["status"] == "succeeded"
    assert http("GET", job["result"], headers=ALICE)[0] == 404  # another caller


def test_tierserve_infer_errors_are_one_line_with_the_fix_and_their_exit_code(stack, tmp_path: Path):
    wrong = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    code, _, err = infer(LAMBDA_MODEL, str(tmp_path / "wrong.json"), "--url", stack.api.url)
    assert code == 1 and err.count("\n") == 1 and "shape [1, 2]" in err, err
    code, _, err = infer(LAMBDA_MODEL, str(tmp_path / "wrong.json"), "--url", stack.api.url, "--wait")
    assert code == 1 and "failed: " in err and "shape [1, 2]" in err, err
    code, _, err = infer(LAMBDA_MODEL, str(tmp_path / "absent.json"), "--url", stack.api.url)
    assert code == 2 and err.startswith("tierserve infer: cannot read") and err.count("\n") == 1, err
    code, _, err = infer(LAMBDA_MODEL, str(tmp_path / "wrong.json"), "--url", "http://127.0.0.1:9")
    assert code == 3 and "nothing answers at http://127.0.0.1:9" in err and err.count("\n") == 1, err
    code, _, err = infer(
        LAMBDA_MODEL, str(tmp_path / "wrong.json"), "--url", stack.api.url, "--auth", "api_key"
    )
    assert code == 2 and "--api-key" in err, err


def test_a_bin_input_says_where_its_header_length_goes_and_is_served_with_it(stack):
    """The S3 pipeline's .bin format (a binary OIP request; how jobs store one) outside jobs."""
    s3 = stack.s3.client()
    rows = np.random.default_rng(6).standard_normal((2, FEATURES)).astype(np.float32)
    encoded = encode_infer_request({"input": rows}, binary=True)
    length = encoded.headers["Inference-Header-Content-Length"]
    s3.put_object(Bucket=local_stack.DATA_BUCKET, Key=f"inputs/{LAMBDA_MODEL}/bare.bin", Body=encoded.body)
    s3.put_object(
        Bucket=local_stack.DATA_BUCKET,
        Key=f"inputs/{LAMBDA_MODEL}/with-length.bin",
        Body=encoded.body,
        Metadata={"inference-header-content-length": length},
    )
    deadline = time.monotonic() + 60
    found: dict[str, Any] = {}
    while len(found) < 2:
        assert time.monotonic() < deadline, found
        for name, key in (
            ("bare", f"errors/{LAMBDA_MODEL}/bare.bin.json"),
            ("with", f"outputs/{LAMBDA_MODEL}/with-length.bin.json"),
        ):
            with contextlib.suppress(s3.exceptions.NoSuchKey):
                found[name] = json.loads(
                    s3.get_object(Bucket=local_stack.DATA_BUCKET, Key=key)["Body"].read()
                )
        time.sleep(0.2)
    assert "inference-header-content-length" in found["bare"]["error"] and found["bare"]["status"] == 400
    (output,) = found["with"]["outputs"]
    expected = session(stack, LAMBDA_MODEL).run(None, {"input": rows})[0]
    assert np.array_equal(np.asarray(output["data"], np.float32).reshape(output["shape"]), expected)
