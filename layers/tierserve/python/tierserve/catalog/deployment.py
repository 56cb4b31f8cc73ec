"""The catalog of models to deploy (a JSON file listing each with its manifest, so the CDK
app synthesizes offline), the one tier rule (:func:`tier_for`) both the CDK app and the local
API ask, and a Lambda-tier model's function memory."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierserve.catalog.manifest import MANIFEST_NAME, Manifest, Tier
from tierserve.catalog.strict_json import MB, ManifestError, _boolean, _get, _object, _string, load_json

DEFAULT_LAMBDA_MAX_MODEL_MB = 512
LAMBDA_MIN_MEMORY_MB = 1024
LAMBDA_MAX_MEMORY_MB = 10240
MAX_CATALOG_BYTES = 64 * MB


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
