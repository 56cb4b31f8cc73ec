"""The stored form of a model: an artifact, its manifest, the zstd level rule and whether
compressing pays at all.

    package_model(model.onnx, name=..., version=..., out_dir=...) -> PackagedModel
    choose_zstd_level(model.onnx, budget_s=20) -> LevelChoice
    choose_compression(model.onnx, target_mb_s=720) -> CompressionChoice   # zstd, or none

A zstd artifact is one frame that records its content size and checksum (the loader refuses
any other: the checksum is what covers decompression, beside the stored bytes' sha256).

A package directory is written next to its destination and renamed into place, so a reader
never finds a half-written package.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from tierserve.catalog import COMPRESSIONS, MANIFEST_NAME, Digest, Manifest, ManifestError, TensorSpec
from tierserve.drift.baseline import BASELINE_NAME, Baseline
from tierserve.protocol import ONNX_TO_DATATYPE

DEFAULT_ZSTD_LEVEL = 10
# Levels tried by the measurement. Levels above 19 ("ultra") need windows of up to 128 MB
# to decompress, which a Lambda function pays for in memory at every cold start.
ZSTD_CANDIDATE_LEVELS = (3, 9, 15, 19)
DEFAULT_COMPRESS_BUDGET_S = 20.0
# A higher level must save at least this fraction of the best size to be worth its time.
ZSTD_WORTHWHILE_GAIN = 0.01
SAMPLE_BYTES = 8 * 1024 * 1024
SAMPLE_BLOCK = 1024 * 1024
GZIP_LEVEL = 9
# Only what a cold start reads over the network, at this many MB/s, decides whether zstd pays:
# the loader's connections (TIERSERVE_FETCH_CONNECTIONS, 8) at about 90 MB/s each from Lambda.
DEFAULT_TARGET_MB_S = 8 * 90.0


@dataclass(frozen=True)
class PackagedModel:
    """A package on disk: ``artifact`` and the manifest that describes it."""

    manifest: Manifest
    artifact: Path

    @property
    def manifest_json(self) -> str:
        return self.manifest.to_json()

    @property
    def directory(self) -> Path:
        return self.artifact.parent


@dataclass(frozen=True)
class LevelChoice:
    """The zstd level picked by :func:`choose_zstd_level` and the trials behind it."""

    level: int
    trials: tuple[dict[str, float], ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class CompressionChoice:
    """What :func:`choose_compression` decided and the measurement behind it: at ``target_mb_s``
    zstd saves ``saved_ms`` of transfer and hashing and costs ``decode_ms`` of decoding (one core,
    where the two add up), for the whole model."""

    compression: str
    level: int | None
    ratio: float
    decode_mb_s: float
    target_mb_s: float
    saved_ms: float
    decode_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "compression": self.compression,
            "zstd_level": self.level,
            "ratio": round(self.ratio, 4),
            "decode_mb_s": round(self.decode_mb_s, 1),
            "target_mb_s": self.target_mb_s,
            "saved_ms": round(self.saved_ms, 1),
            "decode_ms": round(self.decode_ms, 1),
        }

    def describe(self) -> str:
        verdict = "zstd pays" if self.compression == "zstd" else "stored uncompressed: zstd does not pay"
        return (
            f"{verdict} at {self.target_mb_s:g} MB/s (it would save {self.saved_ms:,.0f} ms of transfer "
            f"and hashing for {self.decode_ms:,.0f} ms of decoding; ratio {self.ratio:.3f})"
        )


def size_text(size: int) -> str:
    """A byte count as the reports print it: ``12.35 MB`` from 1 MB (10^6 bytes) up, ``4.2 kB`` below."""
    return f"{size / 1e6:,.2f} MB" if size >= 1_000_000 else f"{size / 1e3:,.1f} kB"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def signature_of(model_path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs and outputs of a model as onnxruntime sees them (symbolic dims become -1).

    Raises:
        InvalidModel: an input or output that is not a tensor of a v2 datatype (a ZipMap's
            sequence of maps, say), naming the export option that avoids it.
    """
    from tierserve.model import ort  # onnxruntime, its telemetry off

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return _specs(session.get_inputs(), "input", model_path), _specs(
        session.get_outputs(), "output", model_path
    )


def _specs(args: Sequence[Any], kind: str, model_path: Path) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(
            arg.name,
            _datatype(arg, kind, model_path),
            tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or [])),
        )
        for arg in args
    )


def _datatype(arg: Any, kind: str, model_path: Path) -> str:
    """The v2 datatype of one input or output; anything but a tensor of a v2 datatype is refused."""
    from tierserve.tools.packaging._errors import InvalidModel
    from tierserve.tools.packaging._validate import NO_ZIPMAP

    datatype = ONNX_TO_DATATYPE.get(arg.type)
    if datatype is not None:
        return datatype
    hint = (
        f" (a ZipMap's sequence of maps: {NO_ZIPMAP})"
        if arg.type.startswith("seq(map(")
        else ": export the model with tensor inputs and outputs of a v2 datatype"
    )
    raise InvalidModel(f"{model_path}: {kind} {arg.name!r} is {arg.type}, which tierserve cannot serve{hint}")


