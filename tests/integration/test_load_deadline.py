"""A cold load has a deadline (issue 15.5): an S3 that stalls before its headers, or trickles
the artifact's bytes, makes the API handler answer a 504 that says S3 was too slow, before
the invocation would end, and leaves no partial file in the cache. Real HTTP on loopback:
moto's S3 behind a proxy that stalls or trickles (tests/support/flaky.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.common import BUCKET, load_event
from support.flaky import FlakyProxy
from tierserve import aws
from tierserve.registry import ModelRegistry
from tierserve.settings import ModelRef, Settings
from tierserve.tools.local.apigw import LocalLambdaContext, proxy_response_body
from tierserve.tools.local.stack import load_handler

INVOCATION_MS = 4000  # the function's remaining time when the request arrives
ARTIFACT_PATH = "/models/iris/1/model-"  # the artifact's key, not the manifest's


@pytest.fixture
def slow_s3(embedded_s3, s3, uploaded_iris, monkeypatch) -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(embedded_s3.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    aws.clear_clients()
    yield proxy
    proxy.stop()


@pytest.fixture
def handler(slow_s3, cache_dir, monkeypatch):
    monkeypatch.setenv("TIERSERVE_MODEL_BUCKET", BUCKET)
    monkeypatch.setenv("TIERSERVE_MODELS", "iris@1")
    monkeypatch.setenv("TIERSERVE_CACHE_DIR", str(cache_dir))
    monkeypatch.delenv("TIERSERVE_PRELOAD", raising=False)
    return load_handler({})


def invoke(handler, timeout_ms: int = INVOCATION_MS) -> tuple[int, dict, float]:
    start = time.monotonic()
    response = handler(load_event("infer-json"), LocalLambdaContext(timeout_ms=timeout_ms))
    return response["statusCode"], json.loads(proxy_response_body(response)), time.monotonic() - start


def cache_files(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


@pytest.mark.parametrize("slow_paths", [ARTIFACT_PATH, None], ids=["artifact", "manifest-too"])
def test_an_s3_that_stalls_before_its_headers_is_a_504_in_time(handler, slow_s3, cache_dir, slow_paths):
    slow_s3.stalled, slow_s3.slow_paths = True, slow_paths
    status, body, elapsed = invoke(handler)
    assert status == 504, body
    assert body["error"].startswith("S3 was too slow: s3://test-models/models/iris/1/")
    assert "retry: a retry resumes the model's warm-up" in body["error"]
    assert elapsed < INVOCATION_MS / 1000  # answered before the invocation would have ended
    assert cache_files(cache_dir) == []  # no partial file, no model

    slow_s3.stalled = False
    status, body, _ = invoke(handler, timeout_ms=29_000)
    assert status == 200, body


def test_an_s3_that_trickles_the_artifact_is_a_504_in_time_and_leaves_no_partial_file(
    handler, slow_s3, cache_dir
):
    # 40 bytes a second: every read gets bytes long before any socket timeout, and the 422
    # bytes of the artifact would take over 10 s, more than the invocation has.
    slow_s3.trickle_bytes_per_s, slow_s3.slow_paths = 40, ARTIFACT_PATH
    status, body, elapsed = invoke(handler)
    assert status == 504, body
    assert body["error"].startswith("S3 was too slow: s3://test-models/models/iris/1/model-")
    assert elapsed < INVOCATION_MS / 1000
    assert not [name for name in cache_files(cache_dir) if name.endswith(".partial")]
    assert cache_files(cache_dir) == []

    slow_s3.trickle_bytes_per_s = None
    status, body, _ = invoke(handler, timeout_ms=29_000)
    assert status == 200, body


def test_a_preload_is_bounded_by_the_init_phase(slow_s3, cache_dir, monkeypatch):
    """In Lambda, the init phase has its own limit: a preload against a stalled S3 gives up
    (logged), init goes on, and the first request loads the model."""
    monkeypatch.setitem(aws.INIT_SECONDS, "on-demand", aws.INIT_MARGIN_S + 2.0)
    settings = Settings(
        model_bucket=BUCKET,
        models=(ModelRef("iris", "1"),),
        preload=("iris",),
        cache_dir=cache_dir,
        initialization_type="on-demand",
    )
    registry = ModelRegistry(settings)
    slow_s3.stalled, slow_s3.slow_paths = True, ARTIFACT_PATH
    start = time.monotonic()
    registry.preload()
    assert time.monotonic() - start < aws.INIT_SECONDS["on-demand"]
    assert registry.loaded(ModelRef("iris", "1")) is None
    assert cache_files(cache_dir) == []

    slow_s3.stalled = False
    assert registry.get(ModelRef("iris", "1")).ready()
