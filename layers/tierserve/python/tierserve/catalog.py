"""Model manifests, the catalog, and the one tier rule.

A manifest describes one immutable model version stored under
``models/{name}/{version}/``. The catalog is a JSON file listing the models to deploy,
each with its manifest, so the CDK app synthesizes offline. Both the CDK app and the
local API ask :func:`tier_for` which tier serves a model: they can never disagree.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

MANIFEST_SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
DEFAULT_LAMBDA_MAX_MODEL_MB = 512
LAMBDA_MIN_MEMORY_MB = 1024
LAMBDA_MAX_MEMORY_MB = 10240
MB = 1024 * 1024

Tier = Literal["lambda", "gpu"]
TIERS: tuple[str, ...] = ("lambda", "gpu")
FORMATS = {"onnx", "ort"}
COMPRESSIONS = {"zstd": ".zst", "gzip": ".gz", "none": ""}
# Names become S3 keys, CloudFormation ids and URL path parts: keep them boring.
NAME_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ManifestError(ValueError):
    """A manifest or catalog that does not describe a servable model; the message says why."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, v2 datatype and shape (-1 for a dynamic dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["datatype"]), tuple(int(d) for d in data["shape"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Digest:
    """sha256 and byte size of one form of the model (as stored, or decompressed)."""

    sha256: str
    bytes: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Digest:
        return cls(str(data["sha256"]), int(data["bytes"]))


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
        try:
            manifest = cls(
                name=str(data["name"]),
                version=str(data["version"]),
                format=str(data.get("format", "onnx")),
                compression=str(data.get("compression", "zstd")),
                artifact=str(data["artifact"]),
                stored=Digest.from_dict(data["stored"]),
                model=Digest.from_dict(data["model"]),
                inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
                quantization=str(data.get("quantization", "none")),
                optimized=bool(data.get("optimized", False)),
                accuracy=data.get("accuracy"),
                tier=data.get("tier"),
                allow_non_finite=bool(data.get("allow_non_finite", False)),
                extra=dict(data.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ManifestError(f"manifest is missing or has a malformed field: {error}") from error
        manifest.validate()
        return manifest

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
        if problems:
            raise ManifestError(f"manifest for {self.name}@{self.version}: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["inputs"] = [t.to_dict() for t in self.inputs]
        data["outputs"] = [t.to_dict() for t in self.outputs]
        data["schema_version"] = MANIFEST_SCHEMA_VERSION
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @property
    def key_prefix(self) -> str:
        """Where this version lives under the model prefix: ``{name}/{version}``."""
        return f"{self.name}/{self.version}"

    @property
    def cache_key(self) -> tuple[str, str, str]:
        return (self.name, self.version, self.model.sha256)


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    version: str
    manifest: Manifest


@dataclass(frozen=True)
class Catalog:
    """The models to deploy. Order is preserved so synth is deterministic."""

    entries: tuple[CatalogEntry, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Catalog:
        models = data.get("models", []) if isinstance(data, Mapping) else None
        if not isinstance(models, list) or not all(
            isinstance(m, Mapping) and "manifest" in m for m in models
        ):
            raise ManifestError('a catalog is {"models": [{"name", "version", "manifest": {...}}, ...]}')
        entries = []
        for raw in models:
            manifest = Manifest.from_dict(raw["manifest"])
            if (raw.get("name", manifest.name), str(raw.get("version", manifest.version))) != (
                manifest.name,
                manifest.version,
            ):
                raise ManifestError(
                    f"catalog entry {raw.get('name')} disagrees with its manifest's name/version"
                )
            entries.append(CatalogEntry(manifest.name, manifest.version, manifest))
        names = [e.name for e in entries]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ManifestError(
                f"catalog lists {duplicates} more than once: keep one deployed version per model"
            )
        return cls(tuple(entries))

    @classmethod
    def load(cls, path: str | Path) -> Catalog:
        """Read a catalog file; a missing file is an empty catalog."""
        path = Path(path)
        if not path.exists():
            return cls(())
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as error:
            raise ManifestError(f"catalog {path} is not valid JSON: {error}") from error

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": [
                {"name": e.name, "version": e.version, "manifest": e.manifest.to_dict()} for e in self.entries
            ]
        }

    def get(self, name: str) -> CatalogEntry | None:
        return next((e for e in self.entries if e.name == name), None)

    def with_entry(self, manifest: Manifest) -> Catalog:
        """A catalog where ``manifest`` replaces any entry of the same model name."""
        kept = [e for e in self.entries if e.name != manifest.name]
        return Catalog((*kept, CatalogEntry(manifest.name, manifest.version, manifest)))

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
