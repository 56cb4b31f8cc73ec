"""Turn an ONNX model into what tierserve serves: a compressed artifact and its manifest.

    package_model(model.onnx) -> PackagedModel(artifact file, manifest)
    upload(packaged, "s3://bucket/models") -> artifact first, manifest last

A reader never finds a manifest without its artifact, and versions are immutable.
"""

from __future__ import annotations

import gzip
import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from tierserve.catalog import COMPRESSIONS, MANIFEST_NAME, Digest, Manifest, TensorSpec
from tierserve.protocol import ONNX_TO_DATATYPE

DEFAULT_ZSTD_LEVEL = 10


@dataclass(frozen=True)
class PackagedModel:
    manifest: Manifest
    artifact: Path

    @property
    def manifest_json(self) -> str:
        return self.manifest.to_json()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def signature_of(model_path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs and outputs of a model as onnxruntime sees them (symbolic dims become -1)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return _specs(session.get_inputs()), _specs(session.get_outputs())


def _specs(args: Sequence[Any]) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(
            arg.name,
            ONNX_TO_DATATYPE.get(arg.type, arg.type),
            tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or [])),
        )
        for arg in args
    )


def compress_file(source: Path, destination: Path, compression: str, level: int = DEFAULT_ZSTD_LEVEL) -> None:
    """Compress ``source`` into ``destination`` as a stream (memory stays flat)."""
    with source.open("rb") as reader, destination.open("wb") as writer:
        if compression == "zstd":
            zstandard.ZstdCompressor(level=level, threads=-1).copy_stream(reader, writer)
        elif compression == "gzip":
            with gzip.GzipFile(fileobj=writer, mode="wb", compresslevel=min(level, 9), mtime=0) as gz:
                while chunk := reader.read(1 << 20):
                    gz.write(chunk)
        else:
            while chunk := reader.read(1 << 20):
                writer.write(chunk)


def package_model(
    model_path: Path,
    *,
    name: str,
    version: str,
    out_dir: Path,
    compression: str = "zstd",
    level: int = DEFAULT_ZSTD_LEVEL,
    tier: str | None = None,
    quantization: str = "none",
    optimized: bool = False,
    accuracy: dict[str, Any] | None = None,
    allow_non_finite: bool = False,
) -> PackagedModel:
    """Compress a model and describe it in a manifest; writes ``out_dir/{artifact, manifest.json}``."""
    model_path = Path(model_path)
    model_format = "ort" if model_path.suffix == ".ort" else "onnx"
    inputs, outputs = signature_of(model_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifact = out_dir / f"model.{model_format}{COMPRESSIONS[compression]}"
    compress_file(model_path, artifact, compression, level)
    manifest = Manifest(
        name=name,
        version=version,
        format=model_format,
        compression=compression,
        artifact=artifact.name,
        stored=Digest(sha256_file(artifact), artifact.stat().st_size),
        model=Digest(sha256_file(model_path), model_path.stat().st_size),
        inputs=inputs,
        outputs=outputs,
        quantization=quantization,
        optimized=optimized,
        accuracy=accuracy,
        tier=tier,  # type: ignore[arg-type]
        allow_non_finite=allow_non_finite,
    )
    manifest.validate()
    (out_dir / MANIFEST_NAME).write_text(manifest.to_json())
    return PackagedModel(manifest, artifact)


def upload(
    packaged: PackagedModel,
    client: Any,
    bucket: str,
    prefix: str = "models",
    progress: Callable[[int], None] | None = None,
) -> bool:
    """Upload the artifact, then the manifest. Returns False when the same digest is already there.

    Uses boto3's managed transfer (multipart for large artifacts). ``progress`` receives byte
    counts as they are sent.
    """
    base = (
        f"{prefix.strip('/')}/{packaged.manifest.key_prefix}"
        if prefix.strip("/")
        else packaged.manifest.key_prefix
    )
    manifest_key = f"{base}/{MANIFEST_NAME}"
    existing = _existing_manifest(client, bucket, manifest_key)
    if existing is not None and existing.stored.sha256 == packaged.manifest.stored.sha256:
        return False
    if existing is not None:
        raise FileExistsError(
            f"s3://{bucket}/{manifest_key} already holds a different model: versions are immutable, "
            "package it as a new --version"
        )
    client.upload_file(
        str(packaged.artifact),
        bucket,
        f"{base}/{packaged.manifest.artifact}",
        ExtraArgs={"ChecksumAlgorithm": "SHA256"},
        Callback=progress,
    )
    client.put_object(
        Bucket=bucket,
        Key=manifest_key,
        Body=packaged.manifest_json.encode(),
        ContentType="application/json",
    )
    return True


def _existing_manifest(client: Any, bucket: str, key: str) -> Manifest | None:
    import json

    from botocore.exceptions import ClientError

    try:
        raw = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
            return None
        raise
    return Manifest.from_dict(json.load(io.BytesIO(raw)))
