"""Inputs for the S3 pipeline's suites (the worker, bulk runs, streams) and the promise every
one of them ends by checking on the bucket listing."""

from __future__ import annotations

import json
from typing import Any

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]  # a setosa (0) and a virginica (2)


def infer_request(rows: list[list[float]] = ROWS, **extra: Any) -> bytes:
    shape = [len(rows), len(rows[0])]
    return json.dumps(
        {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": rows}], **extra}
    ).encode()


def jsonl(rows: list[Any]) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def keys(s3: Any, bucket: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def assert_one_result_per_input(s3: Any, bucket: str, *, dead_lettered=(), extra_prefixes=()) -> None:
    """Each input has exactly one result (an output or an error) unless it was dead-lettered,
    every result answers an input, and nothing else is written (but under ``extra_prefixes``)."""
    listed = keys(s3, bucket)
    inputs = [k for k in listed if k.startswith("inputs/")]
    results = {k for k in listed if k.startswith(("outputs/", "errors/"))}
    assert not [
        k for k in listed if k not in inputs and k not in results and not k.startswith(extra_prefixes)
    ]
    for key in inputs:
        answers = {f"{kind}/{key.removeprefix('inputs/')}.json" for kind in ("outputs", "errors")} & results
        expected = 0 if key in dead_lettered else 1
        assert len(answers) == expected, (key, answers)
    answered = {f"inputs/{k.split('/', 1)[1].removesuffix('.json')}" for k in results}
    assert answered <= set(inputs), answered - set(inputs)
