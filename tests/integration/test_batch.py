"""Bulk inference end to end on moto's S3 (loopback HTTP) with real onnxruntime: the batch
function's handler on Distributed Map events (built from events/sfn-batch.json), the item
readers on real manifests and inventory reports, and whole map runs in this process
(``run_locally``), ending with the S3 pipeline's promise checked on the bucket listing."""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import sys
from collections.abc import Callable

import pytest

from support.common import BUCKET, count_s3_calls, load_event
from support.pipeline import ROWS, assert_one_result_per_input, infer_request, jsonl, keys
from tierserve import aws
from tierserve.batch import (
    BadManifest,
    BatchItemsFailed,
    BatchModelStarting,
    BatchSource,
    InvalidBatch,
    MapSettings,
    PoisonItems,
    RetryPolicy,
    read_items,
    run_locally,
)
from tierserve.s3_pipeline import S3Object
from tierserve.settings import CACHE_DIR_ENV, DATA_BUCKET_ENV, MODEL_BUCKET_ENV, MODELS_ENV, PRELOAD_ENV
from tierserve.tools.local.apigw import LocalLambdaContext
from tierserve.tools.local.stack import load_handler

DATA = "batch-data"
QUICK_RETRY = RetryPolicy(errors=("BatchItemsFailed",), interval_s=0.0, max_attempts=2, backoff_rate=1.0)


class BatchFunction:
    """The batch function's handler as Lambda runs it, and Distributed Map events for it."""

    def __init__(self, s3, handler: Callable) -> None:
        self.s3, self.handler = s3, handler
        self.module = sys.modules["batch"]

    def put(self, key: str, body: bytes) -> dict:
        """Put an input; return its item as the ListObjectsV2 item reader gives it."""
        etag = self.s3.put_object(Bucket=DATA, Key=key, Body=body)["ETag"]
        return {"Key": key, "Etag": etag, "Size": len(body), "LastModified": 0, "StorageClass": "STANDARD"}

    def event(self, items: list, model: str = "iris", reader: str = "prefix") -> dict:
        event = load_event("sfn-batch")
        event["Items"], event["BatchInput"] = items, {"bucket": DATA, "model": model, "reader": reader}
        return event

    def invoke(self, items: list, **batch_input) -> dict:
        return self.handler(self.event(items, **batch_input), LocalLambdaContext(timeout_ms=60_000))

    def read(self, key: str) -> dict:
        return json.loads(self.s3.get_object(Bucket=DATA, Key=key)["Body"].read())


