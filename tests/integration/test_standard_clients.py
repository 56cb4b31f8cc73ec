"""The standard Open Inference Protocol clients, unchanged, against the local API on both
tiers: tritonclient's HTTP clients (sync on geventhttpclient, asyncio on aiohttp) and KServe's
``InferenceRESTClient`` (asyncio, httpx). Lambda-tier samples (iris, an MLP) go through the
real handler as API Gateway proxy events; the GPU-tier sample through its GPU server process.

Each client sends its own headers (tritonclient's sync client no Content-Type and no Accept;
the others ``Accept: */*``): the tests prove what the README says, that they work by default,
JSON and binary, with compressed requests, and that a 4xx reads back as the client's own error.
One local stack serves the whole module.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput
from tritonclient.utils import InferenceServerException

from tierserve import aws
from tierserve.tools.local import apigw, samples
from tierserve.tools.local import stack as local_stack

CHOSEN = (
    local_stack.Sample("iris", "1", samples.iris_classifier),
    local_stack.Sample("mlp", "1", partial(samples.mlp, features=16, hidden=32, layers=2, classes=5)),
    local_stack.Sample("convnet-xl", "1", partial(samples.convnet, channels=4, classes=5), tier="gpu"),
)
GPU_MODEL = "convnet-xl"
rng = np.random.default_rng(7)
INPUTS = {  # values whose bytes are not UTF-8: mangled as text, they would change
    "iris": {"input": samples.iris_rows()[[0, 60, 120]]},
    "mlp": {"input": rng.normal(size=(4, 16)).astype(np.float32)},
    GPU_MODEL: {"image": rng.normal(size=(2, 3, 224, 224)).astype(np.float32)},
}
OUTPUTS = {"iris": ("label", "probabilities"), "mlp": ("probabilities",), GPU_MODEL: ("probabilities",)}


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clients")


@pytest.fixture(scope="module")
def stack(work_dir: Path) -> Iterator[local_stack.LocalStack]:
    saved = dict(os.environ)  # the stack configures this process as `tierserve local` would
    running = local_stack.start(work_dir, port=0, chosen=CHOSEN)
    try:
        assert set(running.api.upstreams) == {GPU_MODEL}  # the GPU tier really is a separate server
        yield running
    finally:
        running.stop()
        os.environ.clear()
        os.environ.update(saved)
        aws.clear_clients()


@pytest.fixture(scope="module")
def url(stack: local_stack.LocalStack) -> str:
    return stack.api.url


@pytest.fixture(scope="module")
def expected(stack: local_stack.LocalStack, work_dir: Path) -> dict:
    """What onnxruntime answers for each sample's source model (the one the stack packaged)."""
    answers = {}
    for sample in CHOSEN:
        source = work_dir / "samples" / f"{sample.name}.onnx"
        session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        answers[sample.name] = dict(zip(names, session.run(None, INPUTS[sample.name]), strict=True))
    return answers


def assert_outputs(model: str, outputs: dict[str, np.ndarray], expected: dict) -> None:
    for name in OUTPUTS[model]:
        want = expected[model][name]
        assert outputs[name].shape == want.shape, name
        np.testing.assert_allclose(outputs[name], want, rtol=1e-4, atol=1e-6, err_msg=f"{model}.{name}")


# ---------------------------------------------------------------- tritonclient, sync


def triton_inputs(module, model: str, *, binary: bool) -> list:
    inputs = []
    for name, array in INPUTS[model].items():
        item = module.InferInput(name, list(array.shape), "FP32")
        item.set_data_from_numpy(array, binary_data=binary)
        inputs.append(item)
    return inputs


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[triton.InferenceServerClient]:
    connection = triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)
    yield connection
    connection.close()


def test_tritonclient_reads_server_and_model_metadata_and_readiness(client):
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "tierserve" and "binary_tensor_data" in metadata["extensions"]
    for model in INPUTS:
        assert client.is_model_ready(model)
        described = client.get_model_metadata(model)
        assert described["name"] == model
        assert [i["name"] for i in described["inputs"]] == list(INPUTS[model])
        assert [o["name"] for o in described["outputs"]] == list(OUTPUTS[model])


