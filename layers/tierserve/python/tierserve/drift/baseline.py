"""A model's input baseline: per feature, the quantile bins of the data it was checked on.

A *feature* is one element position of an input's rows (``input[2]`` is column 2 of a
``[-1, 4]`` input). An input with more than :data:`MAX_FEATURES_PER_INPUT` elements per row
(an image) is one pooled feature, ``image[*]``: the distribution of all its values (sampled),
since a per-pixel baseline would be larger than the model. Strings are not binned.

Each feature keeps the inner edges of :data:`BINS` equal-frequency bins (deciles) and the
fraction of baseline rows in each bin (counted, not assumed: ties in discrete features make
bins unequal). ``baseline.json`` lies beside ``manifest.json``; the manifest's
``extra.baseline`` records its sha256 and size, so a reader can tell it belongs to that
version. It is data from outside: :meth:`Baseline.from_json` reads it strictly and bounded,
and nothing in it names a path.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tierserve.catalog import ManifestError, TensorSpec, load_json

BASELINE_NAME = "baseline.json"
SCHEMA_VERSION = 1
BINS = 10
MAX_FEATURES_PER_INPUT = 64
MAX_FEATURES = 512
MAX_BASELINE_BYTES = 2 * 1024 * 1024
MAX_BASELINE_FILE_BYTES = 256 * 1024 * 1024  # a --baseline .npy/.json/.jsonl file
MAX_POOLED_VALUES = 200_000
MIN_BASELINE_ROWS = 10
NUMERIC_KINDS = "biuf"


class BaselineError(ValueError):
    """A baseline that cannot be built or read; the message says what to fix."""


@dataclass(frozen=True)
class FeatureBins:
    """One feature's bins: ``edges`` (ascending inner edges, len = bins - 1) and
    ``fractions`` (each bin's share of the baseline rows, summing to 1)."""

    name: str
    input: str
    edges: tuple[float, ...]
    fractions: tuple[float, ...]

    def counts(self, values: np.ndarray) -> np.ndarray:
        """How many of ``values`` fall in each bin (a value on an edge goes to the lower bin)."""
        index = np.searchsorted(np.asarray(self.edges, dtype=np.float64), values, side="left")
        return np.bincount(index, minlength=len(self.fractions))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input": self.input,
            "edges": list(self.edges),
            "fractions": list(self.fractions),
        }


@dataclass(frozen=True)
class Baseline:
    """Every feature's bins for one model version, and how many rows they came from."""

    model: str
    version: str
    rows: int
    source: str
    features: tuple[FeatureBins, ...]

    def to_json(self) -> str:
        return json.dumps(
            {
                "schema_version": SCHEMA_VERSION,
                "model": self.model,
                "version": self.version,
                "rows": self.rows,
                "source": self.source,
                "features": [f.to_dict() for f in self.features],
            },
            indent=1,
        )

    def digest(self) -> dict[str, Any]:
        """What the manifest's ``extra.baseline`` records about this file."""
        data = self.to_json().encode()
        return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "rows": self.rows}

    @classmethod
    def from_json(cls, text: str | bytes, *, what: str = "the baseline") -> Baseline:
        """Parse ``baseline.json`` strictly: bounded size, no constants or duplicate keys, every
        field typed, edges ascending, fractions a distribution.

        Raises:
            BaselineError: what is wrong, naming the field.
        """
        try:
            data = load_json(text, what, max_bytes=MAX_BASELINE_BYTES)
        except ManifestError as error:
            raise BaselineError(str(error)) from None
        return cls.from_dict(data, what=what)

    @classmethod
    def from_dict(cls, data: Any, *, what: str = "the baseline") -> Baseline:
        fields = {"schema_version", "model", "version", "rows", "source", "features"}
        if (
            not isinstance(data, dict)
            or set(data) - fields
            or not {"model", "version", "features"} <= set(data)
        ):
            raise BaselineError(
                f"{what} must be an object with the fields {sorted(fields)}: package it again"
            )
        if data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise BaselineError(
                f"{what} has schema_version {reprlib.repr(data.get('schema_version'))}, not 1"
            )
        features = data["features"]
        if not isinstance(features, list) or not 0 < len(features) <= MAX_FEATURES:
            raise BaselineError(f"{what} must list 1 to {MAX_FEATURES} features")
        rows = data.get("rows", 0)
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise BaselineError(f'{what}: "rows" must be a whole number')
        return cls(
            model=_text(data["model"], "model", what),
            version=_text(data["version"], "version", what),
            rows=rows,
            source=_text(data.get("source", ""), "source", what, empty=True),
            features=tuple(_feature(f, i, what) for i, f in enumerate(features)),
        )


