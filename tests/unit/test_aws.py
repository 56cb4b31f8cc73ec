"""tierserve.aws: one client per service and policy, deadlines that bound every attempt, and
one reading of botocore's errors. Calls go to a stalled loopback server, never to AWS."""

from __future__ import annotations

import threading

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from support.flaky import FlakyProxy
from tierserve import aws
from tierserve.aws import Deadline, OutOfTime, bounded_text, classify, http_status
from tierserve.tools.local.apigw import LocalLambdaContext

CREDENTIALS = {"aws_access_key_id": "x", "aws_secret_access_key": "x", "region_name": "us-east-1"}


def client_error(code: str | None, status: int | None, message: object = "msg") -> ClientError:
    error = {} if code is None else {"Code": code, "Message": message}
    metadata = {} if status is None else {"HTTPStatusCode": status}
    return ClientError({"Error": error, "ResponseMetadata": metadata}, "Operation")


class S3UploadFailedError(Exception):
    """What boto3's upload_file raises: the ClientError's text, the ClientError as context."""


def upload_failed(code: str) -> Exception:
    try:
        raise client_error(code, 404)
    except ClientError as error:
        try:
            raise S3UploadFailedError(f"Failed to upload x to b/k: {error}")
        except S3UploadFailedError as wrapped:
            return wrapped


def text_only(code: str) -> Exception:
    return S3UploadFailedError(f"Failed to upload x to b/k: An error occurred ({code}) when calling ...")


# ---------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("error", "kind", "code"),
    [
        (client_error("NoSuchKey", 404), "gone", "NoSuchKey"),
        (client_error("NoSuchVersion", 404), "gone", "NoSuchVersion"),
        (client_error("NoSuchBucket", 404), "gone", "NoSuchBucket"),
        (client_error(None, 404), "gone", "404"),  # HEAD answers have no body
        (client_error("PreconditionFailed", 412), "changed", "PreconditionFailed"),
        (client_error("ConditionalRequestConflict", 409), "raced", "ConditionalRequestConflict"),
        (client_error("AccessDenied", 403), "denied", "AccessDenied"),
        (client_error("ExpiredToken", 400), "denied", "ExpiredToken"),
        (client_error(None, 403), "denied", "403"),
        (NoCredentialsError(), "denied", "NoCredentialsError"),
        (client_error("SlowDown", 503), "throttled", "SlowDown"),
        (client_error("ThrottlingException", 400), "throttled", "ThrottlingException"),
        (client_error(None, 429), "throttled", "429"),
        (client_error("ModelNotReadyException", 429), "unavailable", "ModelNotReadyException"),
        (client_error("InternalError", 500), "unavailable", "InternalError"),
        (client_error(None, 502), "unavailable", "502"),
        (EndpointConnectionError(endpoint_url="http://x"), "unavailable", "EndpointConnectionError"),
        (ResponseStreamingError(error="reset"), "unavailable", "ResponseStreamingError"),
        (ReadTimeoutError(endpoint_url="http://x"), "timeout", "ReadTimeoutError"),
        (ConnectTimeoutError(endpoint_url="http://x"), "timeout", "ConnectTimeoutError"),
        (client_error("RequestTimeout", 400), "timeout", "RequestTimeout"),
        (OutOfTime("no time left"), "timeout", "OutOfTime"),
        (client_error("ValidationError", 400), "refused", "ValidationError"),
        (client_error("ModelError", 424), "refused", "ModelError"),
        (upload_failed("NoSuchBucket"), "gone", "NoSuchBucket"),
        (text_only("AccessDenied"), "denied", "AccessDenied"),
        (RecursionError("deep"), "unreadable", "RecursionError"),
        (ValueError("no botocore error at all"), "unreadable", "ValueError"),
    ],
)
def test_every_failure_has_one_kind(error, kind, code):
    failure = classify(error)
    assert (failure.kind, failure.code) == (kind, code)
    assert failure.retryable is (kind in {"throttled", "unavailable", "timeout", "unreadable"})


def test_a_missing_bucket_is_told_apart_from_a_missing_object():
    assert classify(client_error("NoSuchBucket", 404)).bucket_missing
    assert not classify(client_error("NoSuchKey", 404)).bucket_missing


@pytest.mark.parametrize(
    "response",
    [
        {"Error": "not a dict", "ResponseMetadata": []},
        {"Error": {"Code": 7, "Message": {"deep": []}}, "ResponseMetadata": {"HTTPStatusCode": 1e400}},
        {"Error": {"Code": "X" * 10_000, "Message": "y" * 10_000}},
        {},
    ],
    ids=["wrong-types", "numbers", "huge", "empty"],
)
def test_a_hostile_response_is_classified_without_raising(response):
    error = client_error("Placeholder", 400)
    error.response = response  # what a hostile answer could make botocore hand us
    failure = classify(error)
    assert failure.kind == "refused" and len(failure.code) <= 100 and len(failure.message) <= 500