@pytest.fixture
def make_function(s3, uploaded_iris, cache_dir, monkeypatch) -> Callable[..., BatchFunction]:
    s3.create_bucket(Bucket=DATA)

    def make(**env: str) -> BatchFunction:
        monkeypatch.setenv(MODEL_BUCKET_ENV, BUCKET)
        monkeypatch.setenv(MODELS_ENV, "iris@1")
        monkeypatch.setenv(CACHE_DIR_ENV, str(cache_dir))
        monkeypatch.setenv(DATA_BUCKET_ENV, DATA)
        monkeypatch.delenv(PRELOAD_ENV, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        aws.clear_clients()
        return BatchFunction(s3, load_handler({}, module="batch"))

    return make


@pytest.fixture
def function(make_function) -> BatchFunction:
    return make_function()


# ---------------------------------------------------------------- the batch function


def test_the_sample_event_is_a_batch_of_the_iris_model_in_the_local_data_bucket():
    event = load_event("sfn-batch")
    assert event["BatchInput"] == BatchSource("tierserve-data", "iris").batch_input()
    assert [item["Key"] for item in event["Items"]] == ["inputs/iris/2026/a.json", "inputs/iris/2026/b.jsonl"]


def test_a_batch_writes_every_result_where_the_s3_worker_writes_it(function):
    items = [
        function.put("inputs/iris/2026/a.json", infer_request(id="a")),
        function.put("inputs/iris/2026/b.jsonl", jsonl(ROWS)),
        function.put("inputs/iris/2026/c.json", b"{broken"),
    ]
    assert function.invoke(items) == {"items": 3, "outputs": 2, "errors": 1, "skipped": 0}
    output = function.read("outputs/iris/2026/a.json.json")
    assert output["id"] == "a" and output["parameters"]["input_key"] == "inputs/iris/2026/a.json"
    assert function.read("outputs/iris/2026/b.jsonl.json")["parameters"]["rows"] == 2
    assert function.read("errors/iris/2026/c.json.json")["status"] == 400
    head = function.s3.head_object(Bucket=DATA, Key="outputs/iris/2026/a.json.json")
    assert head["Metadata"]["tierserve-model"] == "iris@1"
    assert head["Metadata"]["tierserve-input-etag"] == items[0]["Etag"].strip('"')
    assert_one_result_per_input(function.s3, DATA)


def test_a_rerun_skips_current_results_without_reading_the_inputs(function):
    items = [function.put(f"inputs/iris/r/{i}.json", infer_request()) for i in range(4)]
    assert function.invoke(items)["outputs"] == 4
    before = {k: function.s3.get_object(Bucket=DATA, Key=k)["ETag"] for k in keys(function.s3, DATA)}
    calls = count_s3_calls(aws.s3_client())
    assert function.invoke(items) == {"items": 4, "outputs": 0, "errors": 0, "skipped": 4}
    # Both kinds listed once for the batch; each listed output looked at; no input read, nothing written.
    assert sorted(calls) == ["HeadObject"] * 4 + ["ListObjectsV2"] * 2
    assert {k: function.s3.get_object(Bucket=DATA, Key=k)["ETag"] for k in keys(function.s3, DATA)} == before


def test_a_changed_input_or_a_new_model_version_is_served_again(function):
    [item] = [function.put("inputs/iris/x.json", infer_request(ROWS[:1]))]
    assert function.invoke([item])["outputs"] == 1
    changed = function.put("inputs/iris/x.json", infer_request(ROWS))
    assert function.invoke([changed])["outputs"] == 1
    assert function.read("outputs/iris/x.json.json")["outputs"][0]["shape"] == [2]


def test_results_of_the_s3_worker_in_a_versioned_bucket_are_current_for_a_batch(function):
    function.s3.put_bucket_versioning(Bucket=DATA, VersioningConfiguration={"Status": "Enabled"})
    put = function.s3.put_object(Bucket=DATA, Key="inputs/iris/v.json", Body=infer_request())
    announced = S3Object(DATA, "inputs/iris/v.json", etag=put["ETag"].strip('"'), version_id=put["VersionId"])
    assert function.module.pipeline.handle(announced).status == "output"  # as the worker serves an event
    listed = {"Key": "inputs/iris/v.json", "Etag": put["ETag"], "Size": 10}  # a listing has no version id
    assert function.invoke([listed]) == {"items": 1, "outputs": 0, "errors": 0, "skipped": 1}


def test_an_item_with_a_transient_fault_fails_the_batch_for_a_retry_that_skips_the_rest(function, flaky):
    items = [function.put(f"inputs/iris/t/{i}.json", infer_request()) for i in range(3)]
    flaky.down = True
    with pytest.raises(
        BatchItemsFailed, match=r"3 of 3 items failed for now and will be retried: inputs/iris/t/"
    ):
        function.invoke(items)
    assert keys(function.s3, DATA) == sorted(item["Key"] for item in items)
    flaky.down = False
    assert function.invoke(items)["outputs"] == 3
    assert_one_result_per_input(function.s3, DATA)


def test_items_that_can_never_be_served_fail_the_batch_and_the_rest_are_served(function):
    good = function.put("inputs/iris/p/ok.json", infer_request())
    other = function.put("inputs/mlp/p/x.json", infer_request())
    with pytest.raises(PoisonItems) as raised:
        function.invoke([good, other, {"Size": 3}, {"Key": "inputs/iris/p/ok.json", "Bucket": "elsewhere"}])
    message = str(raised.value)
    assert message.startswith("3 of 4 items can never be served")
    assert "inputs/mlp/p/x.json is not under inputs/iris/" in message
    assert (
        "names no key" in message
        and "s3://elsewhere/inputs/iris/p/ok.json is not in the data bucket" in message
    )
    assert "outputs/iris/p/ok.json.json" in keys(function.s3, DATA)


def test_folder_markers_and_deleted_inputs_are_skipped(function):
    gone = function.put("inputs/iris/g/gone.json", infer_request())
    function.s3.delete_object(Bucket=DATA, Key=gone["Key"])
    marker = {"Key": "inputs/iris/g/", "Etag": '"d41d8cd98f00b204e9800998ecf8427e"', "Size": 0}
    assert function.invoke([gone, marker]) == {"items": 2, "outputs": 0, "errors": 0, "skipped": 2}
    assert keys(function.s3, DATA) == []


@pytest.mark.parametrize(
    "event",
    [
        {},
        {"Items": "x"},
        {"Items": [], "BatchInput": {"bucket": DATA, "reader": "prefix"}},
        {"Items": [], "BatchInput": {"model": "iris"}},
    ],
)
def test_an_event_that_is_no_batch_is_refused_with_its_shape(function, event):
    with pytest.raises(InvalidBatch, match="BatchInput"):
        function.handler(event, LocalLambdaContext())


def test_a_manifest_item_without_an_etag_is_looked_up_once_and_skipped_on_a_rerun(function):
    function.put("inputs/iris/m/1.json", infer_request())
    assert function.invoke(["inputs/iris/m/1.json"], reader="json")["outputs"] == 1
    calls = count_s3_calls(aws.s3_client())
    assert function.invoke(["inputs/iris/m/1.json"], reader="json")["skipped"] == 1
    assert "GetObject" not in calls and calls.count("HeadObject") == 3  # the input's ETag, then both results


def test_a_batch_for_another_bucket_than_the_functions_is_refused(function):
    event = function.event([])
    event["BatchInput"]["bucket"] = "other-bucket"
    with pytest.raises(
        InvalidBatch, match="names the bucket other-bucket, but this function serves batch-data only"
    ):
        function.handler(event, LocalLambdaContext())


# ---------------------------------------------------------------- item readers


def test_a_prefix_lists_every_input_under_it_across_pages(s3, monkeypatch):
    from tierserve.batch import items as items_module

    monkeypatch.setattr(items_module, "LIST_PAGE_KEYS", 2)
    s3.create_bucket(Bucket=DATA)
    for i in range(5):
        s3.put_object(Bucket=DATA, Key=f"inputs/iris/2026/{i}.json", Body=b"{}")
    s3.put_object(Bucket=DATA, Key="inputs/iris/2025/x.json", Body=b"{}")
    found = list(read_items(s3, BatchSource.parse(f"s3://{DATA}/inputs/iris/2026/", "iris")))
    assert [item["Key"] for item in found] == [f"inputs/iris/2026/{i}.json" for i in range(5)]
    assert set(found[0]) == {"Key", "Etag", "Size", "LastModified", "StorageClass"}


def test_a_csv_manifest_reads_its_key_column(s3):
    s3.create_bucket(Bucket=DATA)
    body = "\ufeffKey,Etag\ninputs/iris/a.json,abc\n" + '"inputs/iris/with, comma.json",\n'
    s3.put_object(Bucket=DATA, Key="manifests/run.csv", Body=body.encode())
    found = list(read_items(s3, BatchSource.parse(f"s3://{DATA}/manifests/run.csv", "iris", "csv")))
    assert found == [
        {"Key": "inputs/iris/a.json", "Etag": "abc"},
        {"Key": "inputs/iris/with, comma.json", "Etag": ""},
    ]


def test_a_json_manifest_reads_keys_or_objects(s3):
    s3.create_bucket(Bucket=DATA)
    s3.put_object(
        Bucket=DATA, Key="manifests/run.json", Body=b'["inputs/iris/a.json", {"Key": "inputs/iris/b.json"}]'
    )
    found = list(read_items(s3, BatchSource.parse(f"s3://{DATA}/manifests/run.json", "iris", "json")))
    assert found == ["inputs/iris/a.json", {"Key": "inputs/iris/b.json"}]


def put_inventory(
    s3, rows: list[list[str]], schema: str = "Bucket, Key, Size, ETag, IsLatest", fmt: str = "CSV"
) -> str:
    data = io.StringIO()
    csv.writer(data).writerows(rows)
    data_key = "inventory/batch-data/daily/data/0001.csv.gz"
    s3.put_object(Bucket=DATA, Key=data_key, Body=gzip.compress(data.getvalue().encode()))
    manifest = {
        "sourceBucket": DATA,
        "destinationBucket": f"arn:aws:s3:::{DATA}",
        "version": "2016-11-30",
        "fileFormat": fmt,
        "fileSchema": schema,
        "files": [{"key": data_key, "size": 1, "MD5checksum": "x"}],
    }
    manifest_key = "inventory/batch-data/daily/2026-01-01T00-00Z/manifest.json"
    s3.put_object(Bucket=DATA, Key=manifest_key, Body=json.dumps(manifest).encode())
    return f"s3://{DATA}/{manifest_key}"


def test_an_inventory_report_reads_its_data_files_with_their_schema(s3):
    s3.create_bucket(Bucket=DATA)
    uri = put_inventory(
        s3,
        [
            [DATA, "inputs/iris/my+sample.json", "10", "abc", "true"],
            [DATA, "inputs/iris/old.json", "10", "def", "false"],
        ],
    )
    source = BatchSource.parse(uri, "iris", "inventory")
    found = list(read_items(s3, source))
    assert found[0] == {
        "Bucket": DATA,
        "Key": "inputs/iris/my+sample.json",
        "Size": "10",
        "ETag": "abc",
        "IsLatest": "true",
    }
    from tierserve.batch import to_object

    assert to_object(found[0], source) == S3Object(DATA, "inputs/iris/my sample.json", size=10, etag="abc")
    assert to_object(found[1], source) is None  # a noncurrent version


@pytest.mark.parametrize(
    ("key", "body", "manifest", "fragment"),
    [
        ("manifests/a.csv", b"Name\ninputs/iris/a.json\n", "csv", "has no Key column"),
        ("manifests/a.csv", b"Key\n\xff\xfe\n", "csv", "is not a UTF-8 CSV file"),
        ("manifests/a.json", b"{broken", "json", "is not JSON"),
        ("manifests/a.json", b'{"Key": "x"}', "json", "is not a JSON array"),
        ("inventory/x/manifest.json", b'{"files": []}', "inventory", "describes a None inventory"),
        ("inventory/x/manifest.json", b"[]", "inventory", "is not an S3 Inventory manifest.json"),
    ],
)
def test_a_manifest_that_is_not_what_its_reader_takes_says_so(s3, key, body, manifest, fragment):
    s3.create_bucket(Bucket=DATA)
    s3.put_object(Bucket=DATA, Key=key, Body=body)
    with pytest.raises(BadManifest, match=fragment):
        list(read_items(s3, BatchSource.parse(f"s3://{DATA}/{key}", "iris", manifest)))


def test_an_orc_inventory_is_refused_with_the_fix(s3):
    s3.create_bucket(Bucket=DATA)
    uri = put_inventory(s3, [], fmt="ORC")
    with pytest.raises(
        BadManifest, match="reads CSV inventories only; set the inventory's output format to CSV"
    ):
        list(read_items(s3, BatchSource.parse(uri, "iris", "inventory")))


# ---------------------------------------------------------------- whole map runs, locally


SETTINGS = MapSettings(
    items_per_batch=10, max_concurrency=2, tolerated_failure_percentage=0, function_timeout_s=60
)


def test_a_local_map_run_serves_a_prefix_in_batches_and_writes_its_summary(function):
    for i in range(25):
        function.put(f"inputs/iris/run/{i:02d}.json", infer_request())
    seen = []
    source = BatchSource.parse(f"s3://{DATA}/inputs/iris/run/", "iris")
    result = run_locally(function.module.pipeline, function.s3, source, SETTINGS, progress=seen.append)
    assert result.status == "SUCCEEDED"
    assert result.counts.as_dict() == {"pending": 0, "running": 0, "succeeded": 25, "failed": 0, "total": 25}
    assert result.outcomes == {"outputs": 25, "errors": 0, "skipped": 0}
    assert seen[-1].succeeded == 25 and all(a.succeeded <= b.succeeded for a, b in itertools.pairwise(seen))
    manifest = function.read(result.summary_key)
    assert result.summary_key == f"batch-summaries/{result.run_id}/manifest.json"
    assert manifest["DestinationBucket"] == DATA and manifest["ResultFiles"]["FAILED"] == []
    [succeeded] = manifest["ResultFiles"]["SUCCEEDED"]
    records = function.read(succeeded["Key"])
    assert [len(json.loads(r["Input"])["Items"]) for r in records] == [10, 10, 5]
    assert all(r["Status"] == "SUCCEEDED" and json.loads(r["Output"])["outputs"] for r in records)
    assert_one_result_per_input(function.s3, DATA, extra_prefixes=("batch-summaries/",))
    rerun = run_locally(function.module.pipeline, function.s3, source, SETTINGS)
    assert rerun.outcomes == {"outputs": 0, "errors": 0, "skipped": 25}


def put_manifest(function: BatchFunction, keys_: list[str]) -> BatchSource:
    function.s3.put_object(
        Bucket=DATA, Key="manifests/run.csv", Body=("Key\n" + "\n".join(keys_) + "\n").encode()
    )
    return BatchSource.parse(f"s3://{DATA}/manifests/run.csv", "iris", "csv")


def test_a_failed_batch_over_the_tolerated_percentage_fails_the_run_and_says_why(function):
    for i in range(20):
        function.put(f"inputs/iris/f/{i:02d}.json", infer_request())
    names = [f"inputs/iris/f/{i:02d}.json" for i in range(20)]
    source = put_manifest(function, [*names[:10], "inputs/mlp/f/x.json", *names[10:19]])  # one poison item
    result = run_locally(function.module.pipeline, function.s3, source, SETTINGS)
    assert (result.status, result.error) == ("FAILED", "States.ExceedToleratedFailureThreshold")
    assert result.counts.failed == 10 and "over the tolerated 0%" in result.cause
    [failed] = function.read(result.summary_key)["ResultFiles"]["FAILED"]
    [record] = function.read(failed["Key"])
    assert (
        record["Error"] == "PoisonItems"
        and "inputs/mlp/f/x.json" in json.loads(record["Cause"])["errorMessage"]
    )
    tolerant = MapSettings(10, 2, tolerated_failure_percentage=50, function_timeout_s=60)
    assert run_locally(function.module.pipeline, function.s3, source, tolerant).status == "SUCCEEDED"


def test_a_transient_fault_is_retried_by_the_runs_retry_policy(function, flaky):
    for i in range(3):
        function.put(f"inputs/iris/retry/{i}.json", infer_request())
    source = BatchSource.parse(f"s3://{DATA}/inputs/iris/retry/", "iris")
    flaky.fail_next = 200  # longer than botocore's own attempts of the first try
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        flaky.fail_next = 0  # the fault passes before the retry

    result = run_locally(
        function.module.pipeline, function.s3, source, SETTINGS, retry=QUICK_RETRY, sleep=sleep
    )
    assert result.status == "SUCCEEDED" and result.outcomes["outputs"] == 3 and slept == [0.0]


def test_a_fault_that_outlasts_the_retries_fails_the_run(function, flaky):
    function.put("inputs/iris/down/0.json", infer_request())
    source = put_manifest(function, ["inputs/iris/down/0.json"])
    flaky.down = True
    result = run_locally(
        function.module.pipeline, function.s3, source, SETTINGS, retry=QUICK_RETRY, sleep=lambda s: None
    )
    assert result.status == "FAILED" and result.counts.failed == 1


# ---------------------------------------------------------------- a cold GPU model


@pytest.fixture
def cold_gpu_function(make_function, iris_package, tmp_path, monkeypatch):
    """The batch function with iris on the GPU tier (the SageMaker runtime double in front of
    the GPU server's host), its inference component with no copy running."""
    from support.sagemaker import SageMakerDouble, start_container
    from tierserve.settings import GPU_ENDPOINTS_ENV

    container = start_container(iris_package.artifact.parent, tmp_path / "container-cache")
    double = SageMakerDouble({"iris-gpu": container}, components={"iris-ic": "iris-gpu"})
    double.cold.add("iris-ic")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", double.url)
    yield make_function(**{GPU_ENDPOINTS_ENV: "iris=iris-gpu/iris-ic"}), double
    double.stop()
    container.close()


def test_a_batch_for_a_cold_model_waits_on_the_slow_retrier_and_is_served_once_warm(cold_gpu_function):
    function, double = cold_gpu_function
    items = [function.put(f"inputs/iris/cold/{i}.json", infer_request()) for i in range(3)]
    with pytest.raises(BatchModelStarting, match=r"3 of 3 items wait for their model") as raised:
        function.invoke(items)
    assert isinstance(raised.value, BatchItemsFailed)  # a transient failure, by its own name
    assert keys(function.s3, DATA) == sorted(item["Key"] for item in items)  # nothing written
    # A local map run: the cold batch is retried on COLD_RETRY's schedule (the ordinary
    # retrier's attempts are not spent), and served once the copy is up.
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 5:
            double.cold.clear()

    source = BatchSource.parse(f"s3://{DATA}/inputs/iris/cold/", "iris")
    result = run_locally(function.module.pipeline, function.s3, source, SETTINGS, sleep=sleep)
    assert result.status == "SUCCEEDED" and result.outcomes["outputs"] == 3
    assert slept == [60.0, 120.0, 240.0, 300.0, 300.0]  # COLD_RETRY: doubling, at most 5 minutes
    assert_one_result_per_input(function.s3, DATA, extra_prefixes=("batch-summaries/",))
