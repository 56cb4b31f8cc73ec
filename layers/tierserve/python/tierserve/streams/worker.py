"""The stream worker's orchestration: a Kinesis batch of records to result records, in order.

Transport-free: the Lambda handler (``functions/inference/stream.py``) and the local poller
hand it the batches Kinesis' event source mapping delivers, one shard's records in order.
Powertools' batch processor for Kinesis runs :meth:`StreamBatch.serve` on each record and
builds the partial batch response; :meth:`StreamBatch.finish` writes the results and adds
the records whose results could not be written. For every record, one of:

- **result**: the model ran; the OIP response, with ``parameters`` naming the record
  (``sequence_number``, ``shard_id``, ``partition_key``), goes to the output stream under the
  record's partition key.
- **error result**: the record cannot be served (not JSON, not what the model takes, too
  large); an error document naming the record goes to the output stream in its place.
  Retrying would not help, so the record is done: a bad record never blocks its shard.
- **failed**: a transient fault (the GPU endpoint or the output stream unavailable or slow,
  the invocation's time running out). The record and every record after it in the batch are
  reported in ``batchItemFailures`` (none of them is served), so Kinesis' event source mapping
  retries from that record: results stay in the shard's order. After the mapping's
  ``MaximumRetryAttempts`` the batch's position goes to the on-failure destination and the
  shard moves on.

Results of a shard are written in its order (PutRecords keeps a request's order per
partition key). A write that fails part-way fails its record and all after it; the ones
after it that did get written are written again by the retry: a result is written at least
once, and carries its record's sequence number to tell repeats apart.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aws_lambda_powertools.utilities.data_classes.kinesis_stream_event import KinesisStreamRecord

from tierserve import aws
from tierserve.errors import TierserveError, UpstreamUnavailable, is_retryable
from tierserve.protocol import dumps, encode_infer_response
from tierserve.registry import ModelRegistry
from tierserve.s3_pipeline import Pipeline, PipelineSettings
from tierserve.s3_pipeline.formats import with_parameters
from tierserve.settings import STREAM_MODEL_ENV, ModelRef, Settings, SettingsError
from tierserve.streams.records import RecordId, decode_record, error_document
from tierserve.streams.settings import StreamSettings
from tierserve.telemetry import INFERENCE_MS, logger, record_count, record_ms, stopwatch

STREAM_RESULT = "StreamResult"
STREAM_ERROR = "StreamError"
# PutRecords takes at most 500 records and 5 MiB a call.
PUT_RECORDS_MAX = 500
PUT_RECORDS_MAX_BYTES = 5 * 1024 * 1024


class EarlierRecordFailed(UpstreamUnavailable):
    """A record after one that failed in the same batch: not served, so the shard's results
    stay in order; the retry from the failed record serves it."""


class StreamWorker:
    """Serve Kinesis records with the model ``settings.model`` names, through the S3 pipeline's
    model plumbing (a warm session, or the model's GPU endpoint), and write the results to
    ``settings.output_stream``."""

    def __init__(
        self,
        pipeline: Pipeline,
        settings: StreamSettings,
        *,
        kinesis_client_factory: Callable[[], Any] = lambda: aws.client("kinesis"),
    ) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self._kinesis = kinesis_client_factory
        self.model_ref = self._served_model(pipeline.registry, settings.model)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StreamWorker:
        """The stream worker's settings, read once; nothing touches AWS until the first batch.

        Raises:
            SettingsError: a bad variable, or no model to serve.
        """
        pipeline = Pipeline(ModelRegistry(Settings.from_env(environ)), PipelineSettings.from_env(environ))
        return cls(pipeline, StreamSettings.from_env(environ))

    @staticmethod
    def _served_model(registry: ModelRegistry, name: str | None) -> ModelRef:
        models = registry.settings.models
        if name is None:
            if len(models) != 1:
                served = ", ".join(str(m) for m in models) or "none"
                raise SettingsError(
                    f"{STREAM_MODEL_ENV} is unset and TIERSERVE_MODELS names {served}: set it to one of them"
                )
            return models[0]
        ref = registry.settings.model_ref(name)
        if ref is None:
            raise SettingsError(
                f"{STREAM_MODEL_ENV}={name!r} is not in TIERSERVE_MODELS; set it to one of them"
            )
        return ref

    def start(self, deadline: aws.Deadline | None = None) -> StreamBatch:
        """A batch: hand its records to :meth:`StreamBatch.serve` in order, then call :meth:`StreamBatch.finish`."""
        return StreamBatch(self, deadline)

    def serve(self, data: bytes, record: RecordId) -> bytes:
        """The result record for one record's data: the response, or the error document.

        Raises:
            TierserveError: a retryable fault (the record must be retried).
        """
        ref = self.model_ref
        try:
            manifest = self.pipeline.registry.manifest(ref)
            request = decode_record(data, manifest, max_bytes=self.pipeline.settings.max_input_bytes)
            model = self.pipeline.model_for(ref)
            with stopwatch() as elapsed:
                outputs = model.predict(request.inputs, request.output_names())
            record_ms(INFERENCE_MS, elapsed[0])
            encoded = encode_infer_response(request, outputs, model_name=ref.name, model_version=ref.version)
        except TierserveError as error:
            if is_retryable(error):
                raise
            record_count(STREAM_ERROR)
            logger.info(
                "record cannot be served; error result written",
                extra={**record.parameters(), "error": error.message},
            )
            return dumps(error_document(error, ref.name, record))
        record_count(STREAM_RESULT)
        return with_parameters(encoded.body, record.parameters())

    def write(self, results: Sequence[tuple[str, bytes]]) -> int:
        """Put ``(partition key, data)`` results to the output stream in order; the index of the
        first one that could not be written (``len(results)`` when all were).

        Raises nothing: a failed call fails the results from its first record on.
        """
        for start, chunk in _chunks(results):
            try:
                answer = self._kinesis().put_records(
                    StreamName=self.settings.output_stream,
                    Records=[{"Data": data, "PartitionKey": key} for key, data in chunk],
                )
            except Exception as error:
                failure = aws.classify(error)
                logger.warning(
                    "writing results failed; their records will be retried",
                    extra={"stream": self.settings.output_stream, "code": failure.code, "first": start},
                )
                return start
            failed = [i for i, entry in enumerate(answer.get("Records", [])) if entry.get("ErrorCode")]
            if failed:
                entry = answer["Records"][failed[0]]
                logger.warning(
                    "the output stream refused results; their records will be retried",
                    extra={
                        "code": entry.get("ErrorCode"),
                        "reason": entry.get("ErrorMessage"),
                        "first": start + failed[0],
                    },
                )
                return start + failed[0]
        return len(results)


def _chunks(results: Sequence[tuple[str, bytes]]) -> list[tuple[int, Sequence[tuple[str, bytes]]]]:
    chunks: list[tuple[int, Sequence[tuple[str, bytes]]]] = []
    start, size = 0, 0
    for index, (key, data) in enumerate(results):
        entry = len(data) + len(key.encode())
        if index > start and (index - start == PUT_RECORDS_MAX or size + entry > PUT_RECORDS_MAX_BYTES):
            chunks.append((start, results[start:index]))
            start, size = index, 0
        size += entry
    if start < len(results):
        chunks.append((start, results[start:]))
    return chunks


@dataclass
class StreamBatch:
    """One Kinesis batch on its way: records served in order, results written at the end."""

    worker: StreamWorker
    deadline: aws.Deadline | None
    results: list[tuple[KinesisStreamRecord, bytes]] = field(default_factory=list)
    failed_at: str | None = None  # the sequence number of the first record that failed

    def serve(self, record: KinesisStreamRecord) -> None:
        """Powertools' record handler: serve ``record`` unless an earlier one failed.

        Raises:
            TierserveError: the record failed and must be retried (and so must those after it).
        """
        payload = record.kinesis
        if self.failed_at is not None:
            raise EarlierRecordFailed(
                f"record {self.failed_at} failed before this one; the retry serves both in order"
            )
        identity = RecordId(payload.sequence_number, record.event_id.split(":", 1)[0], payload.partition_key)
        try:
            with aws.within(self.deadline):
                aws.check_deadline(f"record {identity.sequence_number}")
                self.results.append((record, self.worker.serve(payload.data_as_bytes(), identity)))
        except Exception as error:
            self.failed_at = identity.sequence_number
            logger.warning(
                "record failed: it and the records after it will be retried",
                extra={**identity.parameters(), "error": getattr(error, "message", type(error).__name__)},
            )
            raise

    def finish(self, response: Mapping[str, Any]) -> dict[str, Any]:
        """Write the results, then the partial batch response: powertools' failures, and the
        records whose results were not written, in the batch's order."""
        failed = [f["itemIdentifier"] for f in response.get("batchItemFailures", [])]
        with aws.within(self.deadline):
            written = self.worker.write([(r.kinesis.partition_key, data) for r, data in self.results])
        failed += [r.kinesis.sequence_number for r, _ in self.results[written:]]
        # One shard's sequence numbers increase: the mapping retries from the lowest reported.
        ordered = sorted(set(failed), key=lambda seq: int(seq) if seq.isdigit() else 0)
        return {"batchItemFailures": [{"itemIdentifier": seq} for seq in ordered]}
