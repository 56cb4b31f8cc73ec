"""Constants and helpers the suites share (fixtures live in the conftest files)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tierserve.settings import CACHE_DIR_ENV, MODEL_BUCKET_ENV, MODELS_ENV, PRELOAD_ENV
from tierserve.tools.local.apigw import LocalLambdaContext, proxy_response_body, proxy_response_headers
from tierserve.tools.local.stack import load_handler

REPO_ROOT = Path(__file__).resolve().parents[2]
BUCKET = "test-models"
EVENTS_DIR = REPO_ROOT / "events"


def count_s3_calls(client: object) -> list[str]:
    """Record every S3 API call a botocore client makes (operation names, in order)."""
    calls: list[str] = []
    client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))  # type: ignore[attr-defined]
    return calls


Invoke = Callable[[dict[str, Any]], tuple[int, dict[str, Any], bytes]]


def load_event(name: str) -> dict[str, Any]:
    """One of the shared sample events in events/ (the ones `sam local invoke` uses)."""
    return json.loads((EVENTS_DIR / f"{name}.json").read_text())


def printed_document(out: str) -> dict[str, Any]:
    """The indented JSON document a `tierserve local` command prints (powertools' metric lines
    and audit lines from the in-process worker may come first)."""
    return json.loads(out[out.index("{\n") :])


def make_handler(
    monkeypatch: pytest.MonkeyPatch, cache_dir: Path, models: str = "iris@1"
) -> Callable[[dict[str, Any], Any], dict[str, Any]]:
    """Import the API handler as Lambda's init would, with this test's environment."""
    monkeypatch.setenv(MODEL_BUCKET_ENV, BUCKET)
    monkeypatch.setenv(MODELS_ENV, models)
    monkeypatch.setenv(CACHE_DIR_ENV, str(cache_dir))
    monkeypatch.delenv(PRELOAD_ENV, raising=False)
    return load_handler({})


def make_invoke(monkeypatch: pytest.MonkeyPatch, cache_dir: Path, models: str = "iris@1") -> Invoke:
    """The API handler (:func:`make_handler`) called as Lambda calls it, its response decoded."""
    handler = make_handler(monkeypatch, cache_dir, models)

    def invoke(event: dict[str, Any]) -> tuple[int, dict[str, Any], bytes]:
        result = handler(event, LocalLambdaContext())
        result["headers"] = proxy_response_headers(result)
        return result["statusCode"], result, proxy_response_body(result)

    return invoke
