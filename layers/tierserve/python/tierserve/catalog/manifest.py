"""A model's manifest: one immutable model version stored under ``models/{name}/{version}/``,
read strictly (:meth:`Manifest.from_json`, through :func:`~tierserve.catalog.strict_json.load_json`)
and validated (names follow their patterns, datatypes are v2 datatypes, sizes and dimensions in
range)."""

from __future__ import annotations

import json
import re
import reprlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from tierserve.catalog.strict_json import (
    ManifestError,
    _boolean,
    _choice,
    _described,
    _get,
    _integer,
    _object,
    _optional_object,
    _quoted,
    _string,
    load_json,
)

MANIFEST_SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

Tier = Literal["lambda", "gpu"]
TIERS: tuple[str, ...] = ("lambda", "gpu")
FORMATS = {"onnx", "ort"}
COMPRESSIONS = {"zstd": ".zst", "gzip": ".gz", "none": ""}
# Names become S3 keys, CloudFormation ids and URL path parts: keep them boring.
NAME_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# The v2 datatypes a signature may declare (tierserve.protocol maps them to numpy; BF16 is
# declared by models that use it, and refused per request with a message).
DATATYPE_NAMES: tuple[str, ...] = (
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
    "BF16",
)
# Bounds on what a manifest may declare: far past any real model, well short of what would
# overflow a computation or a buffer.
MAX_MODEL_BYTES = 1 << 40  # 1 TiB
MAX_TENSORS = 1024  # inputs, and outputs
MAX_RANK = 64  # numpy's most dimensions
MAX_DIMENSION = 2**63 - 1  # onnxruntime's int64
MAX_TENSOR_NAME = 1024
MAX_ARTIFACT_NAME = 255  # a file name
MAX_LABEL = 64  # quantization
MAX_ROUND_DECIMALS = 15  # a double's ~15.9 significant decimal digits: past them rounding is a no-op
MAX_TOP_K = 1_000_000
MAX_CACHE_ENTRIES = 1_000_000
MAX_CACHE_MB = 10_240  # a Lambda function's most memory
FLOAT_DATATYPES = ("FP16", "FP32", "FP64")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, v2 datatype and shape (-1 for a dynamic dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "tensor") -> TensorSpec:
        """One tensor of a signature, each field of its JSON type; raises :class:`ManifestError`."""
        data = _object(data, _quoted(path), ("name", "datatype", "shape"))
        shape = _get(data, "shape", f"{path}.shape")
        if not isinstance(shape, list) or len(shape) > MAX_RANK:
            raise ManifestError(
                f"{_quoted(path + '.shape')} must be a list of at most {MAX_RANK} dimensions, "
                f"e.g. [-1, 4], got {_described(shape)}"
            )
        return cls(
            _string(_get(data, "name", f"{path}.name"), f"{path}.name", limit=MAX_TENSOR_NAME),
            _choice(_get(data, "datatype", f"{path}.datatype"), f"{path}.datatype", DATATYPE_NAMES),
            tuple(_integer(d, f"{path}.shape[{i}]", -1, MAX_DIMENSION) for i, d in enumerate(shape)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Digest:
    """sha256 and byte size of one form of the model (as stored, or decompressed)."""

    sha256: str
    bytes: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "digest") -> Digest:
        data = _object(data, _quoted(path), ("sha256", "bytes"))
        return cls(
            _string(_get(data, "sha256", f"{path}.sha256"), f"{path}.sha256", limit=64),
            _integer(_get(data, "bytes", f"{path}.bytes"), f"{path}.bytes", 1, MAX_MODEL_BYTES),
        )


@dataclass(frozen=True)
class OutputLimits:
    """What a response may reveal of a model's floating-point outputs (against extraction by
    querying): ``round`` to that many decimals, ``top_k`` keeps the k largest values along the
    last axis of each row and sets the others to 0; ``outputs`` names the outputs limited
    (empty: every FP16/FP32/FP64 output). Applied by :mod:`tierserve.output_limits`."""

    round: int | None = None
    top_k: int | None = None
    outputs: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Any, path: str = "output_limits") -> OutputLimits:
        data = _object(data, _quoted(path), ("round", "top_k", "outputs"))
        decimals = data.get("round")
        top_k = data.get("top_k")
        names = _get(data, "outputs", f"{path}.outputs", [])
        if not isinstance(names, list) or len(names) > MAX_TENSORS:
            raise ManifestError(
                f"{_quoted(path + '.outputs')} must be a list of output names, got {_described(names)}"
            )
        limits = cls(
            round=None if decimals is None else _integer(decimals, f"{path}.round", 0, MAX_ROUND_DECIMALS),
            top_k=None if top_k is None else _integer(top_k, f"{path}.top_k", 1, MAX_TOP_K),
            outputs=tuple(
                _string(name, f"{path}.outputs[{i}]", limit=MAX_TENSOR_NAME) for i, name in enumerate(names)
            ),
        )
        if limits.round is None and limits.top_k is None:
            raise ManifestError(
                f'{_quoted(path)} limits nothing: give "round" (decimals, 0 to {MAX_ROUND_DECIMALS}), '
                '"top_k" (classes kept per row), or both; or remove it'
            )
        return limits

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"outputs": list(self.outputs)}
        if self.round is not None:
            data["round"] = self.round
        if self.top_k is not None:
            data["top_k"] = self.top_k
        return data


