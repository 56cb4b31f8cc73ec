"""S3 event notifications as the S3 pipeline reads them: which objects an SQS message
announces, how an input key names its model and its results, and how S3 orders versions.

Records are read through powertools' :class:`~aws_lambda_powertools.utilities.data_classes.S3Event`;
on top of it: the ``s3:TestEvent`` S3 sends when a notification is configured, S3 -> SNS -> SQS
envelopes, and poison messages (anything that is no S3 event at all).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote_plus

from aws_lambda_powertools.utilities.data_classes import S3Event
from aws_lambda_powertools.utilities.data_classes.s3_event import S3EventRecord

from tierserve.settings import INPUT_PREFIX, JOB_INPUT_NAME, JOB_RESULT_NAMES, JOBS_PREFIX, OUTPUT_PREFIX
from tierserve.telemetry import logger

RESULT_SUFFIX = ".json"
TEST_EVENT = "s3:TestEvent"
MAX_KEY_BYTES = 1024

ResultKind = Literal["outputs", "errors"]


class PoisonMessage(Exception):
    """A message that can never succeed (not an S3 event, or a key that cannot name a result).

    The worker reports it as failed, so SQS moves it to the dead-letter queue; nothing is written.
    """


@dataclass(frozen=True)
class S3Object:
    """One ``ObjectCreated`` record: which object, and which version of it."""

    bucket: str
    key: str
    size: int = 0
    etag: str | None = None
    version_id: str | None = None
    sequencer: str | None = None
    principal: str | None = None  # who put the object (the record's userIdentity), for the audit


def parse_message(body: str) -> list[S3Object]:
    """The S3 objects an SQS message body announces (S3 -> SQS, or S3 -> SNS -> SQS).

    An ``s3:TestEvent`` announces nothing; records other than ``ObjectCreated:*`` are
    ignored. Keys arrive URL-encoded (a space as ``+``) and are decoded here.

    Raises:
        PoisonMessage: the body is not an S3 event notification.
    """
    document = _json_object(body)
    if document.get("Type") == "Notification" and isinstance(document.get("Message"), str):
        document = _json_object(document["Message"])  # one SNS envelope, never more
    if document.get("Event") == TEST_EVENT:
        return []
    if not isinstance(document.get("Records"), list) or not document["Records"]:
        raise PoisonMessage('the message has no "Records": not an S3 event notification')
    objects = []
    for record in S3Event(document).records:
        try:
            if record.get("eventSource") != "aws:s3":
                raise PoisonMessage(f"record from {record.get('eventSource')!r}, not aws:s3")
            event_name = str(record.get("eventName") or "")
            if not event_name.startswith("ObjectCreated:"):
                logger.info("ignoring an S3 event that creates nothing", extra={"event": event_name})
                continue
            objects.append(_created(record))
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise PoisonMessage(f"an S3 record without {error}: not an S3 event notification") from None
    return objects


def _json_object(body: str) -> dict:
    try:
        document = json.loads(body)
    except (TypeError, ValueError, RecursionError):
        raise PoisonMessage("the message body is not JSON, so not an S3 event notification") from None
    if not isinstance(document, dict):
        raise PoisonMessage("the message body is not a JSON object, so not an S3 event notification")
    return document


def _created(record: S3EventRecord) -> S3Object:
    item = record.s3.get_object
    return S3Object(
        bucket=str(record.s3.bucket.name),
        key=unquote_plus(str(item.key)),
        size=int(item.get("size") or 0),
        etag=str(item.etag).strip('"') or None,
        version_id=str(item.version_id) if item.version_id else None,
        sequencer=str(item["sequencer"]) if item.get("sequencer") else None,
        principal=_principal(record),
    )


def _principal(record: S3EventRecord) -> str | None:
    identity = record.get("userIdentity")
    principal = identity.get("principalId") if isinstance(identity, dict) else None
    return str(principal) if principal else None


@dataclass(frozen=True)
class InputKey:
    """``inputs/{model}/{path}`` split into its model and path, and where its results go.

    A job's input (``jobs/{model}/{caller}/{id}/{version}/input.{ext}``, see
    :mod:`tierserve.jobs.keys`) has ``root`` ``jobs/`` and names the ``version`` that serves it
    (None: the deployed one); its results are ``output.json`` and ``error.json`` beside it."""

    model: str
    path: str
    version: str | None = None
    root: str = ""

    @property
    def format(self) -> str:
        dot = self.path.rfind(".")
        return self.path[dot:].lower() if dot > self.path.rfind("/") else ""

    def result_key(self, kind: ResultKind) -> str:
        if self.root:
            folder = self.path.rsplit("/", 1)[0]
            return f"{self.root}{self.model}/{folder}/{JOB_RESULT_NAMES[kind]}"
        return f"{kind}/{self.model}/{self.path}{RESULT_SUFFIX}"


def parse_input_key(key: str) -> InputKey | None:
    """The model and path of an input key; None for keys that are not inputs (outside
    ``inputs/``, or a folder marker ending in ``/``).

    Raises:
        PoisonMessage: the key has ``..``, ``.`` or empty parts, no path, or is too long
            for its result key; no result can be named for it.
    """
    parts = key.split("/")
    if parts[0] == JOBS_PREFIX:
        return _job_input_key(key, parts)
    if parts[0] != INPUT_PREFIX or key.endswith("/"):
        return None
    if len(parts) < 3 or any(part in ("", ".", "..") for part in parts):
        raise PoisonMessage(
            f"input key {key!r} must be {INPUT_PREFIX}/{{model}}/{{path}} without empty, '.' or '..' parts"
        )
    parsed = InputKey(parts[1], "/".join(parts[2:]))
    if len(parsed.result_key(OUTPUT_PREFIX).encode()) > MAX_KEY_BYTES:
        raise PoisonMessage(f"input key {key[:80]!r}... is too long to name its output (1,024 bytes at most)")
    return parsed


# jobs/{model}/{caller}/{id}/{version}/input.{ext}; beside it output.json or error.json
JOB_INPUT_PARTS = 6


def _job_input_key(key: str, parts: list[str]) -> InputKey | None:
    """A job's input key; None for a job's other objects (its record, its results)."""
    if not parts[-1].startswith(f"{JOB_INPUT_NAME}."):
        return None
    if len(parts) != JOB_INPUT_PARTS or any(part in ("", ".", "..") for part in parts):
        raise PoisonMessage(
            f"job input key {key[:200]!r} must be {JOBS_PREFIX}/{{model}}/{{caller}}/{{id}}/{{version}}/"
            "input.{ext}, as the jobs route names it"
        )
    return InputKey(parts[1], "/".join(parts[2:]), version=parts[4], root=f"{JOBS_PREFIX}/")


def compare_sequencers(a: str, b: str) -> int:
    """Order two S3 ``sequencer`` values of one key: -1, 0 or 1.

    As S3 documents it: hexadecimal strings, possibly of different lengths; pad the shorter
    on the right with zeros, then compare lexicographically.
    """
    width = max(len(a), len(b))
    left, right = a.upper().ljust(width, "0"), b.upper().ljust(width, "0")
    return (left > right) - (left < right)
