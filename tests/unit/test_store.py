"""The artifact store on local files: digests, bounded decompression, atomic bounded cache."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
from pathlib import Path

import pytest
import zstandard

from tierserve.catalog import Digest, Manifest, TensorSpec
from tierserve.errors import ArtifactRejected, ModelUnavailable
from tierserve.store import ArtifactStore, FileSource, source_for_uri

MODEL_BYTES = bytes(range(256)) * 4096  # 1 MiB that is not all zeros


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def compress(data: bytes, compression: str) -> bytes:
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    return data


def publish(
    root: Path, data: bytes = MODEL_BYTES, compression: str = "zstd", **overrides: object
) -> Manifest:
    """Write an artifact under root/{name}/{version}/ and return its (possibly doctored) manifest."""
    stored = compress(data, compression)
    suffix = {"zstd": ".zst", "gzip": ".gz", "none": ""}[compression]
    manifest = Manifest(
        name="m",
        version="1",
        format="onnx",
        compression=compression,
        artifact=f"model.onnx{suffix}",
        stored=Digest(sha(stored), len(stored)),
        model=Digest(sha(data), len(data)),
        inputs=(TensorSpec("x", "FP32", (-1,)),),
        outputs=(TensorSpec("y", "FP32", (-1,)),),
    )
    manifest = dataclasses.replace(manifest, **overrides)
    folder = root / manifest.name / manifest.version
    folder.mkdir(parents=True, exist_ok=True)
    (folder / manifest.artifact).write_bytes(stored)
    (folder / "manifest.json").write_text(manifest.to_json())
    return manifest


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.fixture
def store(root: Path, tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(FileSource(root), tmp_path / "cache", cache_max_bytes=3 * len(MODEL_BYTES))


def cached_files(store: ArtifactStore) -> list[str]:
    return sorted(p.name for p in store.cache_dir.iterdir()) if store.cache_dir.exists() else []


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_fetch_verifies_and_caches(store, root, compression):
    manifest = publish(root, compression=compression)
    fetched = store.fetch(manifest)
    assert fetched.path.read_bytes() == MODEL_BYTES and not fetched.cache_hit
    assert cached_files(store) == [f"{manifest.model.sha256}.onnx"]
    assert store.fetch(manifest).cache_hit


def test_manifest_round_trip(store, root):
    manifest = publish(root)
    assert store.read_manifest("m", "1") == manifest


def test_manifest_for_another_model_is_rejected(store, root):
    publish(root)
    (root / "m" / "2").mkdir()
    (root / "m" / "2" / "manifest.json").write_text((root / "m" / "1" / "manifest.json").read_text())
    with pytest.raises(ArtifactRejected, match="describes m@1, not m@2"):
        store.read_manifest("m", "2")


def test_garbage_manifest_is_rejected(store, root):
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "1" / "manifest.json").write_text("{]")
    with pytest.raises(ArtifactRejected, match="not a valid manifest"):
        store.read_manifest("m", "1")


def test_an_oversized_manifest_is_refused_without_reading_it_all(store, root):
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "1" / "manifest.json").write_bytes(b" " * (2 * 1024 * 1024) + b"{}")
    with pytest.raises(ArtifactRejected, match="is over 1048576 bytes: not a manifest"):
        store.read_manifest("m", "1")


def test_missing_model_says_how_to_fix(store):
    with pytest.raises(ModelUnavailable, match="tierserve package"):
        store.read_manifest("m", "1")


def test_wrong_stored_digest_is_refused_and_nothing_cached(store, root):
    manifest = publish(root)
    manifest = dataclasses.replace(manifest, stored=Digest("f" * 64, manifest.stored.bytes))
    with pytest.raises(ArtifactRejected, match="stored bytes do not match"):
        store.fetch(manifest)
    assert cached_files(store) == []


def test_wrong_model_digest_is_refused(store, root):
    manifest = publish(root)
    manifest = dataclasses.replace(manifest, model=Digest("e" * 64, manifest.model.bytes))
    with pytest.raises(ArtifactRejected, match="decompressed bytes do not match"):
        store.fetch(manifest)
    assert cached_files(store) == []


def test_corrupt_stream_is_refused(store, root):
    manifest = publish(root)
    artifact = root / "m" / "1" / manifest.artifact
    broken = bytearray(artifact.read_bytes())
    broken[len(broken) // 2 : len(broken) // 2 + 64] = b"\xff" * 64
    artifact.write_bytes(bytes(broken))
    with pytest.raises(ArtifactRejected):
        store.fetch(manifest)
    assert cached_files(store) == []


def test_truncated_gzip_is_refused(store, root):
    manifest = publish(root, compression="gzip")
    artifact = root / "m" / "1" / manifest.artifact
    artifact.write_bytes(artifact.read_bytes()[:-100])
    with pytest.raises(ArtifactRejected):
        store.fetch(manifest)
    assert cached_files(store) == []


def test_decompression_bomb_stops_at_the_declared_size(store, root):
    bomb = b"\0" * (256 * 1024 * 1024)  # 256 MiB of zeros compresses to a few KiB
    manifest = publish(root, data=bomb)
    declared = dataclasses.replace(manifest, model=Digest(manifest.model.sha256, 4096))
    with pytest.raises(ArtifactRejected, match="decompresses past its declared 4,096 bytes"):
        store.fetch(declared)
    assert cached_files(store) == []


def test_cache_is_bounded_least_recently_used_first(store, root, tmp_path):
    manifests = []
    for index in range(4):
        data = MODEL_BYTES[index:] + MODEL_BYTES[:index]
        manifests.append(publish(root, data=data, version=str(index)))
    for manifest in manifests:
        store.fetch(manifest)
    names = cached_files(store)
    assert len(names) == 3  # the cache holds three models' worth of bytes
    assert f"{manifests[0].model.sha256}.onnx" not in names
    assert not [n for n in names if n.endswith(".partial")]


def test_file_source_never_leaves_its_folder(root):
    root.mkdir(parents=True)
    with pytest.raises(ArtifactRejected, match="leaves the model folder"):
        FileSource(root).open("../../etc/passwd")


def test_unknown_scheme_is_explained():
    with pytest.raises(ModelUnavailable, match="s3:// or file://"):
        source_for_uri("http://example.com/models")


def test_stored_bytes_past_the_declared_size_are_refused_while_downloading(store, root):
    manifest = publish(root)
    short = dataclasses.replace(manifest, stored=Digest(manifest.stored.sha256, manifest.stored.bytes - 1))
    with pytest.raises(ArtifactRejected, match="longer than its declared"):
        store.fetch(short)
    assert cached_files(store) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to simulate a full disk")
def test_a_full_cache_disk_is_a_clear_503_and_nothing_is_cached(store, root, monkeypatch):
    import uuid

    from tierserve import store as store_module

    manifest = publish(root)
    fixed = uuid.UUID(int=0)
    monkeypatch.setattr(store_module.uuid, "uuid4", lambda: fixed)
    store.cache_dir.mkdir(parents=True)
    (store.cache_dir / f".{manifest.model.sha256}.{fixed.hex}.partial").symlink_to("/dev/full")
    with pytest.raises(ModelUnavailable, match="cannot write the model cache") as raised:
        store.fetch(manifest)
    assert not isinstance(raised.value, ArtifactRejected)  # the artifact is fine; the disk is not
    assert cached_files(store) == []
