"""Inference on streams on the local stack, all inside the embedded moto server:

    Kinesis tierserve-records --StreamPoller--> the stream handler --PutRecords--> Kinesis tierserve-results
                                    | retries exhausted
                                    v
                       SQS tierserve-records-failures (the on-failure destination)

:class:`StreamPoller` does what Lambda's Kinesis event source mapping does, shard by shard:
read a batch in order, hand it to the real stream handler, and on the partial batch
response retry from the first failed record (a handler that raises fails the whole batch,
which is split in two, as ``BisectBatchOnFunctionError`` does); after
``max_retry_attempts`` retries the batch's position (``KinesisBatchInfo``, never the data)
goes to the failure queue and the shard moves on.

``tierserve local`` starts it next to the local API; ``tierserve local stream FILE`` puts
each line of FILE as a record and prints the results in order.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tierserve import aws
from tierserve.telemetry import logger
from tierserve.tools.local.apigw import LocalLambdaContext
from tierserve.tools.local.embedded_s3 import LOCAL_CREDENTIALS, EmbeddedS3, embedded_client
from tierserve.tools.local.state import LocalStackNotRunning, read_state, write_state

RECORDS_STREAM = "tierserve-records"
RESULTS_STREAM = "tierserve-results"
FAILURES_QUEUE = "tierserve-records-failures"
LOCAL_STREAM_MODEL = "iris"  # the sample model the local stream serves
STREAM_BATCH_SIZE = 100
MAX_RETRY_ATTEMPTS = 2
RETRY_DELAY_S = 0.2  # Lambda backs off too; locally a retry comes quickly
IDLE_WAIT_S = 0.05  # between polls of a shard with nothing new
REGION = LOCAL_CREDENTIALS["AWS_DEFAULT_REGION"]
LOCAL_FUNCTION_ARN = f"arn:aws:lambda:{REGION}:000000000000:function:tierserve-local-stream"

LambdaHandler = Callable[[dict[str, Any], Any], dict[str, Any]]


@dataclass(frozen=True)
class Streams:
    records: str
    records_arn: str
    results: str
    failures_url: str


def create_streams(
    kinesis: Any,
    sqs: Any,
    *,
    records: str = RECORDS_STREAM,
    results: str = RESULTS_STREAM,
    failures: str = FAILURES_QUEUE,
    shards: int = 1,
) -> Streams:
    """The input and output streams and the failure queue, as the stream construct creates them."""
    existing = set(kinesis.list_streams().get("StreamNames", []))
    for name in (records, results):
        if name not in existing:
            kinesis.create_stream(StreamName=name, ShardCount=shards)
    arn = kinesis.describe_stream_summary(StreamName=records)["StreamDescriptionSummary"]["StreamARN"]
    return Streams(records, arn, results, sqs.create_queue(QueueName=failures)["QueueUrl"])


def kinesis_event(records: list[dict[str, Any]], shard_id: str, stream_arn: str) -> dict[str, Any]:
    """Lambda's Kinesis event for records from GetRecords."""
    return {
        "Records": [
            {
                "kinesis": {
                    "kinesisSchemaVersion": "1.0",
                    "partitionKey": r["PartitionKey"],
                    "sequenceNumber": r["SequenceNumber"],
                    "data": base64.b64encode(r["Data"]).decode(),
                    "approximateArrivalTimestamp": r["ApproximateArrivalTimestamp"].timestamp(),
                },
                "eventSource": "aws:kinesis",
                "eventVersion": "1.0",
                "eventID": f"{shard_id}:{r['SequenceNumber']}",
                "eventName": "aws:kinesis:record",
                "invokeIdentityArn": "arn:aws:iam::000000000000:role/tierserve-local-stream",
                "awsRegion": REGION,
                "eventSourceARN": stream_arn,
            }
            for r in records
        ]
    }


@dataclass(frozen=True)
class StreamPollResult:
    received: int
    invocations: int
    failed_batches: int  # batches whose retries ran out (sent to the failure queue)


