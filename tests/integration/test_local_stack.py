"""``tierserve local`` as a whole: one slow model load holds up only its own model; the S3
pipeline serves gpu-tier models through a SageMaker runtime in front of their GPU server
process; the stack is ready only when all of it answers, and its state file lives exactly as
long as it does; the other ``tierserve local`` commands refuse a stack that is gone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from botocore.exceptions import ClientError

from support.flaky import FlakyProxy
from support.rawhttp import exchange, get, post
from tierserve import aws
from tierserve.catalog import Catalog
from tierserve.protocol import decode_infer_response, encode_infer_request
from tierserve.tools import cli
from tierserve.tools.local import samples
from tierserve.tools.local import stack as local_stack
from tierserve.tools.local.api_server import LocalApi
from tierserve.tools.local.embedded_s3 import LOCAL_CREDENTIALS
from tierserve.tools.local.packages import LocalModelsError, user_models
from tierserve.tools.local.processes import free_port
from tierserve.tools.local.s3_queue import put_and_wait
from tierserve.tools.local.state import STATE_FILE, LocalStackNotRunning, answers, running_stack, write_state
from tierserve.tools.packaging import package_model, upload_package

TIERSERVE = [sys.executable, "-c", "from tierserve.tools.cli import main; raise SystemExit(main())"]
START_TIMEOUT_S = 180
TINY = partial(samples.mlp, features=4, hidden=8, layers=2, classes=3)
ROWS = np.array([[0.5, 1.0, 1.5, 2.0], [2.0, 1.5, 1.0, 0.5]], dtype=np.float32)


def tiny_package(folder: Path, name: str, version: str = "1", tier: str | None = None):
    source = TINY(folder / "sources" / f"{name}.onnx")
    return package_model(source, name=name, version=version, out_dir=folder / name / version, tier=tier)


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, dict(response.headers.items()), response.read()


def infer(url: str, model: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    encoded = encode_infer_request({"input": rows}, binary=True)
    status, headers, body = http("POST", f"{url}/v2/models/{model}/infer", encoded.body, encoded.headers)
    assert status == 200
    return decode_infer_response(body, headers)


# ---------------------------------------------------------------- one execution environment per model


def test_a_slow_load_holds_up_only_its_own_model(embedded_s3, s3, tmp_path, monkeypatch):
    """S3 stalls on one model's objects: its request waits, while another model loads and
    answers, and health answers, meanwhile; then the slow one answers too."""
    s3.create_bucket(Bucket=local_stack.LOCAL_BUCKET)
    manifests = []
    for name in ("slow", "quick"):
        package = tiny_package(tmp_path / "packages", name)
        manifests.append(
            upload_package(package, s3, local_stack.LOCAL_BUCKET, local_stack.MODEL_PREFIX).manifest
        )
    proxy = FlakyProxy(embedded_s3.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    aws.clear_clients()
    functions = {
        m.name: local_stack.new_execution_environment(
            local_stack.api_env(tmp_path, [m], cache=m.name), name=m.name
        )
        for m in manifests
    }
    front = local_stack.new_execution_environment(
        local_stack.api_env(tmp_path, manifests, cache="front"), name="front"
    )
    api = LocalApi(front, functions=functions, port=0).start()
    port = int(api.url.rsplit(":", 1)[1])
    body = json.dumps(
        {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": ROWS.ravel().tolist()}]}
    ).encode()
    request = partial(post, body=body, headers="Content-Type: application/json\r\n")
    proxy.hold_path = "/models/slow/"
    try:
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(exchange, port, request("/v2/models/slow/infer"))
            assert proxy.held.acquire(timeout=30)  # the slow model's load waits on S3
            quick = exchange(port, request("/v2/models/quick/infer"))
            assert quick.status == 200, quick.body
            assert exchange(port, get("/v2/health/live")).status == 200
            assert not slow.done()
            proxy.release()
            assert slow.result(timeout=60).status == 200
            assert slow.result().json()["outputs"] == quick.json()["outputs"]  # the same tiny model
    finally:
        proxy.release()
        api.stop()
        proxy.stop()


# ---------------------------------------------------------------- a stack with a model on each tier


@pytest.fixture(scope="module")
def two_tier_stack(tmp_path_factory) -> Iterator[local_stack.LocalStack]:
    saved = dict(os.environ)
    work_dir = tmp_path_factory.mktemp("two-tier")
    chosen = (
        local_stack.Sample("small", "1", TINY),
        local_stack.Sample("tiny-gpu", "1", partial(samples.convnet, channels=4, classes=5), tier="gpu"),
    )
    stack = local_stack.start(work_dir, port=0, chosen=chosen)
    yield stack
    stack.stop()
    os.environ.clear()
    os.environ.update(saved)
    aws.clear_clients()


def test_the_stack_records_itself_once_everything_answers(two_tier_stack):
    state = json.loads((two_tier_stack.work_dir / STATE_FILE).read_text())
    assert state == two_tier_stack.state
    assert state["pid"] == os.getpid()
    for key in ("api_url", "s3_endpoint", "sagemaker_endpoint"):
        assert answers(state[key]), key
    sqs = boto3.client("sqs", endpoint_url=state["s3_endpoint"], **_credentials())
    assert sqs.get_queue_attributes(QueueUrl=state["queue_url"], AttributeNames=["QueueArn"])
    assert two_tier_stack.gpu_servers[0].ping()
    banner = local_stack.describe(two_tier_stack)
    assert f"export AWS_ENDPOINT_URL_S3={state['s3_endpoint']}" in banner
    assert f"AWS_ACCESS_KEY_ID={LOCAL_CREDENTIALS['AWS_ACCESS_KEY_ID']}" in banner
    assert "s3://tierserve-models/models/" in banner and "s3://tierserve-data/" in banner


def test_local_put_serves_a_gpu_tier_model_as_the_worker_does_in_aws(two_tier_stack, tmp_path):
    """The worker calls the local SageMaker runtime (InvokeEndpoint with the model's inference
    component), which forwards to the model's GPU server process: the same answer as the API's."""
    images = np.random.default_rng(0).random((2, 3, 224, 224), dtype=np.float32)
    np.save(tmp_path / "images.npy", images)
    status, document, where = put_and_wait(
        two_tier_stack.work_dir, tmp_path / "images.npy", model="tiny-gpu", timeout_s=60
    )
    assert (status, where) == ("output", "s3://tierserve-data/outputs/tiny-gpu/images.npy.json"), document
    [output] = document["outputs"]
    encoded = encode_infer_request({"image": images}, binary=True)
    _, headers, body = http(
        "POST", f"{two_tier_stack.api.url}/v2/models/tiny-gpu/infer", encoded.body, encoded.headers
    )
    expected = decode_infer_response(body, headers)["probabilities"]
    np.testing.assert_allclose(np.reshape(output["data"], output["shape"]), expected, rtol=1e-5, atol=1e-6)


def test_the_local_sagemaker_runtime_answers_as_sagemaker_does(two_tier_stack):
    runtime = boto3.client(
        "sagemaker-runtime", endpoint_url=two_tier_stack.state["sagemaker_endpoint"], **_credentials()
    )
    call = partial(
        runtime.invoke_endpoint,
        EndpointName=local_stack.GPU_ENDPOINT,
        ContentType="application/json",
        Body=b"{not json",
    )
    with pytest.raises(ClientError) as refused:
        call(InferenceComponentName="tiny-gpu")
    error = refused.value.response
    assert error["Error"]["Code"] == "ModelError" and error["OriginalStatusCode"] == 400
    assert "not valid JSON" in json.loads(error["OriginalMessage"])["error"]  # the GPU server's words
    with pytest.raises(ClientError, match=r"ValidationError.*Inference Component small not found"):
        call(InferenceComponentName="small")  # a lambda-tier model has no component
    with pytest.raises(ClientError, match="ValidationError"):
        call()  # an endpoint that hosts components takes only calls that name one


def _credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": LOCAL_CREDENTIALS["AWS_DEFAULT_REGION"],
    }


# ---------------------------------------------------------------- your own packages


def test_user_models_come_from_package_folders_or_exactly_the_catalog(tmp_path):
    folder = tmp_path / "packages"
    mine, other = tiny_package(folder, "mine"), tiny_package(folder, "other", tier="gpu")
    assert {p.manifest.name for p in user_models([folder])} == {"mine", "other"}
    assert [p.manifest.name for p in user_models([folder / "mine" / "1"])] == ["mine"]
    catalog = tmp_path / "catalog.json"
    Catalog(()).with_entry(other.manifest).save(catalog)
    assert [p.directory for p in user_models([folder], catalog)] == [other.directory]

    tiny_package(folder, "mine", version="2")
    with pytest.raises(LocalModelsError, match=r"mine@1 .* and @2 .*: serve one"):
        user_models([folder])
    Catalog(()).with_entry(mine.manifest).with_entry(other.manifest).save(catalog)
    assert {p.manifest.version for p in user_models([folder], catalog)} == {"1"}  # the catalog picks
    tiny_package(tmp_path / "elsewhere", "other", tier="gpu")
    with pytest.raises(LocalModelsError, match=r"lists mine@1, but no package under .*elsewhere"):
        user_models([tmp_path / "elsewhere"], catalog)
    with pytest.raises(LocalModelsError, match="no package there"):
        user_models([folder / "sources"])  # models, not packages
        user_models([tmp_path / "elsewhere"])
    with pytest.raises(LocalModelsError, match="no such folder"):
        user_models([tmp_path / "absent"])
    with pytest.raises(LocalModelsError, match=r"--catalog .*: no such file"):
        user_models([folder], tmp_path / "absent.json")


def test_nothing_to_serve_is_refused_before_anything_starts(tmp_path, capsys):
    assert cli.main(["local", "--no-samples", "--work-dir", str(tmp_path / "work")]) == 1
    assert "nothing to serve: pass --models DIR" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


# ---------------------------------------------------------------- the command as users run it


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("TIERSERVE_", "AWS_"))}


class LocalCommand:
    """``tierserve local ARGS`` in ``cwd``, its output in a log."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.cwd = cwd
        self.work_dir = cwd / ".tierserve"
        self.log_path = cwd / f"local-{time.monotonic_ns()}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*TIERSERVE, "local", "--port", "0", *args],
                cwd=cwd,
                env=clean_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self) -> dict[str, Any]:
        """The state file, once written (the banner comes right after it)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        state_file = self.work_dir / STATE_FILE
        while not state_file.exists() or "Ctrl-C stops" not in self.log:
            assert self.process.poll() is None and time.monotonic() < deadline, self.log[-3000:]
            time.sleep(0.2)
        return json.loads(state_file.read_text())

    def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def tierserve(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TIERSERVE, *args], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=120
    )


def gpu_server_children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if parent == pid and b"gpu_server/serve" in cmdline:
            found.append(int(stat.parent.name))
    return found


def test_package_serve_and_call_your_own_models_as_the_readme_shows(tmp_path):
    """The README's steps: package a model (and one for the GPU tier), serve them with
    ``tierserve local --models``, call them over HTTP, through ``local put`` and with boto3
    from the banner's credentials; SIGHUP stops it all and removes the state file."""
    TINY(tmp_path / "model.onnx")
    for name, extra in (("mymodel", ()), ("mybig", ("--tier", "gpu"))):
        packaged = tierserve(tmp_path, "package", "model.onnx", "--name", name, "--version", "1", *extra)
        assert packaged.returncode == 0, packaged.stderr
    local = LocalCommand(tmp_path, "--models", ".tierserve/packages", "--no-samples")
    try:
        state = local.wait_ready()
        banner = local.log
        assert "mymodel@1  tier=lambda" in banner and "mybig@1  tier=gpu" in banner
        assert "iris" not in banner  # --no-samples
        children = gpu_server_children(local.process.pid)
        assert len(children) == 1  # mybig's

        readme = b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[0.5,1.0,1.5,2.0]}]}'
        for model in ("mymodel", "mybig"):
            assert infer(state["api_url"], model, ROWS)["probabilities"].shape == (2, 3)
            _, _, body = http("POST", f"{state['api_url']}/v2/models/{model}/infer", readme)
            assert json.loads(body)["outputs"][0]["shape"] == [1, 3]
        (tmp_path / "rows.jsonl").write_text("[0.5,1.0,1.5,2.0]\n[2.0,1.5,1.0,0.5]\n")
        for model in ("mymodel", "mybig"):
            put = tierserve(tmp_path, "local", "put", "rows.jsonl", "--model", model)
            assert put.returncode == 0, put.stderr
            assert json.loads(put.stdout)["outputs"][0]["shape"] == [2, 3]

        exported = banner.split("export ", 1)[1].splitlines()[0].split()
        env = dict(pair.split("=", 1) for pair in exported)
        client = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL_S3"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )
        models = client.list_objects_v2(Bucket="tierserve-models", Prefix="models/")["Contents"]
        assert {k["Key"].split("/")[1] for k in models} == {"mymodel", "mybig"}
        outputs = client.list_objects_v2(Bucket="tierserve-data", Prefix="outputs/")["Contents"]
        assert {k["Key"] for k in outputs} == {f"outputs/{m}/rows.jsonl.json" for m in ("mymodel", "mybig")}

        assert local.stop(signal.SIGHUP) == 0, local.log[-3000:]
        assert not (local.work_dir / STATE_FILE).exists()
        assert not any(Path(f"/proc/{pid}").exists() for pid in children)
        gone = tierserve(tmp_path, "local", "put", "rows.jsonl", "--model", "mymodel")
        assert gone.returncode == 1 and "start `tierserve local` first" in gone.stderr
    finally:
        local.kill()