@pytest.mark.parametrize("model", list(INPUTS))
def test_tritonclient_infers_every_sample_binary_and_json(client, expected, model):
    raw = b"".join(a.tobytes() for a in INPUTS[model].values())
    with pytest.raises(UnicodeDecodeError):
        raw.decode()  # as text on the way, these tensors would have been changed
    results = {}
    for binary in (True, False):  # binary is tritonclient's default, sent without a Content-Type
        wanted = [triton.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS[model]]
        result = client.infer(model, triton_inputs(triton, model, binary=binary), outputs=wanted)
        results[binary] = {name: result.as_numpy(name) for name in OUTPUTS[model]}
        assert_outputs(model, results[binary], expected)
        parameters = [o.get("parameters", {}) for o in result.get_response()["outputs"]]
        assert all(("binary_data_size" in p) is binary for p in parameters)
    for name in OUTPUTS[model]:
        np.testing.assert_array_equal(results[True][name], results[False][name])


def test_tritonclient_outputs_filter(client, expected):
    wanted = [triton.InferRequestedOutput("probabilities", binary_data=True)]
    result = client.infer("iris", triton_inputs(triton, "iris", binary=True), outputs=wanted)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["probabilities"]
    assert result.as_numpy("label") is None
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected["iris"]["probabilities"], rtol=1e-4)


@pytest.mark.parametrize("model", ["iris", GPU_MODEL])
@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compressed_requests(client, expected, model, algorithm):
    result = client.infer(
        model,
        triton_inputs(triton, model, binary=True),
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,  # asked for; the answer comes uncompressed, and is read
    )
    assert_outputs(model, {name: result.as_numpy(name) for name in OUTPUTS[model]}, expected)


@pytest.mark.parametrize("model", ["iris", GPU_MODEL])
def test_tritonclient_reads_a_4xx_as_its_own_error(client, model):
    bad = triton.InferInput(next(iter(INPUTS[model])), [1, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(InferenceServerException) as raised:
        client.infer(model, [bad])
    assert raised.value.status() == "400"
    assert "shape [1, 3]" in raised.value.message()
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata("no-such-model")
    assert raised.value.status() == "404" and "no-such-model" in raised.value.message()


# ---------------------------------------------------------------- tritonclient, asyncio


def test_tritonclient_asyncio(url, expected):
    async def session() -> None:
        connection = triton_aio.InferenceServerClient(url.removeprefix("http://"))
        try:
            assert await connection.is_server_live() and await connection.is_server_ready()
            assert (await connection.get_server_metadata())["name"] == "tierserve"
            for model in INPUTS:
                assert await connection.is_model_ready(model)
                assert (await connection.get_model_metadata(model))["name"] == model
                for binary in (True, False):
                    wanted = [triton_aio.InferRequestedOutput(n, binary_data=binary) for n in OUTPUTS[model]]
                    result = await connection.infer(
                        model, triton_inputs(triton_aio, model, binary=binary), outputs=wanted
                    )
                    assert_outputs(model, {n: result.as_numpy(n) for n in OUTPUTS[model]}, expected)
            result = await connection.infer(
                GPU_MODEL,
                triton_inputs(triton_aio, GPU_MODEL, binary=True),
                request_compression_algorithm="gzip",
            )
            assert_outputs(GPU_MODEL, {"probabilities": result.as_numpy("probabilities")}, expected)
            only = [triton_aio.InferRequestedOutput("label", binary_data=True)]
            result = await connection.infer(
                "iris", triton_inputs(triton_aio, "iris", binary=False), outputs=only
            )
            assert [o["name"] for o in result.get_response()["outputs"]] == ["label"]
            with pytest.raises(InferenceServerException) as raised:
                await connection.infer("iris", triton_inputs(triton_aio, "mlp", binary=True))
            assert raised.value.status() == "400" and "shape" in raised.value.message()
        finally:
            await connection.close()

    asyncio.run(session())


# ---------------------------------------------------------------- KServe's REST client


def kserve_request(model: str, *, binary: bool, binary_outputs: bool) -> InferRequest:
    inputs = []
    for name, array in INPUTS[model].items():
        item = InferInput(name, list(array.shape), "FP32")
        item.set_data_from_numpy(array, binary_data=binary)
        inputs.append(item)
    outputs = [RequestedOutput(name, parameters={"binary_data": binary_outputs}) for name in OUTPUTS[model]]
    return InferRequest(model, inputs, request_id=f"{model}-{binary}", request_outputs=outputs)


def test_kserve_rest_client(url, expected):
    async def session() -> None:
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120))
        try:
            assert await client.is_server_live(url) and await client.is_server_ready(url)
            for model in INPUTS:
                assert await client.is_model_ready(url, model)
                for binary, binary_outputs in ((True, True), (False, False), (False, True)):
                    request = kserve_request(model, binary=binary, binary_outputs=binary_outputs)
                    response = await client.infer(url, request, model_name=model)
                    assert response.id == f"{model}-{binary}"
                    outputs = {o.name: o.as_numpy() for o in response.outputs}
                    assert_outputs(model, outputs, expected)
            bad = InferRequest("iris", [InferInput("input", [1, 3], "FP32", data=[1.0, 2.0, 3.0])])
            with pytest.raises(httpx.HTTPStatusError) as raised:
                await client.infer(url, bad, model_name="iris")
            assert raised.value.response.status_code == 400 and "shape [1, 3]" in str(raised.value)
            with pytest.raises(httpx.HTTPStatusError) as raised:
                await client.infer(
                    url, kserve_request(GPU_MODEL, binary=True, binary_outputs=True), model_name="nope"
                )
            assert raised.value.response.status_code == 404
        finally:
            await client.close()

    asyncio.run(session())