@dataclass(frozen=True)
class ResponseCachePolicy:
    """The model's opt-in response cache: at most ``max_entries`` answers and ``max_mb`` of
    them per execution environment; ``shared_across_callers`` lets callers with different
    identities read each other's answers (only for a model whose answers reveal nothing about
    who asked). Applied by :mod:`tierserve.response_cache`."""

    max_entries: int = 1024
    max_mb: int = 64
    shared_across_callers: bool = False

    @classmethod
    def from_dict(cls, data: Any, path: str = "response_cache") -> ResponseCachePolicy:
        data = _object(data, _quoted(path), ("max_entries", "max_mb", "shared_across_callers"))
        default = cls()
        return cls(
            max_entries=_integer(
                _get(data, "max_entries", f"{path}.max_entries", default.max_entries),
                f"{path}.max_entries",
                1,
                MAX_CACHE_ENTRIES,
            ),
            max_mb=_integer(
                _get(data, "max_mb", f"{path}.max_mb", default.max_mb), f"{path}.max_mb", 1, MAX_CACHE_MB
            ),
            shared_across_callers=_boolean(
                _get(data, "shared_across_callers", f"{path}.shared_across_callers", False),
                f"{path}.shared_across_callers",
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` says about one model version."""

    name: str
    version: str
    format: str
    compression: str
    artifact: str
    stored: Digest
    model: Digest
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    quantization: str = "none"
    optimized: bool = False
    accuracy: Mapping[str, Any] | None = None
    tier: Tier | None = None
    allow_non_finite: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)
    output_limits: OutputLimits | None = None
    response_cache: ResponseCachePolicy | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Parse and validate a manifest; raises :class:`ManifestError` naming the bad field."""
        data = _object(data, "a manifest", (*MANIFEST_FIELDS, "schema_version"))
        schema = _get(data, "schema_version", "schema_version", MANIFEST_SCHEMA_VERSION)
        if schema != MANIFEST_SCHEMA_VERSION or isinstance(schema, bool):
            raise ManifestError(
                f'"schema_version" {reprlib.repr(schema)} is not {MANIFEST_SCHEMA_VERSION}, the one this '
                "tierserve reads: package the model with this version of tierserve"
            )
        manifest = cls(
            name=_string(_get(data, "name", "name"), "name", limit=64),
            version=_string(_get(data, "version", "version"), "version", limit=64),
            format=_choice(_get(data, "format", "format", "onnx"), "format", FORMATS),
            compression=_choice(
                _get(data, "compression", "compression", "zstd"), "compression", COMPRESSIONS
            ),
            artifact=_string(_get(data, "artifact", "artifact"), "artifact", limit=MAX_ARTIFACT_NAME),
            stored=Digest.from_dict(_get(data, "stored", "stored"), "stored"),
            model=Digest.from_dict(_get(data, "model", "model"), "model"),
            inputs=_tensors(data, "inputs"),
            outputs=_tensors(data, "outputs"),
            quantization=_string(
                _get(data, "quantization", "quantization", "none"), "quantization", limit=MAX_LABEL
            ),
            optimized=_boolean(_get(data, "optimized", "optimized", False), "optimized"),
            accuracy=_optional_object(_get(data, "accuracy", "accuracy", None), "accuracy"),
            tier=None if data.get("tier") is None else _choice(data["tier"], "tier", TIERS),  # type: ignore[arg-type]
            allow_non_finite=_boolean(
                _get(data, "allow_non_finite", "allow_non_finite", False), "allow_non_finite"
            ),
            extra=_optional_object(_get(data, "extra", "extra", None), "extra") or {},
            output_limits=None
            if data.get("output_limits") is None
            else OutputLimits.from_dict(data["output_limits"]),
            response_cache=None
            if data.get("response_cache") is None
            else ResponseCachePolicy.from_dict(data["response_cache"]),
        )
        manifest.validate()
        return manifest

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """A manifest from its JSON text (``manifest.json``), strictly: see :func:`load_json`.

        Raises:
            ManifestError: what is wrong, as "<where> is not a valid manifest: <what>" completes it.
        """
        return cls.from_dict(load_json(text))

    def validate(self) -> None:
        problems = []
        if not NAME_PATTERN.match(self.name):
            problems.append(f"name {self.name!r} must be lowercase letters, digits and dashes (max 64)")
        if not VERSION_PATTERN.match(self.version):
            problems.append(f"version {self.version!r} must be letters, digits, '.', '_' or '-'")
        if self.format not in FORMATS:
            problems.append(f"format {self.format!r} must be one of {sorted(FORMATS)}")
        if self.compression not in COMPRESSIONS:
            problems.append(f"compression {self.compression!r} must be one of {sorted(COMPRESSIONS)}")
        if (
            not self.artifact
            or "/" in self.artifact
            or "\\" in self.artifact
            or self.artifact.startswith(".")
        ):
            problems.append(f"artifact {self.artifact!r} must be a plain file name next to the manifest")
        for digest in (self.stored, self.model):
            if not re.fullmatch(r"[0-9a-f]{64}", digest.sha256) or digest.bytes <= 0:
                problems.append("stored and model digests need a 64-hex sha256 and a positive size")
        if self.tier is not None and self.tier not in TIERS:
            problems.append(f"tier {self.tier!r} must be one of {list(TIERS)} or absent")
        if not self.inputs or not self.outputs:
            problems.append("a model needs at least one input and one output")
        for kind, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            problems += _signature_problems(kind, specs)
        if self.output_limits is not None:
            problems += _output_limit_problems(self.output_limits, self.outputs)
        cache = self.response_cache
        if cache is not None and not (
            1 <= cache.max_entries <= MAX_CACHE_ENTRIES and 1 <= cache.max_mb <= MAX_CACHE_MB
        ):
            problems.append(
                f"response_cache holds 1 to {MAX_CACHE_ENTRIES:,} entries (max_entries) "
                f"in 1 to {MAX_CACHE_MB:,} MB (max_mb)"
            )
        if problems:
            raise ManifestError(f"manifest for {self.name}@{self.version}: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["inputs"] = [t.to_dict() for t in self.inputs]
        data["outputs"] = [t.to_dict() for t in self.outputs]
        data["schema_version"] = MANIFEST_SCHEMA_VERSION
        for key in ("output_limits", "response_cache"):  # absent, not null: older readers refuse unknown keys
            value = getattr(self, key)
            if value is None:
                data.pop(key)
            else:
                data[key] = value.to_dict()
        return data

    def to_json(self) -> str:
        """Strict JSON, as :meth:`from_json` reads it (a non-finite number is refused here, not there)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    @property
    def key_prefix(self) -> str:
        """Where this version lives under the model prefix: ``{name}/{version}``."""
        return f"{self.name}/{self.version}"

    @property
    def cache_key(self) -> tuple[str, str, str]:
        return (self.name, self.version, self.model.sha256)


MANIFEST_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Manifest))


def _tensors(data: Mapping[str, Any], key: str) -> tuple[TensorSpec, ...]:
    specs = _get(data, key, key)
    if not isinstance(specs, list) or not 1 <= len(specs) <= MAX_TENSORS:
        raise ManifestError(
            f"{_quoted(key)} must be a list of at least one tensor and at most {MAX_TENSORS} "
            f'({{"name", "datatype", "shape"}}), got {_described(specs)}'
        )
    return tuple(TensorSpec.from_dict(spec, f"{key}[{index}]") for index, spec in enumerate(specs))


def _output_limit_problems(limits: OutputLimits, outputs: tuple[TensorSpec, ...]) -> list[str]:
    """Output limits must name floating-point outputs of this model, and leave one to limit."""
    by_name = {spec.name: spec for spec in outputs}
    problems = []
    for name in limits.outputs:
        spec = by_name.get(name)
        if spec is None:
            problems.append(
                f"output_limits names {reprlib.repr(name)}, not an output of the model ({', '.join(by_name)})"
            )
        elif spec.datatype not in FLOAT_DATATYPES:
            problems.append(
                f"output_limits names {reprlib.repr(name)}, a {spec.datatype} output: only "
                f"{'/'.join(FLOAT_DATATYPES)} outputs (scores, probabilities) can be rounded or cut to the top k"
            )
    if not limits.outputs and not any(spec.datatype in FLOAT_DATATYPES for spec in outputs):
        problems.append("output_limits would limit nothing: the model has no FP16/FP32/FP64 output")
    return problems


def _signature_problems(kind: str, specs: tuple[TensorSpec, ...]) -> list[str]:
    """What is wrong with one side of a signature built in code (parsing checks the same)."""
    problems: list[str] = []
    for spec in specs:
        if not spec.name:
            problems.append(f"{kind} need names: one has an empty name")
        if spec.datatype not in DATATYPE_NAMES:
            problems.append(
                f"{kind} {reprlib.repr(spec.name)} has datatype {reprlib.repr(spec.datatype)}, "
                f"not one of {list(DATATYPE_NAMES)}"
            )
        if len(spec.shape) > MAX_RANK or any(not -1 <= d <= MAX_DIMENSION for d in spec.shape):
            problems.append(
                f"{kind} {reprlib.repr(spec.name)} has shape {reprlib.repr(list(spec.shape))}: "
                f"dimensions are -1 (any size) or more, at most {MAX_RANK} of them"
            )
    twice = sorted(name for name, count in Counter(spec.name for spec in specs).items() if count > 1)
    if twice:
        problems.append(f"{kind} {reprlib.repr(twice)} appear more than once: each tensor needs its own name")
    return problems
