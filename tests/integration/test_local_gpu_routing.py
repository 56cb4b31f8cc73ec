"""``tierserve local`` with a model on each tier: the gpu-tier model is served by a GPU server
process (CPU provider) that the local API forwards to; the lambda-tier model by the handler."""

from __future__ import annotations

import json
import urllib.request
from functools import partial

import numpy as np

from tierserve.local import run, samples
from tierserve.protocol import decode_infer_response, encode_infer_request


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, dict(response.headers.items()), response.read()


def test_the_local_api_forwards_a_gpu_tier_model_to_its_server_process(tmp_path, restore_environ):
    chosen = (
        run.Sample("small", "1", partial(samples.mlp, features=4, hidden=8, layers=2, classes=3)),
        run.Sample("tiny-gpu", "1", partial(samples.convnet, channels=4, classes=5), tier="gpu"),
    )
    stack = run.start(tmp_path, port=0, chosen=chosen)
    try:
        assert [str(s.ref) for s in stack.gpu_servers] == ["tiny-gpu@1"]
        assert stack.api.upstreams == {"tiny-gpu": stack.gpu_servers[0].url}
        url = stack.api.url
        gpu_metadata = json.loads(http("GET", f"{url}/v2/models/tiny-gpu")[2])
        assert gpu_metadata["parameters"]["execution_providers"] == ["CPUExecutionProvider"]
        assert "dynamic_batching" in gpu_metadata["parameters"]  # answered by the GPU server
        encoded = encode_infer_request({"image": np.zeros((2, 3, 224, 224), np.float32)}, binary=True)
        status, headers, body = http("POST", f"{url}/v2/models/tiny-gpu/infer", encoded.body, encoded.headers)
        assert status == 200
        assert decode_infer_response(body, headers)["probabilities"].shape == (2, 5)
        small_metadata = json.loads(http("GET", f"{url}/v2/models/small")[2])
        assert "dynamic_batching" not in small_metadata["parameters"]  # the Lambda handler's answer
        assert "forwarded to its GPU server process" in run.describe(stack)
        process = stack.gpu_servers[0].process
    finally:
        stack.stop()
    assert process.returncode == 0  # SIGTERM, drained, exited cleanly