def test_messages_are_one_bounded_printable_line():
    assert bounded_text("a\nb\r\n\tc\x00d") == "a b c d"
    assert bounded_text("\ud800 lone") == "\\ud800 lone"
    assert bounded_text(b"\xff\xfe bytes") == "\ufffd\ufffd bytes"
    long = bounded_text("z" * 10_000)
    assert len(long) == 500 and long.endswith("…")
    assert bounded_text(None) == "" and bounded_text({"error": "x"}) == ""


@pytest.mark.parametrize(
    ("value", "status"),
    [(404, 404), ("503", 503), (" 424 ", 424), (True, 0), (1e400, 0), (10**30, 0), ("4O4", 0), (None, 0)],
)
def test_http_status_from_untrusted_values(value, status):
    assert http_status(value) == status


# ---------------------------------------------------------------- clients


def test_one_client_per_service_made_on_first_use_with_its_policy(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3 = aws.s3_client()
    assert aws.s3_client() is s3 and aws.client("s3") is s3
    runtime = aws.sagemaker_runtime_client()
    assert runtime is not s3 and runtime.meta.service_model.service_name == "sagemaker-runtime"
    for client, policy in ((s3, aws.POLICIES["s3"]), (runtime, aws.POLICIES["sagemaker-runtime"])):
        assert client.meta.config.read_timeout == policy.read_timeout_s
        assert client.meta.config.connect_timeout == policy.connect_timeout_s
        assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": policy.attempts}
    assert aws.new_client("s3") is not s3
    aws.clear_clients()
    assert aws.s3_client() is not s3


# ---------------------------------------------------------------- deadlines


def test_a_lambda_invocations_deadline_keeps_a_margin():
    deadline = Deadline.for_invocation(LocalLambdaContext(timeout_ms=120_000), margin_s=5)
    assert 114 < deadline.remaining() <= 115
    assert deadline.hard_at - deadline.at == pytest.approx(2.5)
    short = Deadline.for_invocation(LocalLambdaContext(timeout_ms=3_000), margin_s=5)
    assert 2.3 < short.remaining() <= 2.4  # a fifth of a short invocation, not 5 s


def test_a_deadline_picks_the_longest_read_timeout_that_still_fits(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with aws.within(Deadline.after(30)):
        assert aws.s3_client().meta.config.read_timeout == 10
        runtime = aws.sagemaker_runtime_client()
        assert (runtime.meta.config.connect_timeout, runtime.meta.config.read_timeout) == (3, 16)
        assert aws.sagemaker_runtime_client() is runtime  # one client per rung, not per call
    with aws.within(Deadline.after(3)):
        assert aws.sagemaker_runtime_client().meta.config.read_timeout == 1
    with aws.within(Deadline.after(0.5)), pytest.raises(OutOfTime, match="no time left"):
        aws.s3_client()
    assert aws.sagemaker_runtime_client().meta.config.read_timeout == 65  # no deadline, the policy


def test_the_deadline_belongs_to_its_thread_and_its_block():
    seen: list[Deadline | None] = []
    deadline = Deadline.after(0)
    with aws.within(deadline):
        assert aws.current_deadline() is deadline
        thread = threading.Thread(target=lambda: seen.append(aws.current_deadline()))
        thread.start()
        thread.join()
        with pytest.raises(OutOfTime, match="no time left in this invocation for the next rows"):
            aws.check_deadline("the next rows")
    assert seen == [None] and aws.current_deadline() is None
    aws.check_deadline("anything")  # no deadline: nothing to refuse


def test_an_attempt_that_would_outlast_the_deadline_is_not_started():
    """A stalled S3: botocore would retry a read timeout twice more (three attempts of 10 s);
    under a 2.5 s deadline the client reads for 1 s and refuses the retry that cannot fit."""
    hung = FlakyProxy("http://127.0.0.1:9")
    hung.stalled = True
    deadline = Deadline.after(2.5)
    try:
        with aws.within(deadline):
            client = aws.client("s3", endpoint_url=hung.endpoint, **CREDENTIALS)
            assert client.meta.config.read_timeout == 1
            with pytest.raises(OutOfTime):
                client.head_object(Bucket="bucket", Key="key")
    finally:
        hung.stop()
    assert hung.requests == 1
    assert deadline.remaining() > 0


@pytest.mark.parametrize(
    ("initialization_type", "seconds"),
    [("on-demand", 10.0), ("snap-start", 130.0), ("provisioned-concurrency", 130.0)],
)
def test_the_init_deadline_is_lambdas_init_limit_less_a_margin(initialization_type, seconds):
    deadline = Deadline.for_init(initialization_type)
    assert deadline is not None
    assert seconds - aws.INIT_MARGIN_S - 1 < deadline.remaining() <= seconds - aws.INIT_MARGIN_S


def test_outside_lambda_an_init_has_no_deadline():
    assert Deadline.for_init(None) is None
    assert Deadline.for_init("a-kind-of-start-not-known-yet") is None
