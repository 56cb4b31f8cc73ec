"""The project's catalog: where it is, registering a model in it, and checking it.

The catalog file is the one ``cdk.json`` names (context ``catalog``, default
``catalog.json`` beside ``cdk.json``); ``cdk.json`` is looked for in the current folder and
its parents, as git looks for ``.git``, and read by the CDK app's own validated reader
(:mod:`tierserve.tools.cdk_context`). An explicit path wins.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierserve.catalog import (
    MANIFEST_NAME,
    MAX_CATALOG_BYTES,
    Catalog,
    CatalogEntry,
    Manifest,
    ManifestError,
    load_json,
    tier_for,
)
from tierserve.tools.cdk_context import ConfigError, InfraConfig, find_cdk_json
from tierserve.tools.packaging._errors import CatalogProblem
from tierserve.tools.packaging._upload import S3Location, object_missing, upload_error


@dataclass(frozen=True)
class ProjectConfig:
    """What packaging needs from ``cdk.json``: the catalog file, the tier threshold, and the S3
    bandwidth a cold start reads at (``fetch_connections`` x ``s3_mb_per_s_per_connection``)."""

    catalog_path: Path | None
    lambda_max_model_mb: float
    cdk_json: Path | None
    target_mb_s: float = InfraConfig().cold_start_mb_per_s


def project_config(
    catalog: Path | None = None, start: Path | None = None, *, need_catalog: bool = True
) -> ProjectConfig:
    """Read ``cdk.json`` (if any) for the catalog path and ``lambda_max_model_mb``, validated by
    the CDK app's own reader (:class:`~tierserve.tools.cdk_context.InfraConfig`).

    Without ``need_catalog``, a missing ``cdk.json`` is fine: the threshold is the default
    and ``catalog_path`` is None.

    Raises:
        CatalogProblem: no ``catalog`` and no ``cdk.json`` found (when needed), or a
            ``cdk.json`` that ``cdk synth`` would refuse (the same message).
    """
    cdk_json = find_cdk_json(start or Path.cwd())
    try:
        config = InfraConfig() if cdk_json is None else InfraConfig.from_cdk_json(cdk_json)
    except ConfigError as error:
        raise CatalogProblem(str(error)) from None
    threshold, bandwidth = config.lambda_max_model_mb, config.cold_start_mb_per_s
    if catalog is not None:
        return ProjectConfig(Path(catalog), threshold, cdk_json, bandwidth)
    if cdk_json is None:
        if not need_catalog:
            return ProjectConfig(None, threshold, None, bandwidth)
        raise CatalogProblem(
            "no cdk.json in this folder or above it, so no catalog to register the model in: "
            "run from the project, pass --catalog PATH, or --no-register"
        )
    return ProjectConfig(config.catalog_path(cdk_json.parent), threshold, cdk_json, bandwidth)


def load_catalog(path: Path) -> Catalog:
    """The catalog at ``path`` (missing: empty), or a :class:`CatalogProblem` that says what is wrong."""
    try:
        return Catalog.load(path)
    except ManifestError as error:
        raise CatalogProblem(f"{error}: fix it, or run `tierserve catalog validate`") from None


def register(manifest: Manifest, path: Path) -> Catalog:
    """Add or replace the model's entry; the file is replaced atomically."""
    catalog = load_catalog(path).with_entry(manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.partial"
    try:
        catalog.save(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return catalog


@dataclass(frozen=True)
class EntryCheck:
    label: str
    tier: str | None
    problems: tuple[str, ...]


def validate_catalog(
    path: Path,
    lambda_max_model_mb: float,
    s3: S3Location | None = None,
    client_factory: Callable[[], Any] | None = None,
) -> list[EntryCheck]:
    """Check every entry on its own, so one bad entry does not hide the others.

    The file must be strict JSON (:func:`tierserve.catalog.load_json`); each entry's manifest
    must be valid (:meth:`CatalogEntry.from_dict`: every field of its type, digests of 64 hex
    and a positive size), its name and version must match the entry, names must be unique,
    and the tier is decided by :func:`tier_for`. With ``s3``, the manifest and artifact must
    exist there and match.
    """
    try:
        with path.open("rb") as handle:
            text = handle.read(MAX_CATALOG_BYTES + 1)
    except FileNotFoundError:
        return []  # no catalog is an empty one (Catalog.load agrees): nothing deploys, nothing is wrong
    except OSError as error:
        raise CatalogProblem(f"catalog {path} cannot be read ({error.strerror or error})") from None
    try:
        raw = load_json(text, f"catalog {path}", MAX_CATALOG_BYTES)
    except ManifestError as error:
        raise CatalogProblem(f"{error}: fix it by hand or restore it") from None
    entries = raw.get("models") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise CatalogProblem(f'catalog {path} must be an object with a "models" list')
    client = client_factory() if (s3 is not None and client_factory is not None) else None
    checks, seen = [], set()
    for index, entry in enumerate(entries):
        label = _label(entry, index)
        problems: list[str] = []
        tier = None
        try:
            manifest = CatalogEntry.from_dict(entry, index).manifest
            if manifest.name in seen:
                problems.append(
                    f"{manifest.name} is listed more than once: keep one deployed version per model"
                )
            seen.add(manifest.name)
            tier = tier_for(manifest, lambda_max_model_mb)
            if client is not None and s3 is not None:
                problems += _check_s3(client, s3, manifest)
        except ManifestError as error:
            problems.append(str(error))
        checks.append(EntryCheck(label, tier, tuple(problems)))
    return checks


def _label(entry: Any, index: int) -> str:
    """``name@version`` as the entry says them, when they are short strings; else ``#n``."""
    said = [entry.get(key) for key in ("name", "version")] if isinstance(entry, dict) else []
    if said and all(isinstance(part, str) and 0 < len(part) <= 64 for part in said):
        return f"{said[0]}@{said[1]}"
    return f"#{index + 1}"


def _check_s3(client: Any, where: S3Location, manifest: Manifest) -> list[str]:
    manifest_key = where.key(manifest.key_prefix, MANIFEST_NAME)
    artifact_key = where.key(manifest.key_prefix, manifest.artifact)
    problems = []
    try:
        stored = Manifest.from_json(client.get_object(Bucket=where.bucket, Key=manifest_key)["Body"].read())
        if (stored.stored, stored.model) != (manifest.stored, manifest.model):
            problems.append(
                f"s3://{where.bucket}/{manifest_key} describes other bytes than the catalog (re-upload or fix the catalog)"
            )
    except (ValueError, ManifestError) as error:
        problems.append(f"s3://{where.bucket}/{manifest_key} is not a valid manifest ({error})")
    except Exception as error:
        problems.append(_missing_or_error(error, where, manifest_key))
    try:
        size = client.head_object(Bucket=where.bucket, Key=artifact_key)["ContentLength"]
        if size != manifest.stored.bytes:
            problems.append(
                f"s3://{where.bucket}/{artifact_key} is {size:,} bytes, the manifest says {manifest.stored.bytes:,}"
            )
    except Exception as error:
        problems.append(_missing_or_error(error, where, artifact_key))
    return problems


def _missing_or_error(error: BaseException, where: S3Location, key: str) -> str:
    if object_missing(error):
        return f"s3://{where.bucket}/{key} is missing: upload it (tierserve upload PACKAGE_DIR s3://{where.bucket}/{where.prefix})"
    raise upload_error(error, where)