def compress_file(source: Path, destination: Path, compression: str, level: int = DEFAULT_ZSTD_LEVEL) -> None:
    """Compress ``source`` into ``destination`` as a stream (memory stays flat)."""
    with Path(source).open("rb") as reader, Path(destination).open("wb") as writer:
        if compression == "zstd":
            # One frame with its content size and checksum: what the loader requires.
            compressor = zstandard.ZstdCompressor(level=level, threads=-1, write_checksum=True)
            compressor.copy_stream(reader, writer, size=Path(source).stat().st_size)
        elif compression == "gzip":
            with gzip.GzipFile(fileobj=writer, mode="wb", compresslevel=min(level, 9), mtime=0) as gz:
                while chunk := reader.read(1 << 20):
                    gz.write(chunk)
        else:
            while chunk := reader.read(1 << 20):
                writer.write(chunk)


def choose_zstd_level(
    path: Path,
    budget_s: float = DEFAULT_COMPRESS_BUDGET_S,
    levels: Sequence[int] = ZSTD_CANDIDATE_LEVELS,
) -> LevelChoice:
    """Pick a zstd level by measurement.

    The rule: compress a sample of the model (all of it up to 8 MiB, else eight 1 MiB blocks
    spread over the file) at each candidate level; estimate each level's time for the whole
    file; drop levels estimated over ``budget_s``; of the rest take the smallest output, but
    prefer a lower level whose output is within 1% of it (decompression, which every cold
    start pays, is equally fast at every level; compression time is only worth a real gain).
    When even the lowest level is over the budget, the lowest level is used.
    """
    size = Path(path).stat().st_size
    sample = _sample(Path(path), size)
    trials = []
    for level in sorted(levels):
        start = time.perf_counter()
        compressed = zstandard.ZstdCompressor(level=level, threads=-1).compress(sample)
        seconds = time.perf_counter() - start
        trials.append(
            {
                "level": level,
                "ratio": round(len(compressed) / max(len(sample), 1), 4),
                "estimated_s": round(seconds * size / max(len(sample), 1), 3),
            }
        )
    within = [t for t in trials if t["estimated_s"] <= budget_s] or trials[:1]
    best = min(t["ratio"] for t in within)
    chosen = next(t for t in within if t["ratio"] <= best * (1 + ZSTD_WORTHWHILE_GAIN))
    return LevelChoice(int(chosen["level"]), tuple(trials))


def choose_compression(
    path: Path,
    target_mb_s: float = DEFAULT_TARGET_MB_S,
    budget_s: float = DEFAULT_COMPRESS_BUDGET_S,
    level: int | None = None,
) -> CompressionChoice:
    """zstd, or none when it does not pay, by measurement on a sample of the model.

    A cold start pays, per byte stored, its transfer at ``target_mb_s`` and its sha256; zstd
    stores fewer bytes but adds decoding (on one vCPU, as Lambda gives up to 1,769 MB, they add
    up). So: compress the sample at the level the level rule picks (or ``level``), time its
    decoding and a sha256 of it here, and keep zstd only when the transfer and hashing it saves
    on the whole model exceed the decoding it costs. FP32 weights usually store uncompressed.
    """
    import hashlib

    size = Path(path).stat().st_size
    sample = _sample(Path(path), size)
    chosen = level if level is not None else choose_zstd_level(path, budget_s).level
    compressed = zstandard.ZstdCompressor(level=chosen, write_checksum=True).compress(sample)
    ratio = len(compressed) / max(len(sample), 1)
    decoder = zstandard.ZstdDecompressor()
    decode_s = min(_timed(lambda: decoder.decompress(compressed)) for _ in range(3))
    hash_s = min(_timed(lambda: hashlib.sha256(sample).digest()) for _ in range(3))
    scale = size / max(len(sample), 1)
    decode_ms = decode_s * scale * 1000
    per_byte_ms = 1000 / (target_mb_s * 1e6) + hash_s * 1000 / max(len(sample), 1)
    saved_ms = size * (1 - ratio) * per_byte_ms
    return CompressionChoice(
        compression="zstd" if saved_ms > decode_ms else "none",
        level=chosen,
        ratio=ratio,
        decode_mb_s=len(sample) / max(decode_s, 1e-9) / 1e6,
        target_mb_s=target_mb_s,
        saved_ms=saved_ms,
        decode_ms=decode_ms,
    )


def _timed(work: Any) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def _sample(path: Path, size: int) -> bytes:
    with path.open("rb") as handle:
        if size <= SAMPLE_BYTES:
            return handle.read()
        blocks = SAMPLE_BYTES // SAMPLE_BLOCK
        step = (size - SAMPLE_BLOCK) // (blocks - 1)
        parts = []
        for index in range(blocks):
            handle.seek(index * step)
            parts.append(handle.read(SAMPLE_BLOCK))
        return b"".join(parts)


