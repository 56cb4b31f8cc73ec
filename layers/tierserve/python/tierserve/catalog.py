"""Model manifests, the catalog, and the one tier rule.

A manifest describes one immutable model version stored under
``models/{name}/{version}/``. The catalog is a JSON file listing the models to deploy,
each with its manifest, so the CDK app synthesizes offline. Both the CDK app and the
local API ask :func:`tier_for` which tier serves a model: they can never disagree.

Manifests are data that can be hostile, so they are read strictly (:meth:`Manifest.from_json`,
:meth:`Catalog.load`, both through :func:`load_json`): strict JSON (no ``NaN`` or ``Infinity``, no number past a double,
no key twice in one object), nested at most :data:`MAX_JSON_DEPTH` levels, and every field of
its JSON type: booleans are ``true``/``false``, sizes and dimensions are integers in range,
datatypes are v2 datatypes, names follow their patterns, and no field is unknown. A
:class:`ManifestError` says which field is wrong and how; readers report it as "<where> is not
a valid manifest: <what>".
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

MB = 1024 * 1024
MANIFEST_SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
DEFAULT_LAMBDA_MAX_MODEL_MB = 512
LAMBDA_MIN_MEMORY_MB = 1024
LAMBDA_MAX_MEMORY_MB = 10240

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
MAX_JSON_DEPTH = 32  # a manifest nests 5 levels (accuracy.outputs.NAME.metric), a catalog 3 more
MAX_MANIFEST_BYTES = 1 * MB
MAX_CATALOG_BYTES = 64 * MB
MAX_MODEL_BYTES = 1 << 40  # 1 TiB
MAX_TENSORS = 1024  # inputs, and outputs
MAX_RANK = 64  # numpy's most dimensions
MAX_DIMENSION = 2**63 - 1  # onnxruntime's int64
MAX_TENSOR_NAME = 1024
MAX_ARTIFACT_NAME = 255  # a file name
MAX_LABEL = 64  # quantization


class ManifestError(ValueError):
    """A manifest or catalog that does not describe a servable model; the message says why."""


def load_json(text: str | bytes, what: str = "the manifest", max_bytes: int = MAX_MANIFEST_BYTES) -> Any:
    """Parse a manifest or catalog (``what`` in messages) as strict, bounded JSON (see the
    module docstring).

    Raises:
        ManifestError: over ``max_bytes``, not UTF-8 JSON, non-finite or overlong numbers, a key
            twice, or nested deeper than :data:`MAX_JSON_DEPTH`; the message names which.
    """
    if len(text) > max_bytes:
        raise ManifestError(f"{what} is {len(text):,} bytes, over the {max_bytes:,} bytes it may be")
    try:
        value = json.loads(
            text, parse_constant=_no_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys
        )
    except _Refused as refused:
        raise ManifestError(f"{what} {refused}") from None
    except RecursionError:
        raise ManifestError(
            f"{what} is nested too deeply to parse (it may be {MAX_JSON_DEPTH} levels deep)"
        ) from None
    except json.JSONDecodeError as error:
        raise ManifestError(f"{what} is not valid JSON ({error})") from None
    except UnicodeError:
        raise ManifestError(f"{what} is not UTF-8 text") from None
    except ValueError:  # Python refuses to convert an integer of over 4,300 digits
        raise ManifestError(f"{what} has an integer with too many digits") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise ManifestError(f"{what} is nested deeper than the {MAX_JSON_DEPTH} levels it may be")
    return value


class _Refused(ValueError):
    """What the strict parser's hooks refuse; :func:`load_json` says where."""


def _no_constant(name: str) -> Any:
    raise _Refused(f"holds {name}, which is not a JSON number: write finite numbers only")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"holds {reprlib.repr(text)}, a number too large for a double")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:  # readers that keep the first and readers that keep the last would disagree
            raise _Refused(f"has the key {reprlib.repr(key)} twice in one object: keep one")
        seen.add(key)
    return dict(pairs)


