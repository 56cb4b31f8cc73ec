"""Request capture for drift: a sample of each opted-in model's requests, written to S3 in batches.

Opt-in per model (``TIERSERVE_CAPTURE=iris:0.1,mlp:0.05:outputs``, from context ``capture``):
a sampled request's inputs (and its outputs, with ``:outputs``) become one JSON line, and the
lines of one model version go to the data bucket as one object per batch:

    s3://{TIERSERVE_DATA_BUCKET}/capture/{model}/{version}/date=YYYY-MM-DD/HHMMSS-{id}.jsonl

An inference never waits for capture and never fails because of it. :meth:`Capture.offer`
(on the request's thread) draws the sample, encodes the line (orjson, numpy arrays natively)
and appends it to a bounded buffer; one daemon thread writes. It writes a model's batch when
it holds ``TIERSERVE_CAPTURE_BATCH`` lines, when its oldest line is ``TIERSERVE_CAPTURE_FLUSH_S``
old, and when :meth:`close` says the process ends. :meth:`end_invocation`, called when a
Lambda invocation ends, wakes the writer if a batch is due, and returns at once. A full buffer
drops new lines, a line over :data:`MAX_LINE_BYTES` is dropped, a failed write drops its batch
(after botocore's retries): each is counted (``CaptureDropped``, ``CaptureWriteFailed``) and
logged, never raised. Lambda freezes an environment between invocations, so a write that is
under way resumes with the next one; lines still buffered when an environment is shut down are
lost, which a sample can afford.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from tierserve.catalog import NAME_PATTERN
from tierserve.settings import DATA_BUCKET_ENV, ModelRef, SettingsError, Variable, bucket, number, whole
from tierserve.telemetry import logger, record_count

CAPTURE_ENV = "TIERSERVE_CAPTURE"
CAPTURE_BATCH_ENV = "TIERSERVE_CAPTURE_BATCH"
CAPTURE_FLUSH_S_ENV = "TIERSERVE_CAPTURE_FLUSH_S"
CAPTURE_PREFIX = "capture"
DEFAULT_BATCH = 200
DEFAULT_FLUSH_S = 60.0
MAX_LINE_BYTES = 256 * 1024  # an image request is not worth a drift sample of this size
BUFFER_BATCHES = 4  # lines held per model at most: this many batches
CAPTURE_WRITTEN = "CaptureRecords"
CAPTURE_DROPPED = "CaptureDropped"
CAPTURE_WRITE_FAILED = "CaptureWriteFailed"


@dataclass(frozen=True)
class CaptureRule:
    """Capture ``rate`` (0 to 1) of a model's requests, with their ``outputs`` or not."""

    rate: float
    outputs: bool = False


def parse_rules(text: str) -> dict[str, CaptureRule]:
    """``"iris:0.1,mlp:0.05:outputs"`` -> ``{"iris": CaptureRule(0.1), "mlp": CaptureRule(0.05, True)}``.

    Raises:
        ValueError: an entry that is not ``model:rate[:outputs]`` with a rate from 0 to 1.
    """
    rules: dict[str, CaptureRule] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, rest = part.partition(":")
        rate_text, _, what = rest.partition(":")
        try:
            rate = float(rate_text)
        except ValueError:
            rate = -1.0
        if not NAME_PATTERN.match(name) or not 0 <= rate <= 1 or what not in ("", "outputs") or name in rules:
            raise ValueError(
                f"has {part!r}, which is no model:rate[:outputs] with a rate from 0 to 1 (each model once)"
            )
        rules[name] = CaptureRule(rate, what == "outputs")
    return rules


def join_rules(rules: Mapping[str, CaptureRule]) -> str:
    """The ``TIERSERVE_CAPTURE`` value for ``rules``, sorted by model (the inverse of :func:`parse_rules`)."""
    return ",".join(
        f"{n}:{rules[n].rate:g}" + (":outputs" if rules[n].outputs else "") for n in sorted(rules)
    )


CAPTURE = Variable(
    CAPTURE_ENV, parse_rules, "model:rate[:outputs],... e.g. iris:0.1,mlp:0.05:outputs", "no capture"
)
CAPTURE_BUCKET = bucket(DATA_BUCKET_ENV, unset="no capture (it needs the data bucket)")
CAPTURE_BATCH = whole(CAPTURE_BATCH_ENV, high=100_000, unset=f"the default, {DEFAULT_BATCH} lines per object")
CAPTURE_FLUSH_S = number(CAPTURE_FLUSH_S_ENV, unit="seconds", unset=f"the default, {DEFAULT_FLUSH_S:g}")
# TIERSERVE_DATA_BUCKET is the S3 pipeline's variable (s3_pipeline/settings.py), read here with its own "unset"
VARIABLES: tuple[Variable, ...] = (CAPTURE, CAPTURE_BATCH, CAPTURE_FLUSH_S)