# ---------------------------------------------------------------- the rule, locally as deployed


def http(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers.items()), error.read()


def test_with_a_narrower_binary_setting_the_local_api_fails_as_the_deployed_one_would(
    client, url, monkeypatch
):
    """The local API reads the setting the CDK app deploys: narrowed to what it used to be, the
    sync client's binary request (no Content-Type) reaches the handler as text and is refused,
    and a binary answer to a request without Accept comes back as base64 text, as API Gateway
    would send them."""
    monkeypatch.setattr(apigw, "BINARY_MEDIA_TYPES", ("application/octet-stream",))
    with pytest.raises(InferenceServerException) as raised:
        client.infer("iris", triton_inputs(triton, "iris", binary=True))
    assert raised.value.status() == "400" and "binaryMediaTypes" in raised.value.message()
    request = {
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}],
        "parameters": {"binary_data_output": True},
    }
    status, headers, body = http(f"{url}/v2/models/iris/infer", json.dumps(request).encode())
    assert status == 200
    answer = base64.b64decode(body, validate=True)  # the body is the base64 text of the answer
    length = int(headers["inference-header-content-length"])
    assert json.loads(answer[:length])["model_name"] == "iris" and len(answer) > length
    monkeypatch.undo()
    status, headers, body = http(f"{url}/v2/models/iris/infer", json.dumps(request).encode())
    assert status == 200 and body.startswith(b'{"model_name":"iris"')  # bytes again, under */*


@pytest.mark.parametrize("model", ["iris", GPU_MODEL])
def test_the_local_api_refuses_other_encodings_and_bombs_on_both_tiers(url, model):
    name, array = next(iter(INPUTS[model].items()))
    document = {
        "inputs": [
            {"name": name, "shape": list(array.shape), "datatype": "FP32", "data": array.ravel().tolist()}
        ]
    }
    plain = json.dumps(document).encode()
    status, _, body = http(f"{url}/v2/models/{model}/infer", plain, {"Content-Encoding": "br"})
    assert status == 415 and "accepted: gzip, deflate, identity" in json.loads(body)["error"]
    bomb = gzip.compress(plain + b" " * (8 << 20))
    status, _, body = http(f"{url}/v2/models/{model}/infer", bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "TIERSERVE_MAX_REQUEST_MB" in json.loads(body)["error"]


def test_the_readme_client_examples_run_as_written(url, capsys):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Clients", 1)[1].split("\n## ", 1)[0]
    examples = [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]
    assert len(examples) == 2
    for example in examples:
        exec(compile(example.replace("127.0.0.1:3000", url.removeprefix("http://")), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.count("[[") >= 2 and "'probabilities'" in printed