def write_package(
    model_path: Path,
    directory: Path,
    *,
    name: str,
    version: str,
    compression: str = "zstd",
    level: int = DEFAULT_ZSTD_LEVEL,
    tier: str | None = None,
    quantization: str = "none",
    optimized: bool = False,
    accuracy: Mapping[str, Any] | None = None,
    allow_non_finite: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> PackagedModel:
    """Compress ``model_path`` into ``directory`` and describe it; the manifest is not written.

    Callers write ``manifest.json`` themselves once they have measured what goes into it
    (see :func:`write_manifest`).
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression {compression!r} must be one of {sorted(COMPRESSIONS)}")
    model_path = Path(model_path)
    model_format = "ort" if model_path.suffix == ".ort" else "onnx"
    inputs, outputs = signature_of(model_path)
    directory.mkdir(parents=True, exist_ok=True)
    artifact = directory / f"model.{model_format}{COMPRESSIONS[compression]}"
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
        accuracy=dict(accuracy) if accuracy is not None else None,
        tier=tier,  # type: ignore[arg-type]
        allow_non_finite=allow_non_finite,
        extra=dict(extra or {}),
    )
    manifest.validate()
    return PackagedModel(manifest, artifact)


def write_manifest(packaged: PackagedModel) -> None:
    (packaged.directory / MANIFEST_NAME).write_text(packaged.manifest_json)


def write_baseline(directory: Path, baseline: Baseline) -> dict[str, Any]:
    """Write ``baseline.json`` into the package folder; returns what the manifest records of it
    (``extra.baseline``: its sha256, size and row count)."""
    (Path(directory) / BASELINE_NAME).write_text(baseline.to_json())
    return baseline.digest()


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
    extra: Mapping[str, Any] | None = None,
    baseline: Baseline | None = None,
) -> PackagedModel:
    """Compress a model and describe it in a manifest: ``out_dir/{artifact, manifest.json}``,
    with ``baseline.json`` beside them when a drift ``baseline`` is given.

    The package is written into a sibling folder and renamed into place, so ``out_dir``
    holds either the previous complete package or the new one, never a mix.
    """
    out_dir = Path(out_dir)
    staging = staging_dir_for(out_dir)
    try:
        packaged = write_package(
            model_path,
            staging,
            name=name,
            version=version,
            compression=compression,
            level=level,
            tier=tier,
            quantization=quantization,
            optimized=optimized,
            accuracy=accuracy,
            allow_non_finite=allow_non_finite,
            extra={**(extra or {}), **({"baseline": write_baseline(staging, baseline)} if baseline else {})},
        )
        write_manifest(packaged)
        install_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PackagedModel(packaged.manifest, out_dir / packaged.artifact.name)


def staging_dir_for(out_dir: Path) -> Path:
    """A fresh folder beside ``out_dir`` (same filesystem, so the final rename is atomic)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:12]}.partial"
    staging.mkdir()
    return staging


def install_dir(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``, replacing a previous package there."""
    if out_dir.exists():
        retired = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:12]}.old"
        os.replace(out_dir, retired)
        os.replace(staging, out_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


def package_file(directory: Path, name: str) -> Path:
    """``directory / name`` if it is the package's own file: a plain file in that very folder,
    not a symlink (which could lead anywhere, and have that file uploaded as the model). The
    folder itself may be reached through a symlink.

    Raises:
        FileNotFoundError: no such file.
        InvalidModel: a symlink, not a plain file (a FIFO, a device, a folder), or outside.
    """
    from tierserve.tools.packaging._errors import InvalidModel

    path = Path(directory) / name
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    if stat.S_ISLNK(mode) or not stat.S_ISREG(mode) or path.resolve().parent != Path(directory).resolve():
        what = "a symbolic link" if stat.S_ISLNK(mode) else "not a plain file in the package folder"
        raise InvalidModel(
            f"{path} is {what}: a package holds its own files, and only those are uploaded; "
            "package the model again (tierserve package) instead of linking to it"
        )
    return path


def read_package(directory: Path) -> PackagedModel:
    """A package written by :func:`package_model` (or ``tierserve package``), checked on disk.

    Raises:
        FileNotFoundError: no manifest or artifact there.
        InvalidModel: the manifest or the artifact is a symlink, not a plain file, or outside
            the folder (:func:`package_file`).
        ManifestError: "<path> is not a valid manifest: <what>".
        ValueError: the artifact's size or sha256 differs from the manifest.
    """
    directory = Path(directory)
    path = package_file(directory, MANIFEST_NAME)
    try:
        manifest = Manifest.from_json(path.read_bytes())
    except ManifestError as error:
        raise ManifestError(f"{path} is not a valid manifest: {error}") from None
    artifact = package_file(directory, manifest.artifact)
    if artifact.stat().st_size != manifest.stored.bytes or sha256_file(artifact) != manifest.stored.sha256:
        raise ValueError(f"{artifact} does not match its manifest (size or sha256)")
    return PackagedModel(manifest, artifact)
