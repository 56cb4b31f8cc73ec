"""Where a bulk run's items come from, read the way Step Functions' Distributed Map reads them,
so the local runner and the state machine hand the batch function the same items:

    prefix     ListObjectsV2 of inputs/{model}/...: {"Key", "Etag", "Size", "LastModified", "StorageClass"}
    csv        a CSV manifest under manifests/ with a header row naming a Key column: one
               object per row, keyed by the header (an Etag column saves a HeadObject per item)
    json       a JSON array under manifests/: of keys, or of objects with a "Key"
    inventory  an S3 Inventory report (CSV format) under inventory/: its manifest.json, then each
               data file (gzip CSV, no header row) with the columns its fileSchema names; keys
               arrive URL-encoded

:func:`to_object` turns one item into the :class:`~tierserve.s3_pipeline.S3Object` the
pipeline serves, or says why it never can be (:class:`PoisonItem`).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote_plus

from tierserve.catalog import NAME_PATTERN
from tierserve.s3_pipeline import S3Object
from tierserve.settings import BUCKET_PATTERN, INPUT_PREFIX, INVENTORY_PREFIX, MANIFEST_PREFIX, MB

Reader = Literal["prefix", "csv", "json", "inventory"]
READERS: tuple[Reader, ...] = ("prefix", "csv", "json", "inventory")
MANIFEST_READERS: tuple[Reader, ...] = ("csv", "json", "inventory")
# Step Functions reads a JSON item source whole; so does this reader, within a bound.
MAX_JSON_MANIFEST_BYTES = 256 * MB
LIST_PAGE_KEYS = 1000


class BadSource(ValueError):
    """A batch source the run cannot start from; the message says what to give instead."""


class BadManifest(ValueError):
    """A manifest or inventory report that cannot be read as items (Step Functions fails the
    map run with ``States.ItemReaderFailed`` for the same files)."""


class PoisonItem(ValueError):
    """An item that names no input this run may serve: retrying cannot help."""


@dataclass(frozen=True)
class BatchSource:
    """What a run serves: every input under a prefix of ``inputs/{model}/``, or the keys a
    manifest lists, all in the data bucket ``bucket``."""

    bucket: str
    model: str
    reader: Reader = "prefix"
    key: str = ""  # the prefix (reader "prefix") or the manifest's key

    @classmethod
    def parse(cls, uri: str, model: str, manifest: str | None = None) -> BatchSource:
        """``s3://bucket/inputs/{model}/...`` (a prefix), or with ``manifest`` (``csv``,
        ``json``, ``inventory``) the manifest's ``s3://`` URI.

        Raises:
            BadSource: the URI, the model or the manifest kind cannot be served (the message
                says which, and what to give).
        """
        if not NAME_PATTERN.match(model or ""):
            raise BadSource(f"--model {model!r} is not a model name: give the catalog's name, e.g. iris")
        if not uri.startswith("s3://"):
            raise BadSource(f"{uri!r} is not an s3:// URI: give s3://BUCKET/{INPUT_PREFIX}/{model}/PREFIX")
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        if not BUCKET_PATTERN.match(bucket):
            raise BadSource(f"{uri!r} names {bucket!r}, which is no S3 bucket name")
        if any(part in (".", "..") for part in key.split("/")):
            raise BadSource(f"{uri!r} has '.' or '..' parts: give the key as S3 stores it")
        if manifest is None:
            return cls(bucket, model, "prefix", _input_prefix(bucket, key, model))
        if manifest not in MANIFEST_READERS:
            raise BadSource(f"--manifest {manifest!r} is not one of {', '.join(MANIFEST_READERS)}")
        folder = INVENTORY_PREFIX if manifest == "inventory" else MANIFEST_PREFIX
        if not key.startswith(f"{folder}/") or key.endswith("/"):
            where = "the inventory's manifest.json" if manifest == "inventory" else "the manifest file"
            raise BadSource(
                f"{uri!r}: the batch reads {manifest} manifests under {folder}/ of the data bucket only "
                f"(its role may read nothing else): give s3://{bucket}/{folder}/... naming {where}"
            )
        return cls(bucket, model, manifest, key)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def execution_input(self) -> dict[str, str]:
        """The state machine's input: which reader, its prefix or manifest key, the model."""
        return {"reader": self.reader, "key": self.key, "model": self.model}

    def batch_input(self) -> dict[str, str]:
        """What every batch carries beside its items (the Distributed Map's ``BatchInput``)."""
        return {"bucket": self.bucket, "model": self.model, "reader": self.reader}