def _text(value: Any, name: str, what: str, *, empty: bool = False, limit: int = 200) -> str:
    if not isinstance(value, str) or len(value) > limit or (not value and not empty):
        raise BaselineError(f'{what}: "{name}" must be text of at most {limit} characters')
    return value


def _feature(data: Any, index: int, what: str) -> FeatureBins:
    where = f"{what}: features[{index}]"
    if not isinstance(data, dict) or set(data) != {"name", "input", "edges", "fractions"}:
        raise BaselineError(f"{where} must have exactly name, input, edges and fractions")
    edges, fractions = data["edges"], data["fractions"]
    if not isinstance(edges, list) or not isinstance(fractions, list) or not 0 < len(fractions) <= 4 * BINS:
        raise BaselineError(f"{where}: edges and fractions must be lists of at most {4 * BINS} bins")
    if len(edges) != len(fractions) - 1 or not all(_is_number(v) for v in (*edges, *fractions)):
        raise BaselineError(f"{where}: needs one edge fewer than fractions, all numbers")
    if any(b <= a for a, b in itertools.pairwise(edges)):
        raise BaselineError(f"{where}: edges must be strictly ascending")
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-3:
        raise BaselineError(f"{where}: fractions must be at least 0 and sum to 1")
    return FeatureBins(
        name=_text(data["name"], "name", where),
        input=_text(data["input"], "input", where),
        edges=tuple(float(e) for e in edges),
        fractions=tuple(float(f) for f in fractions),
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ---------------------------------------------------------------- building one


def feature_columns(
    inputs: Sequence[str], arrays: Mapping[str, np.ndarray]
) -> dict[str, tuple[str, np.ndarray]]:
    """Feature name -> (input name, the values of that feature over every row), for the
    numeric ``inputs`` (names) of ``arrays`` (rows along the first axis). Used alike for the
    baseline and for a window of captured requests, so both cut features the same way."""
    columns: dict[str, tuple[str, np.ndarray]] = {}
    for name in inputs:
        array = arrays.get(name)
        if array is None or array.dtype.kind not in NUMERIC_KINDS:
            continue
        values = np.asarray(array, dtype=np.float64)
        rows = values.reshape(values.shape[0], -1) if values.ndim >= 1 else values.reshape(1, 1)
        width = rows.shape[1]
        if width > MAX_FEATURES_PER_INPUT:
            pooled = rows.reshape(-1)
            if pooled.size > MAX_POOLED_VALUES:
                pooled = pooled[:: pooled.size // MAX_POOLED_VALUES + 1]
            columns[f"{name}[*]"] = (name, pooled)
            continue
        for column in range(width):
            columns[f"{name}[{column}]"] = (name, rows[:, column])
    return columns


def build_baseline(
    model: str, version: str, inputs: Sequence[TensorSpec], arrays: Mapping[str, np.ndarray], *, source: str
) -> Baseline:
    """Quantile bins of each feature of ``arrays`` (see the module docstring).

    Raises:
        BaselineError: fewer than :data:`MIN_BASELINE_ROWS` rows, no numeric input, or more
            than :data:`MAX_FEATURES` features.
    """
    rows = max((a.shape[0] for a in arrays.values() if a.ndim), default=0)
    if rows < MIN_BASELINE_ROWS:
        raise BaselineError(
            f"a baseline needs at least {MIN_BASELINE_ROWS} rows of real inputs ({rows} given): pass more rows "
            "with --baseline FILE or --inputs FILE"
        )
    columns = feature_columns([spec.name for spec in inputs], arrays)
    if not columns:
        raise BaselineError("the model has no numeric input to keep a baseline of: drop --baseline")
    if len(columns) > MAX_FEATURES:
        raise BaselineError(f"{len(columns)} features are over the {MAX_FEATURES} a baseline may keep")
    features = []
    for name, (input_name, values) in columns.items():
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            raise BaselineError(f"feature {name} has no finite value in the baseline rows: give real inputs")
        edges = np.unique(np.quantile(finite, np.linspace(0, 1, BINS + 1)[1:-1]))
        bins = FeatureBins(name, input_name, tuple(float(e) for e in edges), (1.0,) * (len(edges) + 1))
        counts = bins.counts(finite)
        fractions = tuple(round(float(c) / finite.size, 6) for c in counts)
        features.append(FeatureBins(name, input_name, bins.edges, _normalized(fractions)))
    return Baseline(model, version, rows, source, tuple(features))


def _normalized(fractions: tuple[float, ...]) -> tuple[float, ...]:
    total = sum(fractions)
    return tuple(f / total for f in fractions)


def read_baseline_rows(path: Path, inputs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Rows for a baseline from ``--baseline FILE``: ``.npy`` (one input: its rows; or a
    structured array named by input), ``.json`` (``{"input": [[...], ...]}`` or a list of rows of
    a single-input model), ``.jsonl`` (one row per line: a list for a single-input model, or an
    object by input name). Bounded to :data:`MAX_BASELINE_FILE_BYTES`; no pickles.

    Raises:
        BaselineError: the file is missing, too large, of another kind, or does not fit the inputs.
    """
    path = Path(path)
    if not path.is_file():
        raise BaselineError(
            f"baseline file {path} does not exist: give a .npy, .json or .jsonl of model inputs"
        )
    size = path.stat().st_size
    if size > MAX_BASELINE_FILE_BYTES:
        raise BaselineError(
            f"baseline file {path} is {size:,} bytes, over the {MAX_BASELINE_FILE_BYTES:,} it may be: sample it"
        )
    try:
        if path.suffix == ".npy":
            raw = _npy_rows(np.load(path, allow_pickle=False), inputs, path)
        elif path.suffix == ".json":
            raw = _json_rows(
                load_json(path.read_bytes(), f"baseline file {path}", MAX_BASELINE_FILE_BYTES), inputs, path
            )
        elif path.suffix == ".jsonl":
            raw = _jsonl_rows(path, inputs)
        else:
            raise BaselineError(f"baseline file {path} must be .npy, .json or .jsonl")
    except BaselineError:
        raise
    except ManifestError as error:  # already says which file and what is wrong
        raise BaselineError(str(error)) from None
    except (ValueError, OSError) as error:
        raise BaselineError(f"baseline file {path} cannot be read ({reprlib.repr(str(error))})") from None
    return _check_rows(raw, inputs, path)


def _single(inputs: Sequence[TensorSpec], path: Path) -> str:
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise BaselineError(
            f"baseline file {path} holds rows of one input but the model has {names}: name each input"
        )
    return inputs[0].name


def _npy_rows(array: np.ndarray, inputs: Sequence[TensorSpec], path: Path) -> dict[str, Any]:
    if array.dtype.names:
        return {name: array[name] for name in array.dtype.names}
    return {_single(inputs, path): array}


def _json_rows(data: Any, inputs: Sequence[TensorSpec], path: Path) -> dict[str, Any]:
    if isinstance(data, list):
        return {_single(inputs, path): data}
    if isinstance(data, dict):
        return data
    raise BaselineError(f"baseline file {path} must hold a list of rows or an object of rows by input name")


def _jsonl_rows(path: Path, inputs: Sequence[TensorSpec]) -> dict[str, Any]:
    columns: dict[str, list[Any]] = {}
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = load_json(line, f"line {number} of {path}", MAX_BASELINE_BYTES)
            except ManifestError as error:
                raise BaselineError(str(error)) from None
            by_input = row if isinstance(row, dict) else {_single(inputs, path): row}
            for name, value in by_input.items():
                columns.setdefault(str(name), []).append(value)
    return columns


def _check_rows(raw: Mapping[str, Any], inputs: Sequence[TensorSpec], path: Path) -> dict[str, np.ndarray]:
    specs = {s.name: s for s in inputs}
    unknown = sorted(set(raw) - set(specs))
    if unknown:
        raise BaselineError(
            f"baseline file {path} names {unknown}, which the model does not take (it takes {sorted(specs)})"
        )
    arrays: dict[str, np.ndarray] = {}
    for name, values in raw.items():
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise BaselineError(f"baseline rows of {name!r} in {path} are not numbers of one shape") from None
        shape = specs[name].shape
        if array.ndim != len(shape) or any(
            w not in (-1, h) for h, w in zip(array.shape[1:], shape[1:], strict=True)
        ):
            raise BaselineError(
                f"baseline rows of {name!r} in {path} have shape {list(array.shape)}; the model takes {list(shape)}"
            )
        arrays[name] = array
    if not arrays:
        raise BaselineError(f"baseline file {path} holds no rows")
    return arrays
