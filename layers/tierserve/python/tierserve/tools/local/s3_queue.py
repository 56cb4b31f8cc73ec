"""S3-triggered inference on the local stack, all inside the embedded moto server:

    s3://tierserve-data/inputs/...  --ObjectCreated-->  SQS tierserve-inputs  --3 receives-->  tierserve-inputs-dlq
                                                               |
                       QueuePoller: what Lambda's SQS event source mapping does: long-poll,
                       hand a batch to the real worker handler, delete what it did not report
                       as failed (``ReportBatchItemFailures``); failures come back after the
                       visibility timeout.

``tierserve local`` starts it next to the local API; ``tierserve local put FILE --model M``
drops a file into ``inputs/`` and waits for its result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierserve import aws
from tierserve.jobs.keys import input_suffixes
from tierserve.s3_pipeline import META_INPUT_ETAG, InputKey
from tierserve.settings import ERROR_PREFIX, INPUT_PREFIX, JOBS_PREFIX, OUTPUT_PREFIX
from tierserve.telemetry import logger
from tierserve.tools.local.apigw import LocalLambdaContext
from tierserve.tools.local.embedded_s3 import LOCAL_CREDENTIALS, EmbeddedS3, embedded_client
from tierserve.tools.local.state import LocalStackNotRunning, running_stack, write_state

DATA_BUCKET = "tierserve-data"
QUEUE_NAME = "tierserve-inputs"
DLQ_NAME = "tierserve-inputs-dlq"
MAX_RECEIVE_COUNT = 3
VISIBILITY_TIMEOUT_S = 3  # short locally, so a failed message comes back quickly
SQS_BATCH_SIZE = 10
POLL_WAIT_S = 2  # long polling, as Lambda's event source mapping does
REGION = LOCAL_CREDENTIALS["AWS_DEFAULT_REGION"]

LambdaHandler = Callable[[dict[str, Any], Any], dict[str, Any]]


@dataclass(frozen=True)
class Queues:
    url: str
    arn: str
    dlq_url: str
    dlq_arn: str


def create_resources(
    s3: Any,
    sqs: Any,
    *,
    bucket: str = DATA_BUCKET,
    queue_name: str = QUEUE_NAME,
    dlq_name: str = DLQ_NAME,
    max_receive_count: int = MAX_RECEIVE_COUNT,
    visibility_timeout_s: int = VISIBILITY_TIMEOUT_S,
) -> Queues:
    """The data bucket, the queue with its redrive policy and DLQ, and the bucket's
    notification (``s3:ObjectCreated:*`` under ``inputs/``, and jobs' inputs: ``jobs/`` with
    each ``/input.{ext}`` suffix) to the queue, as the pipeline construct creates them in AWS. S3 sends an ``s3:TestEvent`` first."""
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        s3.create_bucket(Bucket=bucket)
    dlq_url = sqs.create_queue(QueueName=dlq_name)["QueueUrl"]
    dlq_arn = _queue_arn(sqs, dlq_url)
    redrive = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}
    url = sqs.create_queue(
        QueueName=queue_name,
        Attributes={"VisibilityTimeout": str(visibility_timeout_s), "RedrivePolicy": json.dumps(redrive)},
    )["QueueUrl"]
    arn = _queue_arn(sqs, url)
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "Id": "tierserve-inputs",
                    "QueueArn": arn,
                    "Events": ["s3:ObjectCreated:*"],
                    "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": f"{INPUT_PREFIX}/"}]}},
                },
                *(
                    {
                        "Id": f"tierserve-jobs{suffix.replace('/', '-').replace('.', '-')}",
                        "QueueArn": arn,
                        "Events": ["s3:ObjectCreated:*"],
                        "Filter": {
                            "Key": {
                                "FilterRules": [
                                    {"Name": "prefix", "Value": f"{JOBS_PREFIX}/"},
                                    {"Name": "suffix", "Value": suffix},
                                ]
                            }
                        },
                    }
                    for suffix in input_suffixes()
                ),
            ]
        },
    )
    return Queues(url, arn, dlq_url, dlq_arn)


def _queue_arn(sqs: Any, url: str) -> str:
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


def sqs_event(messages: list[Mapping[str, Any]], queue_arn: str) -> dict[str, Any]:
    """Lambda's SQS event for messages from ReceiveMessage."""
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": dict(m.get("Attributes") or {}),
                "messageAttributes": dict(m.get("MessageAttributes") or {}),
                "md5OfBody": m.get("MD5OfBody")
                or hashlib.md5(m["Body"].encode(), usedforsecurity=False).hexdigest(),
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": REGION,
            }
            for m in messages
        ]
    }


@dataclass(frozen=True)
class PollResult:
    received: int
    failed: int


