"""The jobs handler as Lambda runs it, on the shared sample events (``events/job-*.json``, what
``sam local invoke`` and ``tierserve local invoke`` take): the job's URL as its caller reaches it
behind API Gateway (the stage in ``requestContext.path``), the upload, the caller's scope."""

from __future__ import annotations

import base64
import copy
import json

import pytest

from tests.support.common import BUCKET, load_event
from tierserve.tools.local.apigw import LocalLambdaContext, proxy_response_body, proxy_response_headers
from tierserve.tools.local.stack import load_handler


@pytest.fixture
def jobs(s3, monkeypatch):
    monkeypatch.setenv("TIERSERVE_MODELS", "iris@1")
    monkeypatch.setenv("TIERSERVE_DATA_BUCKET", BUCKET)
    handler = load_handler({}, module="jobs")

    def invoke(event):
        result = handler(event, LocalLambdaContext())
        headers = {k.lower(): v for k, v in proxy_response_headers(result).items()}
        return result["statusCode"], headers, json.loads(proxy_response_body(result))

    return invoke


def test_the_sample_create_event_answers_202_with_the_stage_in_the_jobs_url(jobs, s3):
    status, headers, job = jobs(load_event("job-create"))
    assert status == 202, job
    url = f"https://abc123defg.execute-api.us-east-1.amazonaws.com/prod/v2/models/iris/jobs/{job['id']}"
    assert job["result"] == headers["location"] == url
    assert job["upload"]["headers"] == {"Content-Type": "application/octet-stream", "Content-Length": "1024"}
    assert "/jobs/iris/" in job["upload"]["url"] and job["upload"]["url"].count(job["id"]) == 1
    (record,) = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="jobs/")["Contents"]]
    assert record.endswith(f"/{job['id']}/job.json")

    asked = load_event("job-status")
    asked["path"] = asked["path"].replace("0123456789abcdef0123456789abcdef", job["id"])
    asked["pathParameters"] = {"id": job["id"]}
    status, _, seen = jobs(asked)
    assert status == 200 and seen["status"] == "pending" and seen["input"] == "awaiting upload", seen

    other = copy.deepcopy(asked)
    other["requestContext"]["identity"]["userArn"] = "arn:aws:iam::000000000000:user/mallory"
    assert jobs(other)[0] == 404


def test_the_sample_status_event_of_an_unknown_job_is_404(jobs):
    status, _, answer = jobs(load_event("job-status"))
    assert status == 404 and "for this caller" in answer["error"]


@pytest.fixture
def flaky_jobs(flaky, monkeypatch):
    """The jobs handler whose S3 goes through a proxy that can be switched off."""
    monkeypatch.setenv("TIERSERVE_MODELS", "iris@1")
    monkeypatch.setenv("TIERSERVE_DATA_BUCKET", BUCKET)
    handler = load_handler({}, module="jobs")

    def invoke(event):
        result = handler(event, LocalLambdaContext())
        return result["statusCode"], json.loads(proxy_response_body(result))

    return flaky, invoke


def test_s3_down_is_a_503_that_says_so_and_loses_no_job(flaky_jobs, s3):
    proxy, jobs = flaky_jobs
    proxy.down = True
    status, answer = jobs(load_event("job-create"))
    assert status == 503 and "S3 is unavailable" in answer["error"] and "retry" in answer["error"]
    status, answer = jobs(load_event("job-status"))
    assert status == 503 and "S3 is unavailable" in answer["error"]
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix="jobs/")  # nothing half-made
    proxy.down = False
    status, job = jobs(load_event("job-create"))
    assert status == 202, job
    asked = load_event("job-status")
    asked["path"] = asked["path"].replace("0123456789abcdef0123456789abcdef", job["id"])
    status, seen = jobs(asked)
    assert status == 200 and seen["status"] == "pending", seen


@pytest.mark.parametrize("length", ["abc", "12\u00b2", "-1", "99999"])
def test_a_binary_job_whose_header_length_is_not_one_is_refused_at_the_door(jobs, length):
    event = load_event("job-create")
    event["body"], event["isBase64Encoded"] = base64.b64encode(b'{"inputs": []}').decode(), True
    event["headers"] = {**event["headers"], "Inference-Header-Content-Length": length}
    status, _, answer = jobs(event)
    assert status == 400 and "is not the length of the body's JSON header" in answer["error"], answer