class StreamPoller:
    """Read each shard's records in order and hand them to ``handler`` as Lambda's Kinesis
    event source mapping does, with partial batch responses, bisection on error, at most
    ``max_retry_attempts`` retries, and the failure queue as the on-failure destination."""

    def __init__(
        self,
        kinesis: Any,
        sqs: Any,
        streams: Streams,
        handler: LambdaHandler,
        *,
        batch_size: int = STREAM_BATCH_SIZE,
        max_retry_attempts: int = MAX_RETRY_ATTEMPTS,
        bisect_on_error: bool = True,
        retry_delay_s: float = RETRY_DELAY_S,
        timeout_ms: int = 60_000,
        starting_position: str = "TRIM_HORIZON",
    ) -> None:
        self.kinesis, self.sqs, self.streams, self.handler = kinesis, sqs, streams, handler
        self.batch_size, self.max_retry_attempts = batch_size, max_retry_attempts
        self.bisect_on_error, self.retry_delay_s, self.timeout_ms = bisect_on_error, retry_delay_s, timeout_ms
        shards = kinesis.list_shards(StreamName=streams.records)["Shards"]
        self._iterators = {
            s["ShardId"]: kinesis.get_shard_iterator(
                StreamName=streams.records, ShardId=s["ShardId"], ShardIteratorType=starting_position
            )["ShardIterator"]
            for s in shards
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> StreamPollResult:
        """One GetRecords per shard, each batch delivered (with its retries) before the next."""
        received = invocations = failed = 0
        for shard_id, iterator in list(self._iterators.items()):
            answer = self.kinesis.get_records(ShardIterator=iterator, Limit=self.batch_size)
            self._iterators[shard_id] = answer["NextShardIterator"]
            records = answer.get("Records", [])
            if records:
                received += len(records)
                calls, exhausted = self._deliver(shard_id, records)
                invocations, failed = invocations + calls, failed + exhausted
        return StreamPollResult(received, invocations, failed)

    def _deliver(self, shard_id: str, records: list[dict[str, Any]]) -> tuple[int, int]:
        pending = [records]  # the batch, or the halves it was split into, in order
        calls = exhausted = 0
        while pending:
            batch, retries = pending.pop(0), 0
            while batch:
                calls += 1
                first_failed, raised = self._invoke(shard_id, batch)
                if first_failed is None:
                    break
                batch = batch[first_failed:]
                retries += 1
                if retries > self.max_retry_attempts:
                    self._send_to_failure_destination(shard_id, batch, calls, raised)
                    exhausted += 1
                    break
                if raised and self.bisect_on_error and len(batch) > 1:
                    half = len(batch) // 2
                    pending.insert(0, batch[half:])
                    batch, retries = batch[:half], 0
                time.sleep(self.retry_delay_s)
        return calls, exhausted

    def _invoke(self, shard_id: str, batch: list[dict[str, Any]]) -> tuple[int | None, bool]:
        """The index of the first record to retry (None: all done), and whether the handler raised."""
        context = LocalLambdaContext(function_name="tierserve-local-stream", timeout_ms=self.timeout_ms)
        try:
            response = self.handler(kinesis_event(batch, shard_id, self.streams.records_arn), context) or {}
        except Exception:
            logger.warning("the stream handler failed the whole batch; it is retried", exc_info=True)
            return 0, True
        failed = {f.get("itemIdentifier") for f in response.get("batchItemFailures") or []}
        for index, record in enumerate(batch):
            if record["SequenceNumber"] in failed:
                return index, False
        return None, False

    def _send_to_failure_destination(
        self, shard_id: str, batch: list[dict[str, Any]], invocations: int, raised: bool
    ) -> None:
        """What Lambda sends an SQS on-failure destination for a stream: where the batch was."""
        arrivals = [
            r["ApproximateArrivalTimestamp"].astimezone(UTC).isoformat() for r in (batch[0], batch[-1])
        ]
        message = {
            "requestContext": {
                "requestId": str(uuid.uuid4()),
                "functionArn": LOCAL_FUNCTION_ARN,
                "condition": "RetryAttemptsExhausted",
                "approximateInvokeCount": invocations,
            },
            "responseContext": {
                "statusCode": 200,
                "executedVersion": "$LATEST",
                **({"functionError": "Unhandled"} if raised else {}),
            },
            "version": "1.0",
            "timestamp": datetime.now(UTC).isoformat(),
            "KinesisBatchInfo": {
                "shardId": shard_id,
                "startSequenceNumber": batch[0]["SequenceNumber"],
                "endSequenceNumber": batch[-1]["SequenceNumber"],
                "approximateArrivalOfFirstRecord": arrivals[0],
                "approximateArrivalOfLastRecord": arrivals[1],
                "batchSize": len(batch),
                "streamArn": self.streams.records_arn,
            },
        }
        logger.warning(
            "stream records kept failing: their position goes to the failure queue and the shard moves on",
            extra={"shard": shard_id, "first": batch[0]["SequenceNumber"], "records": len(batch)},
        )
        self.sqs.send_message(QueueUrl=self.streams.failures_url, MessageBody=json.dumps(message))

    def start(self) -> StreamPoller:
        self._thread = threading.Thread(target=self._loop, name="tierserve-local-stream-poller", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.poll_once().received:
                    self._stop.wait(IDLE_WAIT_S)
            except Exception:
                if self._stop.is_set():
                    return
                logger.warning("polling the local stream failed; trying again", exc_info=True)
                self._stop.wait(1)

    def state(self) -> dict[str, str]:
        """What ``local stream`` reads from the state file."""
        return {
            "records_stream": self.streams.records,
            "results_stream": self.streams.results,
            "stream_failures_queue": self.streams.failures_url,
            "stream_model": LOCAL_STREAM_MODEL,
        }

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def start_local_streams(
    s3: EmbeddedS3,
    handler: LambdaHandler,
    *,
    state_dir: Path | None = None,
    max_retry_attempts: int = MAX_RETRY_ATTEMPTS,
) -> StreamPoller:
    """Create the streams and the failure queue in ``s3``'s server and start polling into
    ``handler`` (the stream worker). ``state_dir`` receives where to find them, for ``local stream``."""
    streams = create_streams(s3.client("kinesis"), s3.client("sqs"))
    poller = StreamPoller(
        s3.client("kinesis"), s3.client("sqs"), streams, handler, max_retry_attempts=max_retry_attempts
    ).start()
    if state_dir is not None:
        write_state(state_dir, {"pid": os.getpid(), "s3_endpoint": s3.endpoint, **poller.state()})
    return poller


# ---------------------------------------------------------------- tierserve local stream


def put_and_read(
    work_dir: Path, lines: Iterable[bytes], *, partition_key: str = "tierserve-local", timeout_s: float = 30
) -> list[dict[str, Any] | None]:
    """Put each of ``lines`` as a record of the running local stack's stream and read their
    results from its output stream; in the records' order, None for a result not seen in time.

    Raises:
        LocalStackNotRunning: no ``tierserve local`` with streams answers from ``work_dir``.
    """
    state = read_state(work_dir)
    if "records_stream" not in state:
        raise LocalStackNotRunning("the running `tierserve local` has no streams: restart it")
    kinesis = embedded_client(state["s3_endpoint"], "kinesis")
    try:
        readers = _latest_iterators(kinesis, state["results_stream"])
        records = [{"Data": line, "PartitionKey": partition_key} for line in lines]
        sequence_numbers: list[str] = []
        for start in range(0, len(records), 500):
            answer = kinesis.put_records(
                StreamName=state["records_stream"], Records=records[start : start + 500]
            )
            sequence_numbers += [entry["SequenceNumber"] for entry in answer["Records"]]
    except Exception as error:
        if not aws.classify(error).answered:
            raise LocalStackNotRunning(
                f"nothing answers at {state['s3_endpoint']}: is `tierserve local` running?"
            ) from None
        raise
    return read_results(kinesis, readers, sequence_numbers, timeout_s=timeout_s)


def _latest_iterators(kinesis: Any, stream: str) -> dict[str, str]:
    shards = kinesis.list_shards(StreamName=stream)["Shards"]
    return {
        s["ShardId"]: kinesis.get_shard_iterator(
            StreamName=stream, ShardId=s["ShardId"], ShardIteratorType="LATEST"
        )["ShardIterator"]
        for s in shards
    }


def read_results(
    kinesis: Any, iterators: dict[str, str], sequence_numbers: list[str], *, timeout_s: float
) -> list[dict[str, Any] | None]:
    """The result documents answering ``sequence_numbers``, read from the output stream's
    ``iterators`` on; the first one for each (a retried result can repeat)."""
    wanted = set(sequence_numbers)
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while wanted - set(found) and time.monotonic() < deadline:
        seen = 0
        for shard_id, iterator in list(iterators.items()):
            answer = kinesis.get_records(ShardIterator=iterator, Limit=1000)
            iterators[shard_id] = answer["NextShardIterator"]
            for record in answer.get("Records", []):
                seen += 1
                document = json.loads(record["Data"])
                sequence = (document.get("parameters") or {}).get("sequence_number")
                if sequence in wanted:
                    found.setdefault(sequence, document)
        if not seen:
            time.sleep(0.05)
    return [found.get(s) for s in sequence_numbers]