def test_ctrl_c_stops_it_and_removes_the_state_file(tmp_path):
    tiny_package(tmp_path / "packages", "mine")
    local = LocalCommand(tmp_path, "--models", "packages", "--no-samples")
    try:
        local.wait_ready()
        assert local.stop(signal.SIGINT) == 0, local.log[-3000:]
        assert "tierserve local: stopping" in local.log
        assert not (local.work_dir / STATE_FILE).exists()
    finally:
        local.kill()


def test_a_killed_stack_is_refused_at_once_with_the_fix(tmp_path):
    """SIGKILL leaves the state file behind: invoke sees the process is gone, says to start it
    again and exits 1 (rather than wait on an S3 that is not there), and forgets the file."""
    tiny_package(tmp_path / "packages", "mine")
    local = LocalCommand(tmp_path, "--models", "packages", "--no-samples")
    try:
        local.wait_ready()
        second = tierserve(tmp_path, "local", "--port", "0", "--models", "packages", "--no-samples")
        assert second.returncode == 1 and "already runs for" in second.stderr
        local.kill()
        assert (local.work_dir / STATE_FILE).exists()
        event = tmp_path / "event.json"
        event.write_text(json.dumps({"httpMethod": "GET", "path": "/v2/models/mine"}))
        (tmp_path / "x.json").write_text("{}")
        invoke = tierserve(tmp_path, "local", "invoke", "event.json")
        assert invoke.returncode == 1, invoke
        assert f"(pid {local.process.pid}) is no longer running" in invoke.stderr, invoke.stderr
        assert "start `tierserve local` again" in invoke.stderr
        assert not (local.work_dir / STATE_FILE).exists()  # the dead stack's file is gone
        put = tierserve(tmp_path, "local", "put", "x.json", "--model", "mine")
        assert put.returncode == 1 and "start `tierserve local` first" in put.stderr, put
        assert "Traceback" not in invoke.stderr + put.stderr
    finally:
        local.kill()


def test_a_stack_whose_process_lives_but_does_not_answer_is_refused(tmp_path):
    silent = f"http://127.0.0.1:{free_port()}"
    write_state(tmp_path, {"pid": os.getpid(), "s3_endpoint": silent, "api_url": silent})
    with pytest.raises(
        LocalStackNotRunning, match=rf"\(pid {os.getpid()}\) does not answer: its API at {silent}"
    ):
        running_stack(tmp_path)


def test_a_failed_start_leaves_no_state_file_behind(tmp_path):
    tiny_package(tmp_path / "packages", "mine")
    tiny_package(tmp_path / "packages", "big", tier="gpu")
    work_dir = tmp_path / ".tierserve"
    work_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    (work_dir / STATE_FILE).write_text(json.dumps({"pid": dead.pid, "s3_endpoint": "http://127.0.0.1:9"}))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        failed = tierserve(tmp_path, "local", "--port", port, "--models", "packages", "--no-samples")
    assert failed.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in failed.stderr and "pick --port" in failed.stderr
    assert not (work_dir / STATE_FILE).exists()  # neither the stale one nor a new one