def capture_prefix(ref: ModelRef) -> str:
    """``capture/{model}/{version}/``: where a model version's batches go."""
    return f"{CAPTURE_PREFIX}/{ref.name}/{ref.version}/"


def batch_key(ref: ModelRef, when: dt.datetime) -> str:
    """The key of a batch whose first line was taken at ``when`` (UTC)."""
    stamp = when.astimezone(dt.UTC)
    return f"{capture_prefix(ref)}date={stamp:%Y-%m-%d}/{stamp:%H%M%S}-{uuid.uuid4().hex[:12]}.jsonl"


def encode_line(
    ref: ModelRef, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray] | None
) -> bytes:
    """One captured request as a JSON line: time, model, version, and each tensor as
    ``{"datatype": numpy dtype, "shape": [...], "data": [flat values]}``."""

    def tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        return {
            name: {"dtype": str(a.dtype), "shape": list(a.shape), "data": np.ascontiguousarray(a).reshape(-1)}
            for name, a in arrays.items()
            if a.dtype.kind != "O"  # BYTES tensors are not binned; their text stays out of the bucket
        }

    record: dict[str, Any] = {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        "model": ref.name,
        "version": ref.version,
        "inputs": tensors(inputs),
    }
    if outputs is not None:
        record["outputs"] = tensors(outputs)
    return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


@dataclass
class _Buffer:
    lines: list[bytes] = field(default_factory=list)
    since: float = 0.0
    started: dt.datetime | None = None


