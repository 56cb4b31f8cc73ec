"""The last window of captured requests of one model version, read back from S3 as arrays.

Batches are listed under ``capture/{model}/{version}/date=D/`` for each day the window
touches; a batch whose key time is before the window is skipped unread, and each line whose
``time`` is before it is skipped. Everything read is hostile data: at most
:data:`MAX_OBJECTS` objects of at most :data:`MAX_OBJECT_BYTES` each, each line parsed
strictly, a tensor kept only when its values match its shape and its input is the baseline's.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tierserve.capture import MAX_LINE_BYTES, capture_prefix
from tierserve.settings import ModelRef

MAX_OBJECTS = 5_000
MAX_OBJECT_BYTES = 64 * 1024 * 1024
MAX_ROWS = 1_000_000
MAX_WINDOW_BYTES = 256 * 1024 * 1024  # what one run reads at most (the drift function has 1 GB)
KEY_TIME = re.compile(r"date=(\d{4}-\d{2}-\d{2})/(\d{6})-[0-9a-f]{12}\.jsonl$")
NUMERIC_DTYPES = {
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
}

Progress = Callable[[int, int], None]


@dataclass
class Window:
    """What a window holds: per input, the rows captured (concatenated), and how it was read."""

    since: dt.datetime
    until: dt.datetime
    objects: int = 0
    requests: int = 0
    skipped_lines: int = 0
    truncated: bool = False
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return max((a.shape[0] for a in self.arrays.values()), default=0)


def window_keys(s3: Any, bucket: str, ref: ModelRef, since: dt.datetime, until: dt.datetime) -> list[str]:
    """The batch keys of ``ref`` whose time is in [``since``, ``until``] (an hour earlier for a
    batch started before the window), oldest first, at most :data:`MAX_OBJECTS` (the newest kept)."""
    keys: list[str] = []
    day = since.date()
    while day <= until.date():
        prefix = f"{capture_prefix(ref)}date={day:%Y-%m-%d}/"
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                when = key_time(item["Key"])
                if (
                    when is not None
                    and since - dt.timedelta(hours=1) <= when <= until
                    and item["Size"] <= MAX_OBJECT_BYTES
                ):
                    keys.append(item["Key"])
        day += dt.timedelta(days=1)
    keys.sort()
    return keys[-MAX_OBJECTS:]


def key_time(key: str) -> dt.datetime | None:
    match = KEY_TIME.search(key)
    if match is None:
        return None
    try:
        return dt.datetime.strptime(f"{match.group(1)} {match.group(2)}", "%Y-%m-%d %H%M%S").replace(
            tzinfo=dt.UTC
        )
    except ValueError:
        return None


def read_window(
    s3: Any,
    bucket: str,
    ref: ModelRef,
    inputs: Sequence[str],
    *,
    since: dt.datetime,
    until: dt.datetime,
    progress: Progress | None = None,
) -> Window:
    """Every captured row of ``inputs`` for ``ref`` between ``since`` and ``until``, newest
    batches first, up to :data:`MAX_ROWS` rows and :data:`MAX_WINDOW_BYTES` read."""
    window = Window(since, until)
    keys = window_keys(s3, bucket, ref, since, until)[::-1]
    columns: dict[str, list[np.ndarray]] = {name: [] for name in inputs}
    rows = read = 0
    for done, key in enumerate(keys, 1):
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read(MAX_OBJECT_BYTES + 1)
        window.objects += 1
        read += len(body)
        for record in _records(body[:MAX_OBJECT_BYTES], window):
            when = _time(record.get("time"))
            if when is None or not since <= when <= until:
                continue
            tensors = _tensors(record.get("inputs"), inputs)
            if tensors is None:
                window.skipped_lines += 1
                continue
            window.requests += 1
            for name, array in tensors.items():
                columns[name].append(array)
            rows += max(a.shape[0] for a in tensors.values())
        if progress is not None:
            progress(done, len(keys))
        if rows >= MAX_ROWS or read >= MAX_WINDOW_BYTES:
            window.truncated = done < len(keys)
            break
    window.arrays = {name: _join(parts) for name, parts in columns.items() if parts}
    window.arrays = {name: a for name, a in window.arrays.items() if a is not None}
    return window


def _records(body: bytes, window: Window) -> Iterator[dict[str, Any]]:
    for line in body.splitlines():
        if not line.strip():
            continue
        if len(line) > MAX_LINE_BYTES:
            window.skipped_lines += 1
            continue
        try:
            record = json.loads(line)
        except ValueError:
            window.skipped_lines += 1
            continue
        if isinstance(record, dict):
            yield record
        else:
            window.skipped_lines += 1


def _time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _tensors(value: Any, inputs: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The request's arrays of ``inputs`` (None: a line that is not what capture writes)."""
    if not isinstance(value, dict):
        return None
    arrays = {}
    for name in inputs:
        tensor = value.get(name)
        if tensor is None:
            continue
        array = _array(tensor)
        if array is None:
            return None
        arrays[name] = array
    return arrays or None


def _array(tensor: Any) -> np.ndarray | None:
    if not isinstance(tensor, dict) or tensor.get("dtype") not in NUMERIC_DTYPES:
        return None
    shape, data = tensor.get("shape"), tensor.get("data")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 8
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        or not isinstance(data, list)
        or len(data) != int(np.prod(shape))
    ):
        return None
    try:  # at the recorded precision: float32 values must land in the bins float32 baselines cut
        return np.asarray(data, dtype=tensor["dtype"]).reshape(shape)
    except (TypeError, ValueError, OverflowError):
        return None


def _join(parts: list[np.ndarray]) -> np.ndarray | None:
    tails = {p.shape[1:] for p in parts}
    if len(tails) != 1:  # requests of different row shapes: keep the most common
        common = max(tails, key=lambda t: sum(p.shape[1:] == t for p in parts))
        parts = [p for p in parts if p.shape[1:] == common]
    return np.concatenate(parts) if parts else None
