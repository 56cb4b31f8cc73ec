"""SnapStart, simulated as Lambda's Python runtime runs it (awslambdaric's own hooks runner):
the API handler's init preloads the model and registers its hooks; the before-snapshot hooks
leave no connection open; the snapshot loses every socket; the after-restore hooks give the
environment new clients, new random state and its own telemetry, and count the restore. The
handler then serves infer with zero S3 calls (S3 is down by then: any call would fail)."""

from __future__ import annotations

import gc
import json
import logging
import random
import socket

import pytest
import snapshot_restore_py
from awslambdaric import lambda_runtime_hooks_runner

from support.common import BUCKET, load_event
from support.flaky import FlakyProxy
from tierserve import aws, telemetry
from tierserve.tools.local.apigw import LocalLambdaContext, proxy_response_body
from tierserve.tools.local.stack import load_handler


def open_sockets_to(port: int) -> list[socket.socket]:
    """Every socket of this process connected to 127.0.0.1:``port`` (a client's pool, say)."""
    found = []
    for thing in gc.get_objects():
        if isinstance(thing, socket.socket) and thing.fileno() >= 0:
            try:
                if thing.getpeername()[1] == port:
                    found.append(thing)
            except OSError:
                continue
    return found


@pytest.fixture
def proxy(embedded_s3, s3, uploaded_iris, monkeypatch):
    front = FlakyProxy(embedded_s3.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", front.endpoint)
    aws.clear_clients()
    yield front
    front.stop()


@pytest.fixture
def hooks():
    """snapshot_restore_py's registries as a fresh runtime has them (other tests import the
    handler too; the runner pops what it runs)."""
    snapshot_restore_py._before_snapshot_registry.clear()
    snapshot_restore_py._after_restore_registry.clear()
    yield
    snapshot_restore_py._before_snapshot_registry.clear()
    snapshot_restore_py._after_restore_registry.clear()


def test_a_restored_environment_serves_infer_with_zero_s3_calls_and_new_clients(
    proxy, hooks, cache_dir, monkeypatch, caplog
):
    monkeypatch.setenv("TIERSERVE_MODEL_BUCKET", BUCKET)
    monkeypatch.setenv("TIERSERVE_MODELS", "iris@1")
    monkeypatch.setenv("TIERSERVE_PRELOAD", "iris")
    monkeypatch.setenv("TIERSERVE_CACHE_DIR", str(cache_dir))
    handler = load_handler({})  # the init: settings, the preload through S3, the hooks
    assert proxy.requests >= 2  # manifest and artifact
    init_clients = list(aws._clients.values())
    assert init_clients and open_sockets_to(proxy.port), "the preload left a pooled connection"
    port = proxy.port

    lambda_runtime_hooks_runner.run_before_snapshot()
    assert open_sockets_to(port) == [], "a connection would be in the snapshot"
    assert aws._clients == {}

    # The snapshot: whatever socket remains dies, and S3 is unreachable from here on.
    for leftover in open_sockets_to(port):
        leftover.close()
    proxy.down = True
    requests_at_snapshot = proxy.requests
    seeded = random.getstate()

    with caplog.at_level(logging.INFO, logger="tierserve"):
        lambda_runtime_hooks_runner.run_after_restore()
    # Counted about the function's model, so the dashboard's per-model row shows it.
    assert telemetry.SNAPSTART_RESTORE in telemetry._model_sets[("iris", "1")].metric_set
    assert any("restored from a SnapStart snapshot" in r.getMessage() for r in caplog.records)

    response = handler(load_event("infer-json"), LocalLambdaContext())
    assert response["statusCode"] == 200, proxy_response_body(response)
    assert json.loads(proxy_response_body(response))["outputs"]
    assert proxy.requests == requests_at_snapshot, "the warm session needs no S3 call"

    proxy.down = False
    client = aws.s3_client()
    assert all(client is not old for old in init_clients)  # a new client, a new pool
    client.head_bucket(Bucket=BUCKET)
    assert proxy.requests == requests_at_snapshot + 1

    # Two environments restored from one snapshot draw different numbers.
    draws = []
    for _ in range(2):
        random.setstate(seeded)
        lambda_runtime_hooks_runner.run_after_restore()
        draws.append(random.random())
    assert draws[0] != draws[1]


def test_the_hooks_are_registered_once_however_often_the_handler_is_imported(
    s3, uploaded_iris, hooks, cache_dir, monkeypatch
):
    monkeypatch.setenv("TIERSERVE_MODEL_BUCKET", BUCKET)
    monkeypatch.setenv("TIERSERVE_MODELS", "iris@1")
    monkeypatch.setenv("TIERSERVE_CACHE_DIR", str(cache_dir))
    monkeypatch.delenv("TIERSERVE_PRELOAD", raising=False)
    load_handler({})
    load_handler({})
    assert len(snapshot_restore_py.get_before_snapshot()) == 1
    assert len(snapshot_restore_py.get_after_restore()) == 1