def _input_prefix(bucket: str, key: str, model: str) -> str:
    own = f"{INPUT_PREFIX}/{model}/"
    if key in ("", INPUT_PREFIX, f"{INPUT_PREFIX}/", own.rstrip("/")):
        return own
    if key.startswith(own):
        return key
    parts = key.split("/")
    if parts[0] == INPUT_PREFIX and len(parts) > 1:
        raise BadSource(
            f"s3://{bucket}/{key} holds the inputs of {parts[1]!r}, not of --model {model}: "
            f"give s3://{bucket}/{own}... (or --model {parts[1]})"
        )
    raise BadSource(
        f"s3://{bucket}/{key} is outside {INPUT_PREFIX}/: a batch serves inputs/{{model}}/{{path}} and writes "
        f"outputs/ and errors/ beside them, as the S3 pipeline does; give s3://{bucket}/{own}..., or list "
        f"the keys in a manifest under {MANIFEST_PREFIX}/ (--manifest csv or json)"
    )


# ---------------------------------------------------------------- reading items


def read_items(s3: Any, source: BatchSource) -> Iterator[Any]:
    """The items of ``source``, in the order Step Functions reads them, as it shapes them.

    Raises:
        BadManifest: a manifest or inventory report that is not what its reader takes.
        Exception: a failed S3 call (the caller classifies it).
    """
    if source.reader == "prefix":
        return _listed(s3, source)
    if source.reader == "csv":
        return _csv_rows(s3, source)
    if source.reader == "json":
        return _json_items(s3, source)
    return _inventory_rows(s3, source)


def _listed(s3: Any, source: BatchSource) -> Iterator[dict[str, Any]]:
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=source.bucket, Prefix=source.key, PaginationConfig={"PageSize": LIST_PAGE_KEYS}
    )
    for page in pages:
        for found in page.get("Contents", []):
            yield {
                "Key": found["Key"],
                "Etag": found.get("ETag", ""),
                "Size": int(found.get("Size") or 0),
                "LastModified": int(found["LastModified"].timestamp()) if found.get("LastModified") else 0,
                "StorageClass": found.get("StorageClass", "STANDARD"),
            }


