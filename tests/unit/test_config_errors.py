"""Settings from the environment, and the one error table."""

from __future__ import annotations

import pytest

from tierserve.errors import (
    INTERNAL_ERROR_MESSAGE,
    ArtifactRejected,
    BadRequest,
    ModelNotFound,
    PayloadTooLarge,
    UpstreamTimeout,
    UpstreamUnavailable,
    is_retryable,
    to_http,
)
from tierserve.settings import ModelRef, Settings, threads_for_memory


@pytest.mark.parametrize(("memory", "threads"), [(128, 1), (1769, 1), (3538, 2), (10240, 5)])
def test_threads_follow_lambda_memory_not_host_cores(memory, threads):
    assert threads_for_memory(memory) == threads
    assert Settings.from_env({"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory)}).threads == threads


def test_settings_from_env_and_overrides():
    settings = Settings.from_env(
        {
            "TIERSERVE_MODEL_BUCKET": "bucket",
            "TIERSERVE_MODELS": "iris@1, mlp@2",
            "TIERSERVE_PRELOAD": "iris",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "3008",
            "TIERSERVE_MAX_REQUEST_MB": "0.5",
        },
        threads=4,
    )
    assert settings.models == (ModelRef("iris", "1"), ModelRef("mlp", "2"))
    assert settings.should_preload("iris") and not settings.should_preload("mlp")
    assert settings.memory_budget_mb == 3008 - 384
    assert settings.threads == 4  # an explicit argument wins over the environment
    assert settings.max_request_bytes == 512 * 1024


@pytest.mark.parametrize("text", ["iris", "@1", "iris@"])
def test_model_refs_need_a_version(text):
    with pytest.raises(ValueError, match="name@version"):
        ModelRef.parse(text)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (BadRequest("x"), 400),
        (ModelNotFound("x"), 404),
        (PayloadTooLarge("x"), 413),
        (ArtifactRejected("x"), 503),
        (UpstreamUnavailable("x"), 503),
        (UpstreamTimeout("x"), 504),
    ],
)
def test_typed_errors_map_to_their_status(error, status):
    assert to_http(error) == (status, {"error": "x"})


def test_unexpected_errors_leak_nothing():
    status, body = to_http(KeyError("/secret/path/in/the/image"))
    assert status == 500 and body == {"error": INTERNAL_ERROR_MESSAGE}


def test_only_transient_faults_are_retryable():
    assert is_retryable(UpstreamUnavailable("x")) and is_retryable(UpstreamTimeout("x"))
    assert not is_retryable(ArtifactRejected("x")) and not is_retryable(BadRequest("x"))
