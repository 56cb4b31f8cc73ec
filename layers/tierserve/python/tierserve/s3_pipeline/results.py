"""Result bookkeeping of the S3 pipeline: one current result per input version, decided from
S3 alone.

Each result object records, in its S3 metadata, the input's sequencer, ETag and version id
and the model that served it, and is written with a conditional PutObject (``If-None-Match:
*`` or ``If-Match`` on the result seen at the start), so a concurrent or older delivery can
never overwrite a newer result, and a redelivery after a crash rewrites the same bytes or is
recognised as a duplicate. Writing an output removes a stale error for the same path, and
the other way round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from tierserve import aws
from tierserve.errors import TierserveError, UpstreamUnavailable
from tierserve.s3_pipeline.errors import S3Action, data_error
from tierserve.s3_pipeline.events import InputKey, ResultKind, S3Object, compare_sequencers
from tierserve.settings import ERROR_PREFIX, OUTPUT_PREFIX
from tierserve.telemetry import PIPELINE_ERROR, PIPELINE_OUTPUT, PIPELINE_SKIPPED, logger, record_count

# What a result object records about the input it answers (S3 user metadata, x-amz-meta-*).
META_SEQUENCER = "tierserve-sequencer"
META_INPUT_ETAG = "tierserve-input-etag"
META_INPUT_VERSION = "tierserve-input-version-id"
META_MODEL = "tierserve-model"
META_PROCESSED_AT = "tierserve-processed-at"

WRITE_ATTEMPTS = 4
RACED = ("changed", "raced")  # a conditional write or delete lost to another writer


@dataclass(frozen=True)
class Recorded:
    """A result object already in the bucket, and what its metadata says it answers."""

    kind: ResultKind
    etag: str
    sequencer: str | None
    input_etag: str | None
    input_version: str | None
    model: str | None
    processed_at: str | None = None  # ISO 8601, UTC, milliseconds: strings order in time

    @classmethod
    def from_head(cls, kind: ResultKind, head: Mapping[str, Any]) -> Recorded:
        meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
        return cls(
            kind=kind,
            etag=str(head.get("ETag", "")),
            sequencer=meta.get(META_SEQUENCER) or None,
            input_etag=meta.get(META_INPUT_ETAG) or None,
            input_version=meta.get(META_INPUT_VERSION) or None,
            model=meta.get(META_MODEL),
            processed_at=meta.get(META_PROCESSED_AT) or None,
        )


@dataclass(frozen=True)
class Outcome:
    """How one input ended: ``output`` or ``error`` (and the result's key), or ``skipped``."""

    status: Literal["output", "error", "skipped"]
    key: str
    result_key: str | None = None
    reason: str = ""


def why_skip(item: S3Object, recorded: Iterable[Recorded], model: str) -> str | None:
    """Why ``item`` needs no new result given the results already written, or None.

    Older than a result (by sequencer): stale. Same input version served by the same model:
    a duplicate delivery. Without sequencers (an unversioned bucket's events carry one; moto's
    do not) the input's ETag and version id identify the version.
    """
    recorded = list(recorded)
    newer = _newer(item, recorded)
    if newer is not None:
        return f"stale: {newer.kind} already answers a newer version of the input"
    answer = _answer(item, recorded, model)
    if answer is not None:
        return f"duplicate delivery: {answer.kind} already answers this version"
    return None


def stale_other_result(item: S3Object, recorded: Iterable[Recorded], model: str) -> Recorded | None:
    """On a duplicate delivery of ``item``, the result of the other kind when it is older than
    the one answering ``item``: its writer died between writing the newer result and removing
    this one. None when ``item`` is no duplicate, or when the other result may be the newer.

    Older means: an older input version (by sequencer), or, for the same version or without
    sequencers, written earlier (by the processed-at time the result records).
    """
    recorded = list(recorded)
    answer = None if _newer(item, recorded) else _answer(item, recorded, model)
    if answer is None:
        return None
    other = next((r for r in recorded if r.kind != answer.kind), None)
    if other is None:
        return None
    if answer.sequencer and other.sequencer:
        order = compare_sequencers(other.sequencer, answer.sequencer)
        if order:
            return other if order < 0 else None
    if answer.processed_at and other.processed_at and other.processed_at < answer.processed_at:
        return other
    return None


def _newer(item: S3Object, recorded: Iterable[Recorded]) -> Recorded | None:
    """A result that answers a newer version of the input than ``item`` (by sequencer)."""
    for result in recorded:
        if item.sequencer and result.sequencer and compare_sequencers(item.sequencer, result.sequencer) < 0:
            return result
    return None


def _answer(item: S3Object, recorded: Iterable[Recorded], model: str) -> Recorded | None:
    """The result that answers exactly this version of the input, served by ``model``."""
    for result in recorded:
        if result.model != model:
            continue
        if item.sequencer and result.sequencer:
            if compare_sequencers(item.sequencer, result.sequencer) == 0:
                return result
        elif item.etag and result.input_etag == item.etag and result.input_version == item.version_id:
            return result
    return None


class ResultStore:
    """Reads and conditionally writes the results of inputs in a data bucket; ``bucket_setting``
    names the variable that chose it (None: results go beside their input)."""

    def __init__(
        self,
        s3_client_factory: Callable[[], Any],
        clock: Callable[[], float],
        bucket_setting: str | None = None,
    ) -> None:
        self._s3 = s3_client_factory
        self._clock = clock
        self._bucket_setting = bucket_setting

    def _error(self, error: BaseException, where: str, action: S3Action) -> TierserveError:
        return data_error(error, where, action, self._bucket_setting)

    def recorded(self, bucket: str, key: InputKey) -> dict[ResultKind, Recorded]:
        found: dict[ResultKind, Recorded] = {}
        for kind in (OUTPUT_PREFIX, ERROR_PREFIX):
            result_key = key.result_key(kind)
            try:
                head = self._s3().head_object(Bucket=bucket, Key=result_key)
            except Exception as error:
                if aws.classify(error).kind == "gone":
                    continue
                raise self._error(error, f"s3://{bucket}/{result_key}", "reading") from error
            found[kind] = Recorded.from_head(kind, head)
        return found

    def write(
        self,
        bucket: str,
        item: S3Object,
        key: InputKey,
        kind: ResultKind,
        body: bytes,
        recorded: dict[ResultKind, Recorded],
        model_label: str,
    ) -> Outcome:
        """Write the result only if the results seen are still there (a conditional PutObject);
        on a race, look again and decide again. Then remove the other kind of result."""
        result_key = key.result_key(kind)
        metadata = {
            META_SEQUENCER: item.sequencer or "",
            META_INPUT_ETAG: item.etag or "",
            META_INPUT_VERSION: item.version_id or "",
            META_MODEL: model_label,
            META_PROCESSED_AT: datetime.fromtimestamp(self._clock(), UTC).isoformat(timespec="milliseconds"),
        }
        for _ in range(WRITE_ATTEMPTS):
            mine = recorded.get(kind)
            condition = {"IfMatch": mine.etag} if mine else {"IfNoneMatch": "*"}
            try:
                self._s3().put_object(
                    Bucket=bucket,
                    Key=result_key,
                    Body=body,
                    ContentType="application/json",
                    Metadata=metadata,
                    **condition,
                )
            except Exception as error:
                if aws.classify(error).kind not in RACED:
                    raise self._error(error, f"s3://{bucket}/{result_key}", "writing") from error
                recorded = self.recorded(bucket, key)
                reason = why_skip(item, recorded.values(), model_label)
                if reason:
                    self.remove_stale(bucket, item, key, recorded, model_label)
                    return skipped(item, reason)
                continue
            self._remove_other(bucket, key, kind, recorded)
            return finished(item, kind, result_key)
        raise UpstreamUnavailable(f"results for {item.key} kept changing while being written; retry")

    def _remove_other(
        self, bucket: str, key: InputKey, kind: ResultKind, recorded: dict[ResultKind, Recorded]
    ) -> None:
        other_kind: ResultKind = ERROR_PREFIX if kind == OUTPUT_PREFIX else OUTPUT_PREFIX
        other = recorded.get(other_kind)
        if other is None:
            return
        other_key = key.result_key(other_kind)
        try:
            self._s3().delete_object(Bucket=bucket, Key=other_key, IfMatch=other.etag)
        except Exception as error:
            if aws.classify(error).kind not in (*RACED, "gone"):
                raise self._error(error, f"s3://{bucket}/{other_key}", "deleting") from error

    def remove_stale(
        self,
        bucket: str,
        item: S3Object,
        key: InputKey,
        recorded: dict[ResultKind, Recorded],
        model_label: str,
    ) -> None:
        """On a duplicate delivery, finish what its first delivery began: remove the older result
        of the other kind (see :func:`stale_other_result`)."""
        stale = stale_other_result(item, recorded.values(), model_label)
        if stale is None:
            return
        kept: ResultKind = OUTPUT_PREFIX if stale.kind == ERROR_PREFIX else ERROR_PREFIX
        logger.info(
            "removing an older result left beside the one that answers the input",
            extra={"key": item.key, "removed": key.result_key(stale.kind)},
        )
        self._remove_other(bucket, key, kept, recorded)


def finished(item: S3Object, kind: ResultKind, result_key: str) -> Outcome:
    if kind == OUTPUT_PREFIX:
        record_count(PIPELINE_OUTPUT)
        logger.info("input served", extra={"key": item.key, "result": result_key})
        return Outcome("output", item.key, result_key)
    record_count(PIPELINE_ERROR)
    logger.info("input cannot be served; reason written", extra={"key": item.key, "result": result_key})
    return Outcome("error", item.key, result_key)


def skipped(item: S3Object, reason: str) -> Outcome:
    record_count(PIPELINE_SKIPPED)
    logger.info("input skipped", extra={"key": item.key, "reason": reason})
    return Outcome("skipped", item.key, None, reason)
