"""``tierserve local --gpu-idle-s``: a gpu-tier model that scales to zero on a developer machine.
No GPU server process runs until a request comes; that request gets 503 with ``Retry-After``
(the answer a cold model gives in AWS) while the process starts, then the model serves; idle,
the process stops again; and a file put into the local pipeline while the model is cold waits
in the queue (the worker's no-capacity handling, through the local SageMaker runtime) and is
served once the process runs, never dead-lettered."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from functools import partial

import numpy as np

from tierserve.protocol import decode_infer_response, encode_infer_request
from tierserve.tools.local import samples
from tierserve.tools.local import stack as local_stack
from tierserve.tools.local.cold_gpu import LOCAL_RETRY_AFTER_S
from tierserve.tools.local.embedded_s3 import embedded_client
from tierserve.tools.local.s3_queue import DATA_BUCKET, put_and_wait

CHOSEN = (local_stack.Sample("tiny-gpu", "1", partial(samples.convnet, channels=4, classes=5), tier="gpu"),)


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers.items()), error.read()


def until(condition, what: str, bound_s: float = 120) -> None:
    end = time.monotonic() + bound_s  # a bound for a hang, not a timing check
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} never happened")


def test_a_cold_gpu_model_answers_503_with_retry_after_then_serves_then_scales_to_zero(
    tmp_path, restore_environ
):
    stack = local_stack.start(tmp_path, port=0, chosen=CHOSEN, gpu_idle_s=1.0)
    try:
        (server,) = stack.cold_gpu_servers
        assert stack.gpu_servers == [] and not server.running  # nothing runs before a request
        assert "cold: its GPU server process starts on the first request" in local_stack.describe(stack)
        url = f"{stack.api.url}/v2/models/tiny-gpu/infer"
        encoded = encode_infer_request({"image": np.zeros((2, 3, 224, 224), np.float32)}, binary=True)
        status, headers, body = post(url, encoded.body, encoded.headers)
        assert status == 503, body
        assert {k.lower(): v for k, v in headers.items()}["retry-after"] == str(LOCAL_RETRY_AFTER_S)
        assert "tiny-gpu is starting from zero" in json.loads(body)["error"]
        answers: list[tuple[int, dict[str, str], bytes]] = []
        until(
            lambda: answers.append(post(url, encoded.body, encoded.headers)) or answers[-1][0] == 200, "a 200"
        )
        assert {a[0] for a in answers} <= {200, 503}  # starting, then serving: nothing else
        status, headers, body = answers[-1]
        assert decode_infer_response(body, headers)["probabilities"].shape == (2, 5)
        assert server.starts == 1
        until(lambda: not server.running, "the idle process stopping")  # idle: back to zero
        # Idle for longer than the worker's waits from now on, as in AWS (10 minutes against at most
        # 5): the process its refused call starts is still up when the file comes back.
        server.idle_s = 120
        # A file put while the model is cold: the worker meets no capacity, the input waits in the
        # queue while the process starts, and is served.
        image = tmp_path / "image.npy"
        np.save(image, np.zeros((1, 3, 224, 224), np.float32))
        status_, document, key = put_and_wait(tmp_path, image, model="tiny-gpu", timeout_s=120)
        assert (status_, key) == ("output", f"s3://{DATA_BUCKET}/outputs/tiny-gpu/image.npy.json"), document
        assert server.starts == 2
        sqs = embedded_client(stack.state["s3_endpoint"], "sqs")
        dlq = sqs.get_queue_url(QueueName="tierserve-inputs-dlq")["QueueUrl"]
        depth = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["ApproximateNumberOfMessages"])
        assert depth["Attributes"]["ApproximateNumberOfMessages"] == "0"
    finally:
        stack.stop()
    assert not server.running