def _text_lines(body: Any) -> Iterator[str]:
    """A streamed S3 body as lines of text (UTF-8, a byte-order mark dropped)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    pending = ""
    for chunk in body.iter_chunks(MB):
        pending += decoder.decode(chunk)
        *lines, pending = pending.split("\n")
        yield from (line + "\n" for line in lines)
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending


def _csv_rows(s3: Any, source: BatchSource) -> Iterator[dict[str, str]]:
    body = s3.get_object(Bucket=source.bucket, Key=source.key)["Body"]
    try:
        rows = csv.DictReader(_text_lines(body))
        try:
            header = rows.fieldnames
        except (UnicodeDecodeError, csv.Error) as error:
            raise BadManifest(f"{source.uri} is not a UTF-8 CSV file ({error})") from None
        if not header or "Key" not in header:
            raise BadManifest(
                f"{source.uri} has no Key column: its first row must be a header naming the columns, "
                "with Key for the input keys (e.g. Key,Etag)"
            )
        try:
            yield from rows
        except (UnicodeDecodeError, csv.Error) as error:
            raise BadManifest(f"{source.uri} line {rows.line_num}: not CSV ({error})") from None
    finally:
        body.close()


def _json_items(s3: Any, source: BatchSource) -> Iterator[Any]:
    response = s3.get_object(Bucket=source.bucket, Key=source.key)
    if int(response.get("ContentLength") or 0) > MAX_JSON_MANIFEST_BYTES:
        raise BadManifest(
            f"{source.uri} is over {MAX_JSON_MANIFEST_BYTES // MB} MB: split it, or use a CSV manifest "
            "(read row by row)"
        )
    try:
        items = json.loads(response["Body"].read(MAX_JSON_MANIFEST_BYTES + 1))
    except (ValueError, RecursionError):
        raise BadManifest(
            f'{source.uri} is not JSON: give a JSON array of keys or of {{"Key": ...}}'
        ) from None
    if not isinstance(items, list):
        raise BadManifest(
            f'{source.uri} is not a JSON array: give ["inputs/...", ...] or [{{"Key": ...}}, ...]'
        )
    yield from items


def _inventory_rows(s3: Any, source: BatchSource) -> Iterator[dict[str, str]]:
    manifest = _inventory_manifest(s3, source)
    columns = [name.strip() for name in str(manifest.get("fileSchema", "")).split(",")]
    if "Key" not in columns:
        raise BadManifest(f"{source.uri}: its fileSchema {manifest.get('fileSchema')!r} has no Key column")
    for entry in manifest.get("files") or []:
        key = entry.get("key") if isinstance(entry, dict) else None
        if not isinstance(key, str) or not key.startswith(f"{INVENTORY_PREFIX}/"):
            raise BadManifest(f"{source.uri} lists a data file {key!r} outside {INVENTORY_PREFIX}/")
        body = s3.get_object(Bucket=source.bucket, Key=key)["Body"]
        try:
            with gzip.GzipFile(fileobj=body) as unzipped:
                lines = codecs.iterdecode(unzipped, "utf-8")
                for row in csv.reader(lines):
                    yield dict(zip(columns, row, strict=False))
        except (OSError, EOFError, UnicodeDecodeError, csv.Error) as error:
            raise BadManifest(
                f"s3://{source.bucket}/{key} is not a gzip CSV inventory file ({error})"
            ) from None
        finally:
            body.close()


def _inventory_manifest(s3: Any, source: BatchSource) -> Mapping[str, Any]:
    raw = s3.get_object(Bucket=source.bucket, Key=source.key)["Body"].read(16 * MB)
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError):
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise BadManifest(f'{source.uri} is not an S3 Inventory manifest.json (no "files" list)')
    if str(manifest.get("fileFormat", "")).upper() != "CSV":
        raise BadManifest(
            f"{source.uri} describes a {manifest.get('fileFormat')} inventory: Step Functions reads CSV "
            "inventories only; set the inventory's output format to CSV"
        )
    return manifest


# ---------------------------------------------------------------- items to inputs


def to_object(item: Any, source: BatchSource) -> S3Object | None:
    """The input an item names, as the pipeline serves it; None for what is no input at all
    (a folder marker, a noncurrent version in an inventory).

    Raises:
        PoisonItem: the item names no key, another bucket, or a key outside
            ``inputs/{model}/`` of the run's model.
    """
    fields: Mapping[str, Any] = item if isinstance(item, dict) else {"Key": item}
    key = fields.get("Key")
    if not isinstance(key, str) or not key:
        raise PoisonItem(f"the item {str(item)[:120]!r} names no key: give it a Key")
    if source.reader == "inventory":
        key = unquote_plus(key)  # S3 Inventory writes keys URL-encoded
        if str(fields.get("IsLatest", "true")).lower() == "false" or fields.get("IsDeleteMarker") == "true":
            return None
    bucket = str(fields.get("Bucket") or source.bucket)
    if bucket != source.bucket:
        raise PoisonItem(
            f"s3://{bucket}/{key} is not in the data bucket {source.bucket}: the batch serves only its inputs"
        )
    own = f"{INPUT_PREFIX}/{source.model}/"
    if key.endswith("/"):
        return None
    if not key.startswith(own):
        raise PoisonItem(f"{key} is not under {own}: this run serves {source.model}'s inputs only")
    etag = str(fields.get("Etag") or fields.get("ETag") or "").strip('"') or None
    version = fields.get("VersionId") or None
    return S3Object(
        bucket=bucket,
        key=key,
        size=_size(fields.get("Size")),
        etag=etag,
        version_id=str(version) if version and version != "null" else None,
    )


def _size(value: Any) -> int:
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0
