"""Kinesis records as the stream worker reads them, and the result records it writes.

A record's data is one JSON document: a v2 infer request (an object with ``"inputs"``,
exactly what ``POST /v2/models/{model}/infer`` takes; outputs are always JSON), or one row
for the model (an object ``{input name: value}``, or for a single-input model the value
itself, without the batch dimension), as a line of a ``.jsonl`` input is. Both are validated
by the protocol's own checks, so a record, a file and an HTTP request get the same messages.

A result is the OIP response to the record (a row is a request of one row), or an error
document, like the S3 pipeline's, each with ``parameters`` naming the record it answers:
its ``sequence_number``, ``shard_id`` and ``partition_key``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tierserve.catalog import Manifest
from tierserve.errors import BadRequest, PayloadTooLarge, TierserveError, to_http
from tierserve.protocol import InferenceRequest, loads, parse_infer_request
from tierserve.s3_pipeline.formats import decoding, json_outputs, row_values, rows_request
from tierserve.settings import MAX_INPUT_MB_ENV


@dataclass(frozen=True)
class RecordId:
    """Where a record sits in its stream: what its result carries to say what it answers."""

    sequence_number: str
    shard_id: str
    partition_key: str

    def parameters(self) -> dict[str, str]:
        return {
            "sequence_number": self.sequence_number,
            "shard_id": self.shard_id,
            "partition_key": self.partition_key,
        }


def decode_record(data: bytes, manifest: Manifest, *, max_bytes: int) -> InferenceRequest:
    """The request one record's data holds.

    Raises:
        BadRequest: not JSON, not a request or a row, or not what the model takes.
        PayloadTooLarge: over ``max_bytes``.
    """
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            f"the record is {len(data):,} bytes, over the limit of {max_bytes:,} (the limit is {MAX_INPUT_MB_ENV})"
        )
    with decoding():
        try:
            value = loads(data)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest(
                "the record is not valid JSON: a record holds a v2 infer request or one row of the model's inputs"
            ) from None
        if isinstance(value, dict) and "inputs" in value:
            return json_outputs(parse_infer_request(data, None, manifest, max_bytes=max_bytes))
        single = manifest.inputs[0].name if len(manifest.inputs) == 1 else None
        row = row_values(value, "the record", single, [spec.name for spec in manifest.inputs])
        try:
            return rows_request([row], manifest)
        except BadRequest as error:
            raise BadRequest(f"the record: {error.message}") from None


def error_document(error: TierserveError, model_name: str, record: RecordId) -> dict[str, Any]:
    """The result of a record that cannot be served: the OIP error, the status the API would
    answer, and which record it answers."""
    status, payload = to_http(error)
    return {
        "error": payload["error"],
        "status": status,
        "model_name": model_name,
        "parameters": record.parameters(),
    }
