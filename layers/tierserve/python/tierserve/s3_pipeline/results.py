"""Result bookkeeping of the S3 pipeline: one current result per input version, decided from
S3 alone.

Each result object records, in its S3 metadata, the input's sequencer, ETag and version id
and the model that served it, and is written with a conditional PutObject (``If-None-Match:
*`` where none is known, ``If-Match`` on the result looked at), so a concurrent or older
delivery can never overwrite a newer result, and a redelivery after a crash rewrites the same
bytes or is recognised as a duplicate. The write carries the decision: only a refused write
looks at the results (HeadObject) and decides again. Writing an output removes an older error
for the same path, and the other way round; which results of a batch exist at all is listed
once for the batch (:class:`ResultIndex`) rather than looked up per input.

An error written when the pipeline gave up on a transient fault (the last delivery the queue
allows: :meth:`Pipeline.give_up`) is marked so (``tierserve-gave-up``): it tells the input's
owner, and a job's status, why nothing came, but it answers no version, so a redrive of the
dead-lettered message serves the input and replaces it; and it never displaces a result that
answers the version.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from tierserve import aws
from tierserve.errors import TierserveError, UpstreamUnavailable
from tierserve.s3_pipeline.errors import S3Action, data_error
from tierserve.s3_pipeline.events import InputKey, ResultKind, S3Object, compare_sequencers
from tierserve.settings import ERROR_PREFIX, OUTPUT_PREFIX
from tierserve.telemetry import logger

# What a result object records about the input it answers (S3 user metadata, x-amz-meta-*).
META_SEQUENCER = "tierserve-sequencer"
META_INPUT_ETAG = "tierserve-input-etag"
META_INPUT_VERSION = "tierserve-input-version-id"
META_MODEL = "tierserve-model"
META_PROCESSED_AT = "tierserve-processed-at"
META_GAVE_UP = "tierserve-gave-up"

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
    gave_up: bool = False  # an error written on a transient fault's last delivery: no answer

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
            gave_up=meta.get(META_GAVE_UP) == "true",
        )


@dataclass(frozen=True)
class Outcome:
    """How one input ended: ``output`` or ``error`` (and the result's key), or ``skipped``."""

    status: Literal["output", "error", "skipped"]
    key: str
    result_key: str | None = None
    reason: str = ""
    http_status: int = 0  # an error result's status (400, 404, 413, ...), as its document says


def why_skip(item: S3Object, recorded: Iterable[Recorded], model: str) -> str | None:
    """Why ``item`` needs no new result given the results already written, or None.

    Older than a result (by sequencer): stale. Same input version served by the same model:
    a duplicate delivery. Without sequencers (an unversioned bucket's events carry one; moto's
    do not) the input's ETag and version id identify the version; an item without a version id
    (listed by a bulk run, not announced by an event) is identified by its ETag alone.
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
    """The result that answers exactly this version of the input, served by ``model`` (an error
    written on giving up answers none: a retry may serve it)."""
    for result in recorded:
        if result.model != model or result.gave_up:
            continue
        if item.sequencer and result.sequencer:
            if compare_sequencers(item.sequencer, result.sequencer) == 0:
                return result
        elif item.etag and result.input_etag == item.etag and item.version_id in (None, result.input_version):
            # An item without a version id (from a listing, not an event) is its ETag: versions
            # with the same ETag hold the same bytes, so their result is the same.
            return result
    return None


KINDS: tuple[ResultKind, ResultKind] = (OUTPUT_PREFIX, ERROR_PREFIX)


def other_kind(kind: ResultKind) -> ResultKind:
    return ERROR_PREFIX if kind == OUTPUT_PREFIX else OUTPUT_PREFIX


@dataclass(frozen=True)
class Known:
    """What is known of one input's results when its own result is written: each kind is
    ``recorded`` (looked at with HeadObject), ``absent`` (known not to exist) or neither
    (unknown: the conditional write finds out). ``listed`` is what the batch's listing says
    of a kind (True, False or None for unknown), asked only once the result is written, so
    the listing overlaps the input's read and run."""

    recorded: Mapping[ResultKind, Recorded] = field(default_factory=dict)
    absent: frozenset[ResultKind] = frozenset()
    listed: Callable[[ResultKind], bool | None] | None = None

    def is_absent(self, kind: ResultKind) -> bool:
        return kind in self.absent or (self.listed is not None and self.listed(kind) is False)

    @classmethod
    def looked(cls, recorded: Mapping[ResultKind, Recorded]) -> Known:
        """After both kinds were looked at: what was not found is absent."""
        return cls(dict(recorded), frozenset(kind for kind in KINDS if kind not in recorded))


@dataclass(frozen=True)
class _Listing:
    present: frozenset[str]  # the result keys found
    covered_to: str  # every key of the prefix up to this one was listed


# A listing covers a key range only when the batch has this many keys in it; one key is a HeadObject.
MIN_KEYS_TO_LIST = 2
LIST_MAX_KEYS = 1000  # one page: a listing costs one request, whatever the range


class ResultIndex:
    """Which results exist among those of a batch of inputs, from one ListObjectsV2 page per
    bucket, kind and model instead of a HeadObject per input. The listings run in the
    background (they overlap the inputs' reads); a lookup waits for its listing. A key that no
    listing covered, or whose listing failed, is unknown (None)."""

    def __init__(
        self, listings: Mapping[tuple[str, ResultKind, str], Future[_Listing]] | None = None
    ) -> None:
        self._listings = dict(listings or {})

    def exists(self, bucket: str, kind: ResultKind, key: InputKey) -> bool | None:
        """True when the result of ``kind`` for ``key`` was listed, False when its listing
        covered it and did not find it, None when unknown."""
        listing = self._listings.get((bucket, kind, key.model))
        if listing is None:
            return None
        try:
            found = listing.result()
        except Exception:  # the listing failed: the write path looks for itself
            return None
        result_key = key.result_key(kind)
        if result_key in found.present:
            return True
        return False if result_key <= found.covered_to else None


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

    def recorded(
        self, bucket: str, key: InputKey, kinds: Iterable[ResultKind] = KINDS
    ) -> dict[ResultKind, Recorded]:
        """The results of ``kinds`` that exist for ``key``, looked at (one HeadObject each)."""
        found: dict[ResultKind, Recorded] = {}
        for kind in kinds:
            result = self._head(bucket, key, kind)
            if result is not None:
                found[kind] = result
        return found

    def _head(self, bucket: str, key: InputKey, kind: ResultKind) -> Recorded | None:
        result_key = key.result_key(kind)
        try:
            head = self._s3().head_object(Bucket=bucket, Key=result_key)
        except Exception as error:
            if aws.classify(error).kind == "gone":
                return None
            raise self._error(error, f"s3://{bucket}/{result_key}", "reading") from error
        return Recorded.from_head(kind, head)

    def index(
        self,
        inputs: Iterable[tuple[str, InputKey]],
        kinds: Iterable[ResultKind],
        executor: Executor,
        deadline: aws.Deadline | None = None,
    ) -> ResultIndex:
        """Start listing the results of ``kinds`` for a batch of ``(bucket, input key)``: one
        ListObjectsV2 page per bucket, kind and model that has :data:`MIN_KEYS_TO_LIST` keys
        or more, on ``executor``, each within ``deadline``."""
        groups: dict[tuple[str, ResultKind, str], set[str]] = defaultdict(set)
        for bucket, key in inputs:
            for kind in kinds:
                groups[(bucket, kind, key.model)].add(key.result_key(kind))
        listings = {
            group: executor.submit(self._list_within, deadline, group[0], sorted(keys))
            for group, keys in groups.items()
            if len(keys) >= MIN_KEYS_TO_LIST
        }
        return ResultIndex(listings)

    def _list_within(self, deadline: aws.Deadline | None, bucket: str, keys: list[str]) -> _Listing:
        with aws.within(deadline):
            return self._list(bucket, keys)

    def _list(self, bucket: str, keys: list[str]) -> _Listing:
        """One page of the keys from just below ``keys[0]`` on, under their common prefix."""
        first = keys[0]
        page = self._s3().list_objects_v2(
            Bucket=bucket,
            Prefix=_shared_start(first, keys[-1]),
            StartAfter=first[:-1],  # a proper prefix sorts before the key, and nothing between them is ours
            MaxKeys=LIST_MAX_KEYS,
        )
        listed = [item["Key"] for item in page.get("Contents", [])]
        if page.get("IsTruncated"):
            return _Listing(frozenset(listed), listed[-1] if listed else "")
        return _Listing(frozenset(listed), keys[-1])

    def write(
        self,
        bucket: str,
        item: S3Object,
        key: InputKey,
        kind: ResultKind,
        body: bytes,
        known: Known,
        model_label: str,
        *,
        gave_up: bool = False,
    ) -> Outcome:
        """Write the result only if what ``known`` says about it still holds: over the result
        looked at (``If-Match``), or where none is (``If-None-Match: *``). A refused write looks
        at both results and decides again: skip (a duplicate, or stale), or replace an older
        result. Then settle the other kind of result (:meth:`_settle_other`). ``gave_up``: an
        error written on a transient fault's last delivery (see the module docstring)."""
        result_key = key.result_key(kind)
        about_input = {
            META_SEQUENCER: item.sequencer,
            META_INPUT_ETAG: item.etag,
            META_INPUT_VERSION: item.version_id,
        }
        metadata = {
            # What the input lacks (an unversioned bucket's version id) is left out: each header costs.
            **{name: value for name, value in about_input.items() if value},
            META_MODEL: model_label,
            META_PROCESSED_AT: datetime.fromtimestamp(self._clock(), UTC).isoformat(timespec="milliseconds"),
            **({META_GAVE_UP: "true"} if gave_up else {}),
        }
        for _ in range(WRITE_ATTEMPTS):
            mine = known.recorded.get(kind)
            condition = {"IfMatch": mine.etag} if mine else {"IfNoneMatch": "*"}
            try:
                written = self._s3().put_object(
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
                known = Known.looked(recorded)
                continue
            written_etag = str(written.get("ETag", ""))
            return self._settle_other(
                bucket, item, key, kind, known, written_etag, model_label if gave_up else None
            )
        raise UpstreamUnavailable(f"results for {item.key} kept changing while being written; retry")

    def _settle_other(
        self,
        bucket: str,
        item: S3Object,
        key: InputKey,
        kind: ResultKind,
        known: Known,
        written_etag: str,
        gave_up_for: str | None = None,
    ) -> Outcome:
        """After writing the result of ``kind``: an input has one result at a time. The other
        kind, where ``known`` does not say it is absent, is looked at if it was not: one that
        answers a newer version of the input (by sequencer), or, after an error written on
        giving up (``gave_up_for``: its model), one that answers this version, keeps its place
        and the result just written is taken back; any other is removed."""
        result_key = key.result_key(kind)
        other = other_kind(kind)
        if gave_up_for or not known.is_absent(other):
            # Giving up is rare and races a delivery that may just have served it: look again.
            found = (None if gave_up_for else known.recorded.get(other)) or self._head(bucket, key, other)
            if found is not None and _newer(item, [found]) is not None:
                self._delete(bucket, result_key, written_etag)
                return skipped(item, f"stale: {other} already answers a newer version of the input")
            if found is not None and gave_up_for and _answer(item, [found], gave_up_for) is not None:
                self._delete(bucket, result_key, written_etag)
                return skipped(item, f"duplicate delivery: {other} already answers this version")
            if found is not None:
                self._delete(bucket, key.result_key(other), found.etag)
        return finished(item, kind, result_key)

    def _delete(self, bucket: str, result_key: str, etag: str) -> None:
        """Remove a result only while it is the one seen (``If-Match``); one already replaced or
        removed by another writer is left to it."""
        try:
            self._s3().delete_object(Bucket=bucket, Key=result_key, IfMatch=etag)
        except Exception as error:
            if aws.classify(error).kind not in (*RACED, "gone"):
                raise self._error(error, f"s3://{bucket}/{result_key}", "deleting") from error

    def remove_stale(
        self,
        bucket: str,
        item: S3Object,
        key: InputKey,
        recorded: Mapping[ResultKind, Recorded],
        model_label: str,
    ) -> None:
        """On a duplicate delivery, finish what its first delivery began: remove the older result
        of the other kind (see :func:`stale_other_result`)."""
        stale = stale_other_result(item, recorded.values(), model_label)
        if stale is None:
            return
        logger.info(
            "removing an older result left beside the one that answers the input",
            extra={"key": item.key, "removed": key.result_key(stale.kind)},
        )
        self._delete(bucket, key.result_key(stale.kind), stale.etag)


def _shared_start(first: str, last: str) -> str:
    """The longest start two keys share (for sorted keys, the first and the last: all of them)."""
    length = next(
        (i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b), min(len(first), len(last))
    )
    return first[:length]


def finished(item: S3Object, kind: ResultKind, result_key: str) -> Outcome:
    if kind == OUTPUT_PREFIX:
        logger.info("input served", extra={"key": item.key, "result": result_key})
        return Outcome("output", item.key, result_key)
    logger.info("input cannot be served; reason written", extra={"key": item.key, "result": result_key})
    return Outcome("error", item.key, result_key)


def skipped(item: S3Object, reason: str) -> Outcome:
    logger.info("input skipped", extra={"key": item.key, "reason": reason})
    return Outcome("skipped", item.key, None, reason)