def _depth(value: Any) -> int:
    """How many levels of arrays and objects ``value`` nests (iteratively: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level <= MAX_JSON_DEPTH:  # deeper is refused whatever lies below
            stack.extend((child, level + 1) for child in children)
    return deepest


# ---------------------------------------------------------------- typed fields

_REQUIRED: Any = object()


def _quoted(path: str) -> str:
    return f'"{path}"'


def _described(value: Any) -> str:
    return f"a list of {len(value):,}" if isinstance(value, list) else reprlib.repr(value)


def _object(value: Any, path: str, known: Iterable[str]) -> Mapping[str, Any]:
    """``value`` as a JSON object with only ``known`` keys."""
    if not isinstance(value, Mapping):
        raise ManifestError(f"{path} must be a JSON object, got {reprlib.repr(value)}")
    known = tuple(known)
    unknown = [key for key in value if key not in known]
    if unknown:
        raise ManifestError(
            f"{path} has an unknown field {reprlib.repr(unknown[0])}: its fields are {', '.join(known)}"
        )
    return value


def _get(data: Mapping[str, Any], key: str, path: str, default: Any = _REQUIRED) -> Any:
    if key in data:
        return data[key]
    if default is _REQUIRED:
        raise ManifestError(f"{_quoted(path)} is missing")
    return default


def _string(value: Any, path: str, *, limit: int) -> str:
    """A JSON string of at most ``limit`` characters (what it must look like, :meth:`Manifest.validate` checks)."""
    if not isinstance(value, str) or len(value) > limit:
        raise ManifestError(
            f"{_quoted(path)} must be a string of at most {limit} characters, got {reprlib.repr(value)}"
        )
    return value


def _choice(value: Any, path: str, choices: Iterable[str]) -> str:
    options = sorted(choices)
    if not isinstance(value, str) or value not in options:
        raise ManifestError(f"{_quoted(path)} must be one of {options}, got {reprlib.repr(value)}")
    return value


def _integer(value: Any, path: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ManifestError(
            f"{_quoted(path)} must be a whole number (a JSON integer) from {low:,} to {high:,}, "
            f"got {reprlib.repr(value)}"
        )
    return value


def _boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ManifestError(
            f"{_quoted(path)} must be true or false (a JSON boolean), got {reprlib.repr(value)}"
        )
    return value


def _optional_object(value: Any, path: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ManifestError(f"{_quoted(path)} must be a JSON object or null, got {reprlib.repr(value)}")
    return dict(value)


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
        if problems:
            raise ManifestError(f"manifest for {self.name}@{self.version}: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["inputs"] = [t.to_dict() for t in self.inputs]
        data["outputs"] = [t.to_dict() for t in self.outputs]
        data["schema_version"] = MANIFEST_SCHEMA_VERSION
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


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    version: str
    manifest: Manifest
    # One version of a model is its default (what the unversioned routes serve); a catalog may
    # list other versions of it too, served under /versions/{v} (``"default": false``).
    default: bool = True

    @classmethod
    def from_dict(cls, data: Any, index: int) -> CatalogEntry:
        """Entry ``index`` of a catalog's ``models``: ``{"name", "version", "manifest"}`` and an
        optional ``"default"`` (true unless it says false), where name and version, when given,
        agree with the manifest's.

        Raises:
            ManifestError: "models[i] is not a valid manifest: ..." or what else is wrong.
        """
        where = f"models[{index}]"
        data = _object(data, where, ("name", "version", "manifest", "default"))
        default = _boolean(data.get("default", True), f"{where}.default")
        try:
            manifest = Manifest.from_dict(_get(data, "manifest", f"{where}.manifest"))
        except ManifestError as error:
            raise ManifestError(f"{where} is not a valid manifest: {error}") from None
        said = (
            _string(data.get("name", manifest.name), f"{where}.name", limit=64),
            _string(data.get("version", manifest.version), f"{where}.version", limit=64),
        )
        if said != (manifest.name, manifest.version):
            raise ManifestError(
                f"{where}: the entry says {said[0]}@{said[1]} but its manifest describes "
                f"{manifest.name}@{manifest.version}: make them agree"
            )
        return cls(manifest.name, manifest.version, manifest, default)

    def to_dict(self) -> dict[str, Any]:
        data = {"name": self.name, "version": self.version, "manifest": self.manifest.to_dict()}
        return data if self.default else {**data, "default": False}


@dataclass(frozen=True)
class Catalog:
    """The models to deploy: ``entries``, each model's default version (what every consumer
    serves), and ``others``, further versions of those models that the Lambda tier serves
    beside the default (under ``/versions/{v}``). Order is preserved so synth is deterministic."""

    entries: tuple[CatalogEntry, ...]
    others: tuple[CatalogEntry, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Catalog:
        """A catalog from its parsed JSON; raises :class:`ManifestError` naming the bad entry."""
        models = data.get("models", []) if isinstance(data, Mapping) and set(data) <= {"models"} else None
        if not isinstance(models, list):
            raise ManifestError('a catalog is {"models": [{"name", "version", "manifest": {...}}, ...]}')
        listed = [CatalogEntry.from_dict(raw, index) for index, raw in enumerate(models)]
        entries = [e for e in listed if e.default]
        others = [e for e in listed if not e.default]
        names = [e.name for e in entries]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ManifestError(
                f"catalog lists {duplicates} more than once as the default: keep one default version per "
                'model, and mark the others "default": false to serve them under /versions/{v}'
            )
        orphans = sorted({e.name for e in others} - set(names))
        if orphans:
            raise ManifestError(
                f'catalog lists versions of {orphans} but none is the default: remove "default": false '
                "from the version the unversioned routes should serve"
            )
        versions = [(e.name, e.version) for e in listed]
        twice = sorted({f"{n}@{v}" for n, v in versions if versions.count((n, v)) > 1})
        if twice:
            raise ManifestError(f"catalog lists {twice} more than once: list each version once")
        return cls(tuple(entries), tuple(others))

    @classmethod
    def load(cls, path: str | Path) -> Catalog:
        """Read a catalog file strictly (see :func:`load_json`); a missing file is an empty catalog.

        Raises:
            ManifestError: the file cannot be read, or is not a valid catalog; the message names it.
        """
        path = Path(path)
        if not path.exists():
            return cls(())
        try:
            with path.open("rb") as handle:
                text = handle.read(MAX_CATALOG_BYTES + 1)
        except OSError as error:
            raise ManifestError(f"catalog {path} cannot be read ({error.strerror or error})") from None
        document = load_json(text, f"catalog {path}", MAX_CATALOG_BYTES)
        try:
            return cls.from_dict(document)
        except ManifestError as error:
            raise ManifestError(f"catalog {path}: {error}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def to_dict(self) -> dict[str, Any]:
        return {"models": [e.to_dict() for e in (*self.entries, *self.others)]}

    def get(self, name: str) -> CatalogEntry | None:
        """The default version's entry of ``name``, or None."""
        return next((e for e in self.entries if e.name == name), None)

    def others_of(self, name: str) -> list[CatalogEntry]:
        """The versions of ``name`` served beside its default, in catalog order."""
        return [e for e in self.others if e.name == name]

    def with_entry(self, manifest: Manifest) -> Catalog:
        """A catalog where ``manifest`` is the only version of its model (it replaces every entry
        of the same model name)."""
        kept = [e for e in self.entries if e.name != manifest.name]
        others = tuple(e for e in self.others if e.name != manifest.name)
        return Catalog((*kept, CatalogEntry(manifest.name, manifest.version, manifest)), others)

    def by_tier(
        self, tier: Tier, lambda_max_model_mb: float = DEFAULT_LAMBDA_MAX_MODEL_MB
    ) -> list[CatalogEntry]:
        return [e for e in self.entries if tier_for(e.manifest, lambda_max_model_mb) == tier]

    def __iter__(self) -> Iterable[CatalogEntry]:  # type: ignore[override]
        return iter(self.entries)


