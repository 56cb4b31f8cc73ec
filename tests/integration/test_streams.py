"""Streams end to end on moto's Kinesis and SQS (its server on loopback) with real onnxruntime:
the stream handler on the shared Kinesis event, and records put on a stream, polled as
Lambda's event source mapping polls them (partial batch responses, bisection on error,
retries, the on-failure destination), with their results read back from the output stream."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

import pytest

from support.common import BUCKET, load_event
from support.flaky import FlakyProxy
from support.pipeline import ROWS
from tierserve import aws
from tierserve.settings import (
    CACHE_DIR_ENV,
    MODEL_BUCKET_ENV,
    MODELS_ENV,
    OUTPUT_STREAM_ENV,
    PRELOAD_ENV,
    STREAM_MODEL_ENV,
)
from tierserve.tools.local.apigw import LocalLambdaContext
from tierserve.tools.local.kinesis_stream import StreamPoller, Streams, create_streams, kinesis_event
from tierserve.tools.local.stack import load_handler

REQUEST = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ROWS[1]}]}


class Stream:
    """The input and output streams, the failure queue, and the real stream handler."""

    def __init__(self, kinesis, sqs, streams: Streams, handler: Callable) -> None:
        self.kinesis, self.sqs, self.streams, self.handler = kinesis, sqs, streams, handler
        self.module = sys.modules["stream"]

    def put(self, *documents, partition_key: str = "sensor-7") -> list[str]:
        records = [
            {"Data": d if isinstance(d, bytes) else json.dumps(d).encode(), "PartitionKey": partition_key}
            for d in documents
        ]
        answer = self.kinesis.put_records(StreamName=self.streams.records, Records=records)
        return [entry["SequenceNumber"] for entry in answer["Records"]]

    def poller(self, handler: Callable | None = None, **options) -> StreamPoller:
        options.setdefault("retry_delay_s", 0)
        return StreamPoller(self.kinesis, self.sqs, self.streams, handler or self.handler, **options)

    def results(self) -> list[dict]:
        """Every result record on the output stream, in the order it holds them."""
        (shard,) = self.kinesis.list_shards(StreamName=self.streams.results)["Shards"]
        iterator = self.kinesis.get_shard_iterator(
            StreamName=self.streams.results, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        found = []
        while True:
            answer = self.kinesis.get_records(ShardIterator=iterator, Limit=1000)
            found += [
                json.loads(r["Data"]) | {"_partition_key": r["PartitionKey"]} for r in answer["Records"]
            ]
            if not answer["Records"]:
                return found
            iterator = answer["NextShardIterator"]

    def event(self) -> dict:
        """Lambda's event for every record on the input stream, as the mapping would deliver them."""
        (shard,) = self.kinesis.list_shards(StreamName=self.streams.records)["Shards"]
        iterator = self.kinesis.get_shard_iterator(
            StreamName=self.streams.records, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        records = self.kinesis.get_records(ShardIterator=iterator, Limit=1000)["Records"]
        return kinesis_event(records, shard["ShardId"], self.streams.records_arn)

    def failures(self) -> list[dict]:
        messages = self.sqs.receive_message(QueueUrl=self.streams.failures_url, MaxNumberOfMessages=10)
        return [json.loads(m["Body"]) for m in messages.get("Messages", [])]


def drain(poller: StreamPoller, rounds: int = 10) -> list:
    polls = [poller.poll_once() for _ in range(rounds)]
    return [p for p in polls if p.received]


@pytest.fixture
def make_stream(s3, embedded_s3, uploaded_iris, cache_dir, monkeypatch) -> Callable[..., Stream]:
    kinesis, sqs = embedded_s3.client("kinesis"), embedded_s3.client("sqs")
    streams = create_streams(kinesis, sqs)

    def make(**env: str) -> Stream:
        monkeypatch.setenv(MODEL_BUCKET_ENV, BUCKET)
        monkeypatch.setenv(MODELS_ENV, "iris@1")
        monkeypatch.setenv(CACHE_DIR_ENV, str(cache_dir))
        monkeypatch.setenv(OUTPUT_STREAM_ENV, streams.results)
        monkeypatch.delenv(STREAM_MODEL_ENV, raising=False)
        monkeypatch.delenv(PRELOAD_ENV, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        aws.clear_clients()
        return Stream(kinesis, sqs, streams, load_handler({}, module="stream"))

    return make


@pytest.fixture
def stream(make_stream) -> Stream:
    return make_stream()


def labels(result: dict) -> list[int]:
    return {o["name"]: o for o in result["outputs"]}["label"]["data"]


# ---------------------------------------------------------------- the handler


def test_the_shared_kinesis_event_gets_a_result_per_record_under_its_partition_key(stream):
    event = load_event("kinesis-records")
    assert stream.handler(event, LocalLambdaContext()) == {"batchItemFailures": []}
    row, request = stream.results()
    assert labels(row) == [0] and labels(request) == [2] and request["id"] == "req-2"
    assert row["parameters"] == {
        "sequence_number": event["Records"][0]["kinesis"]["sequenceNumber"],
        "shard_id": "shardId-000000000000",
        "partition_key": "sensor-7",
    }
    assert row["_partition_key"] == request["_partition_key"] == "sensor-7"
    assert (row["model_name"], row["model_version"]) == ("iris", "1")


# ---------------------------------------------------------------- through the event source mapping


def test_records_are_served_in_shard_order_each_result_naming_its_record(stream):
    documents = [ROWS[i % 2] if i % 3 else REQUEST for i in range(30)]
    sequence_numbers = stream.put(*documents)
    drain(stream.poller(batch_size=7))
    results = stream.results()
    assert [r["parameters"]["sequence_number"] for r in results] == sequence_numbers
    assert [labels(r)[0] for r in results] == [(0 if i % 2 == 0 else 2) if i % 3 else 2 for i in range(30)]
    assert stream.failures() == []


def test_a_poison_record_gets_an_error_result_and_never_blocks_its_shard(stream):
    wrong_shape = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    sequence_numbers = stream.put(ROWS[0], b"not json", wrong_shape, {"x": [1]}, ROWS[1])
    [poll] = drain(stream.poller())
    assert poll.invocations == 1 and poll.failed_batches == 0  # no retries: nothing transient
    results = stream.results()
    assert [r["parameters"]["sequence_number"] for r in results] == sequence_numbers
    assert labels(results[0]) == [0] and labels(results[4]) == [2]
    assert [(r["status"], r["model_name"]) for r in results[1:4]] == [(400, "iris")] * 3
    assert "the record is not valid JSON" in results[1]["error"]
    assert "has shape [1, 3] but the model expects [-1, 4]" in results[2]["error"]
    assert (
        "the record: a row needs exactly the model's inputs ['input']; unknown ['x']" in results[3]["error"]
    )


@pytest.fixture
def flaky_kinesis(embedded_s3, monkeypatch):
    """A switchable proxy in front of moto for the worker's Kinesis calls only."""
    proxy = FlakyProxy(embedded_s3.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_KINESIS", proxy.endpoint)
    aws.clear_clients()
    yield proxy
    proxy.stop()


def test_a_failed_write_is_retried_from_its_first_record_and_results_stay_in_order(stream, flaky_kinesis):
    sequence_numbers = stream.put(*[ROWS[i % 2] for i in range(5)])
    flaky_kinesis.fail_next = 4  # more than botocore's own attempts of one PutRecords
    [poll] = drain(stream.poller())
    assert poll.invocations == 2 and poll.failed_batches == 0
    assert [r["parameters"]["sequence_number"] for r in stream.results()] == sequence_numbers


def test_a_partly_refused_write_retries_from_the_refused_result_and_repeats_only_later_ones(stream):
    refused = []

    def refuse_the_third(parsed, **_):
        if not refused and len(parsed.get("Records", [])) == 5:
            refused.append(True)
            parsed["Records"][2] = {
                "ErrorCode": "ProvisionedThroughputExceededException",
                "ErrorMessage": "slow down",
            }
            parsed["FailedRecordCount"] = 1

    aws.client("kinesis").meta.events.register("after-call.kinesis.PutRecords", refuse_the_third)
    sequence_numbers = stream.put(*[ROWS[0]] * 5)
    [poll] = drain(stream.poller())
    assert refused and poll.invocations == 2
    written = [r["parameters"]["sequence_number"] for r in stream.results()]
    # moto wrote all five the first time (the refusal is the test's); the retry from the third
    # writes the third to fifth again: each record answered, the first two exactly once.
    assert written == sequence_numbers + sequence_numbers[2:]


def test_a_transient_fault_before_a_record_is_served_fails_it_and_every_later_one(stream, flaky, monkeypatch):
    sequence_numbers = stream.put(ROWS[0], ROWS[1], REQUEST)
    flaky.down = True  # the model cannot load from S3: a retryable fault
    response = stream.handler(stream.event(), LocalLambdaContext())
    assert [f["itemIdentifier"] for f in response["batchItemFailures"]] == sequence_numbers
    assert stream.results() == []
    flaky.down = False
    drain(stream.poller())
    assert [r["parameters"]["sequence_number"] for r in stream.results()] == sequence_numbers


def test_records_that_keep_failing_go_to_the_failure_destination_and_the_shard_moves_on(
    stream, flaky_kinesis
):
    stuck = stream.put(ROWS[0], ROWS[1])
    flaky_kinesis.down = True
    poller = stream.poller(max_retry_attempts=2)
    [poll] = drain(poller)
    assert (poll.invocations, poll.failed_batches) == (3, 1)  # the first try and two retries
    [failure] = stream.failures()
    assert failure["requestContext"]["condition"] == "RetryAttemptsExhausted"
    assert failure["requestContext"]["approximateInvokeCount"] == 3
    info = failure["KinesisBatchInfo"]
    assert (info["startSequenceNumber"], info["endSequenceNumber"], info["batchSize"]) == (*stuck, 2)
    assert info["shardId"] == "shardId-000000000000" and info["streamArn"] == stream.streams.records_arn
    assert "Data" not in json.dumps(failure)  # the position, never the records
    flaky_kinesis.down = False
    later = stream.put(REQUEST)
    drain(poller)
    assert [r["parameters"]["sequence_number"] for r in stream.results()] == later  # the stuck ones skipped


def test_a_handler_that_raises_is_bisected_until_the_record_that_crashes_it_is_alone(stream):
    sequence_numbers = stream.put(*[ROWS[i % 2] for i in range(6)])
    crash_on = sequence_numbers[3]

    def crashing(event, context):
        if any(r["kinesis"]["sequenceNumber"] == crash_on for r in event["Records"]):
            raise RuntimeError("a record that crashes the function")
        return stream.handler(event, context)

    [poll] = drain(stream.poller(crashing, max_retry_attempts=1))
    assert poll.failed_batches == 1
    [failure] = stream.failures()
    assert (
        failure["KinesisBatchInfo"]["startSequenceNumber"]
        == failure["KinesisBatchInfo"]["endSequenceNumber"]
        == crash_on
    )
    assert failure["responseContext"]["functionError"] == "Unhandled"
    served = [r["parameters"]["sequence_number"] for r in stream.results()]
    assert served == [s for s in sequence_numbers if s != crash_on]  # the rest, in order


def test_the_stream_model_must_be_one_the_worker_serves(make_stream, capsys):
    with pytest.raises(SystemExit):
        make_stream(**{STREAM_MODEL_ENV: "mlp"})
    assert "TIERSERVE_STREAM_MODEL='mlp' is not in TIERSERVE_MODELS" in capsys.readouterr().err


def test_tierserve_local_stream_prints_each_result_in_order(
    stream, embedded_s3, tmp_path, capsys, monkeypatch
):
    from tierserve.tools import cli
    from tierserve.tools.local.state import write_state

    poller = stream.poller().start()
    try:
        write_state(
            tmp_path,
            {
                "pid": os.getpid(),
                "s3_endpoint": embedded_s3.endpoint,
                "records_stream": stream.streams.records,
                "results_stream": stream.streams.results,
            },
        )
        rows = tmp_path / "rows.jsonl"
        rows.write_text("[5.1, 3.5, 1.4, 0.2]\n\n" + json.dumps(REQUEST) + "\n")
        assert cli.main(["local", "stream", str(rows), "--work-dir", str(tmp_path), "--timeout", "20"]) == 0
        out = capsys.readouterr()
        first, second = (json.loads(line) for line in out.out.splitlines())
        assert labels(first) == [0] and labels(second) == [2]
        assert "2 records -> 2 results (0 errors) from tierserve-results" in out.err
        rows.write_text("{broken\n")
        assert cli.main(["local", "stream", str(rows), "--work-dir", str(tmp_path)]) == 1
        assert json.loads(capsys.readouterr().out)["status"] == 400
    finally:
        poller.stop()


def test_tierserve_local_stream_without_a_running_stack_says_so(tmp_path, capsys):
    from tierserve.tools import cli

    (tmp_path / "r.jsonl").write_text("[1, 2, 3, 4]\n")
    assert cli.main(["local", "stream", str(tmp_path / "r.jsonl"), "--work-dir", str(tmp_path)]) == 1
    assert "start `tierserve local` first" in capsys.readouterr().err
    assert cli.main(["local", "stream", str(tmp_path / "none.jsonl"), "--work-dir", str(tmp_path)]) == 2
