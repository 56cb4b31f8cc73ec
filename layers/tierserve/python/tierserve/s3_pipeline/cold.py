"""Inputs for a GPU-tier model with no copy running wait for it in the queue, never in the
dead-letter queue.

While a model's inference component has no copy (scaled to zero, or scaling out), SageMaker
refuses its invocations (:class:`~tierserve.errors.ModelStarting`), and a copy takes minutes
to start. An ordinary transient fault is reported as a batch item failure and SQS delivers it
again after the queue's visibility timeout, counting a receive each time, until
``maxReceiveCount`` moves it to the dead-letter queue: a cold model would dead-letter every
file uploaded while it starts. So a delivery that meets a cold model is handled here:

    delivery n that met no capacity (n counts the cold deliveries of the message and its copies)
      ├─ receives left before the DLQ: ChangeMessageVisibility(delay(n)), the item reported
      │    failed: SQS delivers it again after the delay
      └─ the last receive maxReceiveCount allows: SendMessage(a copy,
           DelaySeconds=delay(n)), the item reported done: SQS deletes this one, and the copy
           starts again at zero receives

    delay(n) = min(first_delay_s * 2**(n-1), 300 s)

so a file is tried again at least every 5 minutes for as long as the queue keeps messages
(its retention), and served once a copy is running. The cap is under the idle period after
which a copy scales in (``gpu_scale_in_idle_minutes``, 10): a waiting file comes back before
the copy its own refused call woke goes idle again (refused calls count as activity). Each such delivery counts
``PipelineColdWaits``. A queue without a redrive policy only ever has its visibility set. Where
a call to SQS fails (the redrive policy cannot be read, or either call is refused), the item is
reported failed as any transient fault is (SQS delivers it again after the visibility timeout). The worker's role needs
``sqs:ChangeMessageVisibility``, ``sqs:GetQueueAttributes`` and ``sqs:SendMessage`` on its
queue (``infra/s3_pipeline.py`` grants them).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tierserve import aws
from tierserve.errors import ModelStarting
from tierserve.s3_pipeline.settings import DEFAULT_COLD_RETRY_S
from tierserve.telemetry import PIPELINE_COLD_WAITS, logger, record_count

# A message attribute on the copies: the cold deliveries of the messages before them.
COLD_DELIVERIES_ATTRIBUTE = "tierserve-cold-deliveries"
# How long a cold file waits at most between tries: within SendMessage's DelaySeconds (900)
# and under a copy's idle period before it scales in (gpu_scale_in_idle_minutes, 10 by default).
MAX_DELAY_S = 300


@dataclass(frozen=True)
class Delivery:
    """One delivery of an SQS message to the worker, as Lambda's event describes it."""

    message_id: str
    receipt_handle: str
    body: str
    queue_arn: str
    receive_count: int
    cold_before: int = 0  # cold deliveries of the messages this one is a copy of

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Delivery:
        """From one record of Lambda's SQS event (or the local poller's, which is the same)."""
        attributes = record.get("attributes") or {}
        message_attributes = record.get("messageAttributes") or {}
        cold = message_attributes.get(COLD_DELIVERIES_ATTRIBUTE) or {}
        return cls(
            message_id=str(record.get("messageId", "")),
            receipt_handle=str(record.get("receiptHandle", "")),
            body=str(record.get("body", "")),
            queue_arn=str(record.get("eventSourceARN", "")),
            receive_count=_whole(attributes.get("ApproximateReceiveCount"), 1),
            # Lambda spells it stringValue; ReceiveMessage (the local poller) StringValue.
            cold_before=_whole(cold.get("stringValue", cold.get("StringValue")), 0),
        )

    @property
    def cold_deliveries(self) -> int:
        """This delivery's rank among the cold ones of the message and its copies (1 first)."""
        return self.cold_before + self.receive_count


