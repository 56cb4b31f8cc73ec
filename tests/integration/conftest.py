"""Integration fixtures: the real Lambda API handler, configured through its environment."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.common import Invoke, make_invoke
from support.flaky import FlakyProxy
from tierserve import aws


@pytest.fixture
def invoke(s3: object, uploaded_iris: object, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Invoke:
    return make_invoke(monkeypatch, cache_dir)


@pytest.fixture
def restore_environ() -> Iterator[None]:
    """``run.start`` configures this process as ``tierserve local`` would (S3 endpoint, the
    handler's settings): undo it for the tests that follow."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    aws.clear_clients()


@pytest.fixture
def flaky(s3: object, embedded_s3: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[FlakyProxy]:
    """A switchable proxy in front of the embedded S3 for the code under test's clients (the
    tests' own ``s3`` client still reaches S3 directly)."""
    proxy = FlakyProxy(embedded_s3.endpoint)  # type: ignore[attr-defined]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    aws.clear_clients()
    yield proxy
    proxy.stop()