def tier_for(manifest: Manifest, lambda_max_model_mb: float = DEFAULT_LAMBDA_MAX_MODEL_MB) -> Tier:
    """The tier rule: decompressed size at or under the threshold -> lambda, above -> gpu.

    A manifest's explicit ``tier`` wins.
    """
    if manifest.tier is not None:
        return manifest.tier
    return "lambda" if manifest.model.bytes <= lambda_max_model_mb * MB else "gpu"


def lambda_memory_mb(manifest: Manifest) -> int:
    """Function memory for a model: room for the session (about 2x the weights while it
    loads), the runtime, and a request; rounded up to 64 MB and clamped to Lambda's range.
    More memory also buys vCPUs (one per 1,769 MB), so small models still get 1 GB.
    """
    model_mb = manifest.model.bytes / MB
    wanted = 512 + 2.5 * model_mb
    rounded = int(math.ceil(wanted / 64) * 64)
    if rounded > LAMBDA_MAX_MEMORY_MB:
        raise ManifestError(
            f"{manifest.name}@{manifest.version} ({model_mb:,.0f} MB) needs about {rounded:,} MB, over Lambda's "
            f"{LAMBDA_MAX_MEMORY_MB:,} MB: drop its tier override so it goes to the GPU endpoint, or quantize it"
        )
    return max(LAMBDA_MIN_MEMORY_MB, rounded)


def manifest_key(prefix: str, name: str, version: str) -> str:
    """S3 key of a manifest: ``{prefix}/{name}/{version}/manifest.json``."""
    return "/".join(p for p in (prefix.strip("/"), name, version, MANIFEST_NAME) if p)