class QueuePoller:
    """Receive from the queue, invoke ``handler`` with a batch, delete the messages it did not
    report as failed. A handler that raises fails the whole batch, as in Lambda."""

    def __init__(
        self,
        sqs: Any,
        queues: Queues,
        handler: LambdaHandler,
        *,
        batch_size: int = SQS_BATCH_SIZE,
        wait_s: int = 1,
        timeout_ms: int = 60_000,
    ) -> None:
        self.sqs, self.queues, self.handler = sqs, queues, handler
        self.batch_size, self.wait_s, self.timeout_ms = batch_size, wait_s, timeout_ms
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self, wait_s: int | None = None) -> PollResult:
        """One receive (waiting up to ``wait_s``, default the poller's) and its batch handed to
        the handler."""
        messages = self.sqs.receive_message(
            QueueUrl=self.queues.url,
            MaxNumberOfMessages=self.batch_size,
            WaitTimeSeconds=self.wait_s if wait_s is None else wait_s,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        ).get("Messages", [])
        if not messages:
            return PollResult(0, 0)
        context = LocalLambdaContext(function_name="tierserve-local-worker", timeout_ms=self.timeout_ms)
        try:
            response = self.handler(sqs_event(messages, self.queues.arn), context) or {}
            failed = {f["itemIdentifier"] for f in response.get("batchItemFailures", [])}
        except Exception:
            logger.warning("the worker failed the whole batch; SQS will redeliver it", exc_info=True)
            failed = {m["MessageId"] for m in messages}
        done = [m for m in messages if m["MessageId"] not in failed]
        for start in range(0, len(done), 10):
            entries = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                for i, m in enumerate(done[start : start + 10])
            ]
            self.sqs.delete_message_batch(QueueUrl=self.queues.url, Entries=entries)
        return PollResult(len(messages), len(failed))

    def start(self) -> QueuePoller:
        """Poll once here (a queue or a handler that cannot work fails the caller), then keep
        polling on a background thread."""
        self.poll_once(wait_s=0)
        self._thread = threading.Thread(target=self._loop, name="tierserve-local-poller", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:
                if self._stop.is_set():
                    return
                logger.warning("polling the local queue failed; trying again", exc_info=True)
                self._stop.wait(1)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.wait_s + 5)


@dataclass
class LocalPipeline:
    queues: Queues
    poller: QueuePoller
    bucket: str = DATA_BUCKET

    def stop(self) -> None:
        self.poller.stop()

    def state(self) -> dict[str, str]:
        """What ``local put`` reads from the state file."""
        return {"data_bucket": self.bucket, "queue_url": self.queues.url}


def start_local_pipeline(
    s3: EmbeddedS3, handler: LambdaHandler, *, state_dir: Path | None = None
) -> LocalPipeline:
    """Create the data bucket, queues and notification in ``s3`` and start polling into
    ``handler`` (the worker); returns once the first poll went through. ``state_dir`` records
    where to find them, for ``local put``, in a harness that runs the pipeline alone (the
    local stack records all its services itself, last)."""
    queues = create_resources(s3.client(), s3.client("sqs"))
    # moto's server logs every request through werkzeug; a poll every few seconds would bury
    # the useful lines. Warnings and errors still show.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    poller = QueuePoller(s3.client("sqs"), queues, handler, wait_s=POLL_WAIT_S).start()
    pipeline = LocalPipeline(queues, poller)
    if state_dir is not None:
        write_state(state_dir, {"pid": os.getpid(), "s3_endpoint": s3.endpoint, **pipeline.state()})
    return pipeline


def put_and_wait(
    work_dir: Path, file: Path, *, model: str, path: str | None = None, timeout_s: float = 60
) -> tuple[str, dict[str, Any] | None, str]:
    """Put ``file`` at ``inputs/{model}/{path}`` of the running local stack and wait for its
    result. Returns ``(status, document, result key)``: status ``output``, ``error`` or ``timeout``.

    Raises:
        LocalStackNotRunning: no ``tierserve local`` answers from ``work_dir``.
    """
    state = running_stack(work_dir)
    client = embedded_client(state["s3_endpoint"])
    key = InputKey(model, path or file.name)
    bucket = state["data_bucket"]
    try:
        put = client.put_object(
            Bucket=bucket, Key=f"{INPUT_PREFIX}/{key.model}/{key.path}", Body=file.read_bytes()
        )
    except Exception as error:
        if not aws.classify(error).answered:
            raise LocalStackNotRunning(
                f"nothing answers at {state['s3_endpoint']}: is `tierserve local` running?"
            ) from None
        raise
    etag = put["ETag"].strip('"')
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for kind, status in ((OUTPUT_PREFIX, "output"), (ERROR_PREFIX, "error")):
            result_key = key.result_key(kind)
            try:
                head = client.head_object(Bucket=bucket, Key=result_key)
            except Exception as error:
                if aws.classify(error).kind == "gone":
                    continue
                raise
            if head.get("Metadata", {}).get(META_INPUT_ETAG) == etag:
                body = client.get_object(Bucket=bucket, Key=result_key)["Body"].read()
                return status, json.loads(body), f"s3://{bucket}/{result_key}"
        time.sleep(0.2)
    return "timeout", None, f"s3://{bucket}/{key.result_key(OUTPUT_PREFIX)}"
