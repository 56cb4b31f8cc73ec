"""The S3 worker's wait for a GPU-tier model with no copy running (tierserve.s3_pipeline.cold):
the backoff, what a delivery says about itself, and SQS that cannot be reached."""

from __future__ import annotations

from tierserve import aws
from tierserve.errors import ModelStarting
from tierserve.s3_pipeline.cold import COLD_DELIVERIES_ATTRIBUTE, MAX_DELAY_S, ColdModelWait, Delivery

QUEUE_ARN = "arn:aws:sqs:us-east-1:000000000000:tierserve-inputs"


def test_the_wait_doubles_from_the_first_and_stops_at_5_minutes():
    wait = ColdModelWait(60)
    assert [wait.delay_s(n) for n in range(1, 7)] == [60, 120, 240, 300, 300, 300]
    assert wait.delay_s(10_000) == MAX_DELAY_S == 300
    assert ColdModelWait(0).delay_s(5) == 0


def test_a_delivery_counts_its_receives_and_those_of_the_copies_before_it():
    record = {
        "messageId": "m-1",
        "receiptHandle": "r-1",
        "body": "{}",
        "eventSourceARN": QUEUE_ARN,
        "attributes": {"ApproximateReceiveCount": "2"},
    }
    first = Delivery.from_record(record)
    assert (first.receive_count, first.cold_before, first.cold_deliveries) == (2, 0, 2)
    # Lambda spells the attribute's value stringValue, ReceiveMessage StringValue.
    lambda_copy = {**record, "messageAttributes": {COLD_DELIVERIES_ATTRIBUTE: {"stringValue": "4"}}}
    polled_copy = {**record, "messageAttributes": {COLD_DELIVERIES_ATTRIBUTE: {"StringValue": "4"}}}
    assert Delivery.from_record(lambda_copy).cold_deliveries == 6
    assert Delivery.from_record(polled_copy).cold_deliveries == 6
    hostile = {**record, "attributes": {"ApproximateReceiveCount": "many"}, "messageAttributes": {}}
    assert Delivery.from_record(hostile).receive_count == 1


def test_the_queue_url_comes_from_its_arn_on_the_clients_endpoint():
    wait = ColdModelWait(
        sqs_client_factory=lambda: aws.new_client(
            "sqs", endpoint_url="http://127.0.0.1:4566", region_name="us-east-1"
        )
    )
    assert wait.queue_url(QUEUE_ARN) == "http://127.0.0.1:4566/000000000000/tierserve-inputs"


def test_sqs_that_cannot_be_reached_leaves_the_item_failed_as_any_fault(monkeypatch):
    # Nothing listens on port 9: the item is reported failed and comes back after the
    # queue's visibility timeout, as any transient fault does.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    wait = ColdModelWait(
        sqs_client_factory=lambda: aws.new_client(
            "sqs",
            endpoint_url="http://127.0.0.1:9",
            aws_access_key_id="x",
            aws_secret_access_key="x",
            region_name="us-east-1",
        )
    )
    delivery = Delivery("m-1", "r-1", "{}", QUEUE_ARN, receive_count=1)
    assert wait.defer(delivery, ModelStarting("starting", retry_after_s=60)) is False
