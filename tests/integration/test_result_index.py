"""The result index: one ListObjectsV2 page per bucket, kind and model in place of a
HeadObject per input, and what it may and may not claim (moto's S3 on loopback)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from support.common import count_s3_calls
from tierserve import aws
from tierserve.s3_pipeline import InputKey
from tierserve.s3_pipeline import results as results_module
from tierserve.s3_pipeline.results import ResultStore

DATA = "index-data"


@pytest.fixture
def store(s3) -> ResultStore:
    s3.create_bucket(Bucket=DATA)
    return ResultStore(aws.s3_client, time.time)


@pytest.fixture
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


def put_results(s3, kind: str, model: str, paths: list[str]) -> None:
    for path in paths:
        s3.put_object(Bucket=DATA, Key=InputKey(model, path).result_key(kind), Body=b"{}")


def test_listed_results_exist_and_the_rest_of_the_range_does_not(s3, store, pool):
    put_results(s3, "errors", "iris", ["a/1.json", "a/3.json"])
    put_results(s3, "errors", "iris", ["a/2.json.json"])  # another input's error, inside the range
    keys = [InputKey("iris", p) for p in ("a/1.json", "a/2.json", "a/3.json", "a/4.json")]
    calls = count_s3_calls(aws.s3_client())
    index = store.index([(DATA, k) for k in keys], ["errors"], pool)
    assert [index.exists(DATA, "errors", k) for k in keys] == [True, False, True, False]
    assert calls == ["ListObjectsV2"]


def test_other_kinds_models_and_buckets_are_unknown(s3, store, pool):
    keys = [InputKey("iris", "1.json"), InputKey("iris", "2.json")]
    index = store.index([(DATA, k) for k in keys], ["errors"], pool)
    assert index.exists(DATA, "errors", keys[0]) is False
    assert index.exists(DATA, "outputs", keys[0]) is None  # not listed
    assert index.exists("other-bucket", "errors", keys[0]) is None
    assert index.exists(DATA, "errors", InputKey("mlp", "1.json")) is None


def test_a_single_input_is_not_listed(store, pool):
    calls = count_s3_calls(aws.s3_client())
    index = store.index([(DATA, InputKey("iris", "1.json"))] * 3, ["errors"], pool)
    assert index.exists(DATA, "errors", InputKey("iris", "1.json")) is None
    assert calls == []  # one key: a HeadObject when needed costs no more than a listing


def test_a_truncated_page_claims_nothing_past_its_last_key(s3, store, pool, monkeypatch):
    monkeypatch.setattr(results_module, "LIST_MAX_KEYS", 2)
    put_results(s3, "errors", "iris", ["1.json", "2.json", "3.json"])
    keys = [InputKey("iris", f"{i}.json") for i in (1, 2, 3, 4)]
    index = store.index([(DATA, k) for k in keys], ["errors"], pool)
    assert [index.exists(DATA, "errors", k) for k in keys] == [True, True, None, None]


def test_keys_just_below_the_first_are_not_mistaken_for_it(s3, store, pool):
    # The error of inputs/iris/x.json.jsoa sorts between the listing's StartAfter
    # ("errors/iris/x.json.jso") and the first key it asks about ("errors/iris/x.json.json").
    s3.put_object(Bucket=DATA, Key="errors/iris/x.json.jsoa.json", Body=b"{}")
    keys = [InputKey("iris", "x.json"), InputKey("iris", "y.json")]
    index = store.index([(DATA, k) for k in keys], ["errors"], pool)
    assert [index.exists(DATA, "errors", k) for k in keys] == [False, False]


def test_a_failed_listing_knows_nothing(s3, store, pool):
    keys = [InputKey("iris", "1.json"), InputKey("iris", "2.json")]
    index = store.index([("no-such-bucket", k) for k in keys], ["errors"], pool)
    assert index.exists("no-such-bucket", "errors", keys[0]) is None


def test_an_expired_deadline_leaves_the_index_unknown(s3, store, pool):
    keys = [InputKey("iris", "1.json"), InputKey("iris", "2.json")]
    index = store.index([(DATA, k) for k in keys], ["errors"], pool, aws.Deadline.after(0))
    assert index.exists(DATA, "errors", keys[0]) is None
