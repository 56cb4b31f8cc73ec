"""Where a job's objects live, whose they are, and what the pipeline reads of them."""

from __future__ import annotations

import pytest

from tierserve.errors import BadRequest
from tierserve.jobs import JobKeys, Upload, caller_of, new_job_id
from tierserve.jobs.keys import input_object_key, input_suffixes
from tierserve.s3_pipeline import PoisonMessage, parse_input_key
from tierserve.settings import ERROR_PREFIX, OUTPUT_PREFIX


def test_a_jobs_input_is_the_pipelines_and_its_results_lie_beside_it():
    keys = JobKeys("iris", caller_of(""), new_job_id())
    key = keys.input("3", ".npy")
    stored = input_object_key(key)
    assert stored == f"jobs/iris/{keys.caller}/{keys.id}/3/input.npy" and stored.startswith(keys.folder)
    assert parse_input_key(stored) == key and key.version == "3" and key.format == ".npy"
    assert key.result_key(OUTPUT_PREFIX) == f"{keys.folder}3/output.json"
    assert key.result_key(ERROR_PREFIX) == f"{keys.folder}3/error.json"
    assert any(stored.endswith(suffix) for suffix in input_suffixes())
    for other in (keys.record, key.result_key(OUTPUT_PREFIX), key.result_key(ERROR_PREFIX)):
        assert parse_input_key(other) is None  # a record or a result is never an input
        assert not any(other.endswith(suffix) for suffix in input_suffixes())  # nor triggers one


@pytest.mark.parametrize(
    "key",
    [
        "jobs/iris/c/id/input.npy",
        "jobs/iris/c/id/1/x/input.npy",
        "jobs/iris/../id/1/input.npy",
        "jobs//c/i/1/input.json",
    ],
)
def test_a_job_input_key_of_another_shape_is_poison(key):
    with pytest.raises(PoisonMessage, match="as the jobs route names it"):
        parse_input_key(key)


def test_callers_are_digests_of_their_identity_and_never_collide_across_kinds():
    from tierserve.audit import api_gateway_caller

    arn = api_gateway_caller({"identity": {"userArn": "arn:aws:iam::1:user/alice"}})
    key = api_gateway_caller({"identity": {"apiKeyId": "arn:aws:iam::1:user/alice"}})
    assert arn == "iam:arn:aws:iam::1:user/alice" and key.startswith("api_key:")
    assert caller_of("") == caller_of("anonymous")
    assert len({caller_of(arn), caller_of(key), caller_of("")}) == 3
    assert all(len(caller_of(c)) == 32 and "/" not in caller_of(c) for c in (arn, key))


def test_ids_are_128_random_bits():
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, Upload(".json")),
        ({"format": "npy", "bytes": 10}, Upload(".npy", 10)),
        ({"format": ".JSONL"}, Upload(".jsonl")),
        ({"format": "bin", "inference_header_content_length": 40}, Upload(".bin", None, 40)),
    ],
)
def test_an_upload_says_its_format_and_maybe_its_size(value, expected):
    assert Upload.parse(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("yes", "must be true or an object"),
        ({"format": "csv"}, "not one the pipeline reads"),
        ({"size": 3}, "must be true or an object"),
        ({"bytes": 0}, "whole number of bytes, 1 or more"),
        ({"bytes": True}, "whole number"),
        ({"format": "bin"}, 'needs "inference_header_content_length"'),
        ({"format": "npy", "inference_header_content_length": 3}, "only a bin upload"),
    ],
)
def test_an_upload_request_that_cannot_be_served_says_why(value, message):
    with pytest.raises(BadRequest, match=message):
        Upload.parse(value)