class ColdModelWait:
    """What the worker does with a delivery that met a model with no copy running (see the
    module docstring). ``first_delay_s`` is the first wait (``TIERSERVE_COLD_RETRY_S``)."""

    def __init__(
        self,
        first_delay_s: float = DEFAULT_COLD_RETRY_S,
        *,
        sqs_client_factory: Callable[[], Any] = lambda: aws.client("sqs"),
    ) -> None:
        self.first_delay_s = first_delay_s
        self._sqs = sqs_client_factory
        self._receive_limits: dict[str, int | None] = {}
        self._lock = threading.Lock()

    def delay_s(self, cold_deliveries: int) -> int:
        """How long the ``cold_deliveries``-th cold delivery waits before the next try."""
        exponent = min(max(cold_deliveries - 1, 0), 20)
        return int(min(MAX_DELAY_S, round(self.first_delay_s * 2**exponent)))

    def defer(self, delivery: Delivery, error: ModelStarting) -> bool:
        """Make ``delivery`` come back once the model may be running. True: a copy was queued,
        report the item done; False: report it failed (its visibility was set, or SQS could
        not be reached and it comes back as any transient fault does)."""
        delay = self.delay_s(delivery.cold_deliveries)
        record_count(PIPELINE_COLD_WAITS)
        try:
            url = self.queue_url(delivery.queue_arn)
            limit = self.receive_limit(url)
            if limit is None or delivery.receive_count < limit:
                self._sqs().change_message_visibility(
                    QueueUrl=url, ReceiptHandle=delivery.receipt_handle, VisibilityTimeout=delay
                )
                self._log(
                    "the model has no copy running: the input waits in the queue", delivery, delay, error
                )
                return False
            self._sqs().send_message(
                QueueUrl=url,
                MessageBody=delivery.body,
                DelaySeconds=delay,
                MessageAttributes={
                    COLD_DELIVERIES_ATTRIBUTE: {
                        "DataType": "Number",
                        "StringValue": str(delivery.cold_deliveries),
                    }
                },
            )
        except Exception as failure:
            logger.warning(
                "the model has no copy running, and SQS could not be told to wait: the input comes "
                "back after the queue's visibility timeout",
                extra={"message_id": delivery.message_id, "error": aws.bounded_text(failure)},
            )
            return False
        self._log(
            "the model has no copy running: the input waits in the queue as a new message",
            delivery,
            delay,
            error,
        )
        return True

    def is_last_receive(self, delivery: Delivery) -> bool:
        """Whether the queue dead-letters ``delivery`` if it fails now (the worker then gives up
        on a transient fault: :meth:`Pipeline.give_up`). False for a queue without a redrive
        policy; asked of SQS once per queue, as :meth:`defer` does."""
        limit = self.receive_limit(self.queue_url(delivery.queue_arn))
        return limit is not None and delivery.receive_count >= limit

    def queue_url(self, queue_arn: str) -> str:
        """The queue's URL from its ARN (``arn:aws:sqs:region:account:name``), on the client's endpoint."""
        parts = queue_arn.split(":")
        if len(parts) != 6 or parts[2] != "sqs":
            raise ValueError(f"not an SQS queue ARN: {aws.bounded_text(queue_arn)}")
        endpoint = str(self._sqs().meta.endpoint_url).rstrip("/")
        return f"{endpoint}/{parts[4]}/{parts[5]}"

    def receive_limit(self, url: str) -> int | None:
        """The queue's ``maxReceiveCount`` (None: no dead-letter queue), asked once per queue."""
        with self._lock:
            if url in self._receive_limits:
                return self._receive_limits[url]
        attributes = self._sqs().get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])
        policy = (attributes.get("Attributes") or {}).get("RedrivePolicy")
        limit = _whole(json.loads(policy).get("maxReceiveCount"), 1) if policy else None
        with self._lock:
            self._receive_limits[url] = limit
        return limit

    @staticmethod
    def _log(message: str, delivery: Delivery, delay: int, error: ModelStarting) -> None:
        logger.info(
            message,
            extra={
                "message_id": delivery.message_id,
                "cold_deliveries": delivery.cold_deliveries,
                "retry_in_s": delay,
                "reason": error.message,
            },
        )


def _whole(value: Any, default: int) -> int:
    try:
        return max(int(str(value)), 0)
    except (TypeError, ValueError):
        return default