class Capture:
    """The sampler and its writer for one process (see the module docstring).

    ``put`` writes one object (``put(key, body)``); by default the S3 client of
    :mod:`tierserve.aws` on ``bucket``. ``draw`` returns a number in [0, 1) per request;
    ``clock`` is monotonic seconds. Both are injectable for tests.
    """

    def __init__(
        self,
        rules: Mapping[str, CaptureRule],
        *,
        bucket: str | None = None,
        batch: int = DEFAULT_BATCH,
        flush_s: float = DEFAULT_FLUSH_S,
        put: Callable[[str, bytes], None] | None = None,
        draw: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rules and put is None and bucket is None:
            raise ValueError(f"{CAPTURE_ENV} needs TIERSERVE_DATA_BUCKET, the bucket the batches go to")
        self.rules = dict(rules)
        self.batch = batch
        self.flush_s = flush_s
        self._put = put or _s3_put(bucket or "")
        self._draw = draw
        self._clock = clock
        self._buffers: dict[ModelRef, _Buffer] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._writer: threading.Thread | None = None
        self.counts = {CAPTURE_WRITTEN: 0, CAPTURE_DROPPED: 0, CAPTURE_WRITE_FAILED: 0}
        self._unpublished: dict[str, int] = {}
        _open.add(self)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Capture | None:
        """The process's capture from ``TIERSERVE_CAPTURE`` (None when it names no model).

        Raises:
            SettingsError: a bad ``TIERSERVE_CAPTURE*`` value, or capture without a data bucket.
        """
        env = os.environ if environ is None else environ
        rules = {name: rule for name, rule in CAPTURE.read(env, {}).items() if rule.rate > 0}
        if not rules:
            return None
        bucket_name = CAPTURE_BUCKET.read(env, None)
        if bucket_name is None:
            raise SettingsError(
                f"{CAPTURE_ENV} is set but {DATA_BUCKET_ENV} is not; set it to the data bucket, or unset {CAPTURE_ENV}"
            )
        return cls(
            rules,
            bucket=bucket_name,
            batch=CAPTURE_BATCH.read(env, DEFAULT_BATCH),
            flush_s=CAPTURE_FLUSH_S.read(env, DEFAULT_FLUSH_S),
        )

    def offer(
        self, ref: ModelRef, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]
    ) -> None:
        """Maybe keep this request (its model's rate decides); never raises."""
        rule = self.rules.get(ref.name)
        if rule is None or self._closed or self._draw() >= rule.rate:
            return
        try:
            self._keep(ref, rule, inputs, outputs)
        except Exception:  # whatever goes wrong here, the inference has its answer
            logger.warning(
                "capture: a request could not be kept; it is not captured", extra={"model": str(ref)}
            )
            self._count(CAPTURE_DROPPED)

    def _keep(
        self,
        ref: ModelRef,
        rule: CaptureRule,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
    ) -> None:
        arrays = [*inputs.values(), *(outputs.values() if rule.outputs else ())]
        if sum(a.size for a in arrays) * 2 > MAX_LINE_BYTES:  # 2+ bytes a value: too large, unencoded
            self._count(CAPTURE_DROPPED)
            return
        line = encode_line(ref, inputs, outputs if rule.outputs else None)
        if len(line) > MAX_LINE_BYTES:
            self._count(CAPTURE_DROPPED)
            return
        with self._lock:
            buffer = self._buffers.setdefault(ref, _Buffer())
            if len(buffer.lines) >= self.batch * BUFFER_BATCHES:
                due, kept = True, False
            else:
                if not buffer.lines:
                    buffer.since, buffer.started = self._clock(), dt.datetime.now(dt.UTC)
                buffer.lines.append(line)
                due, kept = len(buffer.lines) >= self.batch, True
        if not kept:
            self._count(CAPTURE_DROPPED)
        if self._writer is None:
            self._start_writer()  # its own timer writes what ages, in a server between requests too
        if due:
            self._wake.set()

    def end_invocation(self) -> None:
        """A Lambda invocation ends: publish the counts, wake the writer if a batch is due by size
        or age; returns at once."""
        self._publish()
        if self._due():
            self._start_writer()
            self._wake.set()

    def flush(self) -> None:
        """Write every buffered line now, on this thread (tests, and :meth:`close`)."""
        for ref, buffer in self._take(everything=True):
            self._write(ref, buffer)

    def close(self) -> None:
        """The process ends: stop the writer and write what is left."""
        self._closed = True
        self._wake.set()
        if self._writer is not None:
            self._writer.join(timeout=30)
        self.flush()

    # ------------------------------------------------------------ the writer

    def _due(self) -> bool:
        now = self._clock()
        with self._lock:
            return any(
                b.lines and (len(b.lines) >= self.batch or now - b.since >= self.flush_s)
                for b in self._buffers.values()
            )

    def _take(self, *, everything: bool = False) -> list[tuple[ModelRef, _Buffer]]:
        """The lines due for writing: every full batch, and the rest of a buffer whose oldest
        line is ``flush_s`` old (or all of it, with ``everything``)."""
        now = self._clock()
        taken = []
        with self._lock:
            for ref, buffer in self._buffers.items():
                if not buffer.lines:
                    continue
                if everything or now - buffer.since >= self.flush_s:
                    count = len(buffer.lines)
                else:
                    count = len(buffer.lines) // self.batch * self.batch
                if count:
                    taken.append((ref, _Buffer(buffer.lines[:count], buffer.since, buffer.started)))
                    buffer.lines = buffer.lines[count:]
                    buffer.since, buffer.started = now, dt.datetime.now(dt.UTC)
        return taken

    def _start_writer(self) -> None:
        with self._lock:
            if self._writer is None and not self._closed:
                self._writer = threading.Thread(target=self._run, name="tierserve-capture", daemon=True)
                self._writer.start()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(timeout=self.flush_s)
            self._wake.clear()
            for ref, buffer in self._take():
                self._write(ref, buffer)

    def _write(self, ref: ModelRef, buffer: _Buffer) -> None:
        for start in range(0, len(buffer.lines), self.batch):
            lines = buffer.lines[start : start + self.batch]
            key = batch_key(ref, buffer.started or dt.datetime.now(dt.UTC))
            try:
                self._put(key, b"".join(lines))
            except Exception as error:  # counted and logged: capture never fails an inference
                self._count(CAPTURE_WRITE_FAILED)
                self._count(CAPTURE_DROPPED, len(lines))
                logger.warning(
                    "capture: a batch could not be written; its lines are dropped",
                    extra={"model": str(ref), "key": key, "lines": len(lines), "error": type(error).__name__},
                )
                continue
            self._count(CAPTURE_WRITTEN, len(lines))
        self._publish()

    def _count(self, name: str, count: int = 1) -> None:
        with self._lock:
            self.counts[name] += count
            self._unpublished[name] = self._unpublished.get(name, 0) + count

    def _publish(self) -> None:
        """The counts since the last publication, one metric value each (not one per line: a
        flood of drops must not become a flood of metric values on the request's thread)."""
        with self._lock:
            pending, self._unpublished = self._unpublished, {}
        for name, count in pending.items():
            record_count(name, count)


_open: weakref.WeakSet[Capture] = weakref.WeakSet()


def close_all() -> None:
    """Close every capture of this process (a long-lived server that stops: the local stack,
    before its S3 goes)."""
    for capture in list(_open):
        capture.close()


def _s3_put(bucket: str) -> Callable[[str, bytes], None]:
    def put(key: str, body: bytes) -> None:
        from tierserve import aws

        aws.client("s3").put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/x-ndjson")

    return put
