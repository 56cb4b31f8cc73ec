"""Manifests for tests: a valid one as data (``raw_manifest``), and hostile ones as JSON text,
each with a fragment of the message that must refuse it (``HOSTILE_MANIFESTS``)."""

from __future__ import annotations

import json
from typing import Any


def raw_manifest(**overrides: object) -> dict[str, Any]:
    """A valid manifest of iris@1 (digests made up), with ``overrides`` applied."""
    data = {
        "name": "iris",
        "version": "1",
        "format": "onnx",
        "compression": "zstd",
        "artifact": "model.onnx.zst",
        "stored": {"sha256": "a" * 64, "bytes": 10},
        "model": {"sha256": "b" * 64, "bytes": 20},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
    }
    data.update(overrides)
    return data


def manifest_text(**overrides: object) -> str:
    """``raw_manifest(**overrides)`` as JSON text."""
    return json.dumps(raw_manifest(**overrides))


def with_raw(fragment: str, **overrides: object) -> str:
    """The manifest's JSON with its "extra" value replaced by ``fragment`` verbatim (JSON that
    ``json.dumps`` would not write: NaN, 1e400, a key twice, deep nesting)."""
    return manifest_text(extra={"x": "PLACEHOLDER"}, **overrides).replace('{"x": "PLACEHOLDER"}', fragment)


HOSTILE_MANIFESTS = {
    "nested-past-the-parser": (with_raw("[" * 100_000 + "]" * 100_000), "nested too deeply to parse"),
    "nested-past-the-bound": (with_raw("[" * 200 + "]" * 200), "nested deeper than the 32 levels"),
    "1e400": (manifest_text().replace('"bytes": 10', '"bytes": 1e400'), "a number too large for a double"),
    "Infinity": (
        manifest_text().replace('"bytes": 20', '"bytes": Infinity'),
        "Infinity, which is not a JSON number",
    ),
    "NaN-in-extra": (with_raw('{"score": NaN}'), "NaN, which is not a JSON number"),
    "string-boolean": (manifest_text(allow_non_finite="false"), '"allow_non_finite" must be true or false'),
    "number-boolean": (manifest_text(optimized=1), '"optimized" must be true or false'),
    "float-size": (manifest_text().replace('"bytes": 10', '"bytes": 10.0'), '"stored.bytes" must be a whole'),
    "huge-size": (
        manifest_text().replace('"bytes": 10', '"bytes": ' + "9" * 30),
        "from 1 to 1,099,511,627,776",
    ),
    "negative-size": (
        manifest_text().replace('"bytes": 10', '"bytes": -5'),
        '"stored.bytes" must be a whole',
    ),
    "boolean-size": (
        manifest_text().replace('"bytes": 10', '"bytes": true'),
        '"stored.bytes" must be a whole',
    ),
    "digits": (manifest_text().replace('"bytes": 10', '"bytes": ' + "1" * 5000), "too many digits"),
    "dimension-below-minus-one": (
        manifest_text(inputs=[{"name": "x", "datatype": "FP32", "shape": [-2, 4]}]),
        r'"inputs\[0\].shape\[0\]" must be a whole number \(a JSON integer\) from -1',
    ),
    "string-dimension": (
        manifest_text(inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, "4"]}]),
        r'"inputs\[0\].shape\[1\]"',
    ),
    "boolean-dimension": (
        manifest_text(outputs=[{"name": "y", "datatype": "FP32", "shape": [True]}]),
        r'"outputs\[0\].shape\[0\]"',
    ),
    "rank-100": (
        manifest_text(inputs=[{"name": "x", "datatype": "FP32", "shape": [1] * 100}]),
        "at most 64 dimensions",
    ),
    "unknown-datatype": (
        manifest_text(inputs=[{"name": "x", "datatype": "FLOAT", "shape": [1]}]),
        r'"inputs\[0\].datatype" must be one of',
    ),
    "sequence-of-maps": (
        manifest_text(outputs=[{"name": "p", "datatype": "seq(map(int64,tensor(float)))", "shape": []}]),
        r'"outputs\[0\].datatype" must be one of',
    ),
    "two-inputs-one-name": (
        manifest_text(inputs=[{"name": "x", "datatype": "FP32", "shape": [1]}] * 2),
        r"inputs \['x'\] appear more than once",
    ),
    "empty-tensor-name": (
        manifest_text(inputs=[{"name": "", "datatype": "FP32", "shape": [1]}]),
        "one has an empty name",
    ),
    "too-many-inputs": (
        manifest_text(inputs=[{"name": f"x{i}", "datatype": "FP32", "shape": [1]} for i in range(1025)]),
        "at most 1024",
    ),
    "key-twice": (
        manifest_text().replace('"name": "iris"', '"name": "iris", "name": "evil"'),
        "has the key 'name' twice",
    ),
    "unknown-field": (manifest_text(allow_nonfinite=True), "unknown field 'allow_nonfinite'"),
    "numeric-name": (manifest_text(name=7), '"name" must be a string'),
    "newer-schema": (manifest_text(schema_version=2), '"schema_version" 2 is not 1'),
    "not-an-object": ("[1, 2]", "a manifest must be a JSON object"),
    "not-json": ('{"name": ', "not valid JSON"),
    "over-a-megabyte": (with_raw(json.dumps({"pad": "x" * (1 << 20)})), "over the 1,048,576 bytes"),
}
