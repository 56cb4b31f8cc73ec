"""The artifact store on local files: digests, bounded decompression, atomic bounded cache."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zstandard

from tierserve.catalog import Digest, Manifest, TensorSpec
from tierserve.errors import ArtifactRejected, ModelUnavailable
from tierserve.store import ArtifactStore, FileSource, entry_name, source_for_uri

MODEL_BYTES = bytes(range(256)) * 4096  # 1 MiB that is not all zeros


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def compress(data: bytes, compression: str) -> bytes:
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)
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
    assert cached_files(store) == [entry_name(manifest)]
    assert sorted(p.name for p in (store.cache_dir / entry_name(manifest)).iterdir()) == ["model.onnx"]
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


def test_a_corrupt_decompression_is_caught_by_the_frame_checksum(store, root):
    """One sha256 (of the stored bytes) is the cryptographic check; what decompression yields is
    covered by the zstd frame's own checksum: here the checksum does not match the content (the
    stored digest is honest about the damaged bytes)."""
    manifest = publish(root)
    artifact = root / "m" / "1" / manifest.artifact
    damaged = bytearray(artifact.read_bytes())
    damaged[-1] ^= 0xFF  # the frame's content checksum is its last four bytes
    artifact.write_bytes(bytes(damaged))
    honest = dataclasses.replace(manifest, stored=Digest(sha(bytes(damaged)), len(damaged)))
    with pytest.raises(ArtifactRejected, match=r"is not a valid zstd stream .*checksum"):
        store.fetch(honest)
    assert cached_files(store) == []


def test_a_zstd_frame_without_a_checksum_is_refused(store, root):
    manifest = publish(root)
    bare = zstandard.ZstdCompressor(level=3).compress(MODEL_BYTES)  # no content checksum
    (root / "m" / "1" / manifest.artifact).write_bytes(bare)
    with pytest.raises(ArtifactRejected, match="without a content checksum"):
        store.fetch(dataclasses.replace(manifest, stored=Digest(sha(bare), len(bare))))
    assert cached_files(store) == []


def test_a_model_in_more_than_one_zstd_frame_is_refused(store, root):
    manifest = publish(root)
    half = len(MODEL_BYTES) // 2
    compressor = zstandard.ZstdCompressor(level=3, write_checksum=True)
    two = compressor.compress(MODEL_BYTES[:half]) + compressor.compress(MODEL_BYTES[half:])
    (root / "m" / "1" / manifest.artifact).write_bytes(two)
    with pytest.raises(ArtifactRejected, match=r"a zstd frame without the declared size \(1,048,576 bytes\)"):
        store.fetch(dataclasses.replace(manifest, stored=Digest(sha(two), len(two))))
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
    with pytest.raises(ArtifactRejected, match="zstd frame without the declared size"):
        store.fetch(declared)  # its frame header says 256 MiB: refused before decoding
    assert cached_files(store) == []


def test_a_frame_header_that_lies_about_its_size_still_stops_at_the_declared_size(store, root):
    bomb = b"\0" * (256 * 1024 * 1024)
    manifest = publish(root, data=bomb)
    artifact = root / "m" / "1" / manifest.artifact
    stored = bytearray(artifact.read_bytes())
    # Magic (4 bytes), the descriptor (a 4-byte content size), a window byte unless the frame is
    # one segment, then the content size.
    assert stored[4] >> 6 == 2
    at = 5 if stored[4] & 0x20 else 6
    stored[at : at + 4] = (4096).to_bytes(4, "little")
    artifact.write_bytes(bytes(stored))
    lying = dataclasses.replace(
        manifest, stored=Digest(sha(bytes(stored)), len(stored)), model=Digest(manifest.model.sha256, 4096)
    )
    with pytest.raises(
        ArtifactRejected, match=r"decompresses past its declared 4,096 bytes|not a valid zstd"
    ):
        store.fetch(lying)
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
    assert entry_name(manifests[0]) not in names
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
    staging = store.cache_dir / f".{manifest.stored.sha256}.{os.getpid()}.{fixed.hex}.partial"
    make_folder = Path.mkdir

    def mkdir_onto_a_full_disk(path, *args, **kwargs):  # the model file of the download: /dev/full
        make_folder(path, *args, **kwargs)
        if path == staging:
            (path / "model.onnx").symlink_to("/dev/full")

    monkeypatch.setattr(Path, "mkdir", mkdir_onto_a_full_disk)
    with pytest.raises(ModelUnavailable, match="cannot write the model cache") as raised:
        store.fetch(manifest)
    assert not isinstance(raised.value, ArtifactRejected)  # the artifact is fine; the disk is not
    assert cached_files(store) == []


def test_a_system_without_posix_fallocate_loads_into_a_sparse_file(store, root, monkeypatch):
    """macOS has no posix_fallocate (`tierserve local` runs there): the download's file is
    then sized with ftruncate, and the model loads as anywhere else."""
    monkeypatch.delattr(os, "posix_fallocate", raising=False)
    for compression in ("none", "zstd"):  # the model's own file, and the spool beside it
        manifest = publish(root, MODEL_BYTES + compression.encode(), compression)
        assert store.fetch(manifest).path.read_bytes() == MODEL_BYTES + compression.encode()


# ---------------------------------------------------------------- partial files of dead loads


def partial_name(manifest: Manifest, pid: int, tag: str) -> str:
    return f".{manifest.model.sha256}.{pid}.{tag * 32}.partial"


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_store_starts_by_removing_partial_files_of_dead_loads(root, tmp_path):
    manifest = publish(root)
    cache = tmp_path / "cache"
    cache.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead process": partial_name(manifest, dead_pid(), "a"),
            "this process, before it started": partial_name(manifest, os.getpid(), "b"),
            "old format": f".{manifest.model.sha256}.{'c' * 32}.partial",
            "a live process, idle for too long": partial_name(manifest, alive.pid, "d"),
            "a live process, writing": partial_name(manifest, alive.pid, "e"),
        }
        for name in names.values():
            (cache / name).write_bytes(b"half a model")
        stale = time.time() - 16 * 60
        os.utime(cache / names["a live process, idle for too long"], (stale, stale))
        (cache / entry_name(manifest)).mkdir()
        (cache / entry_name(manifest) / "model.onnx").write_bytes(MODEL_BYTES)  # a verified model stays

        store = ArtifactStore(FileSource(root), cache, cache_max_bytes=3 * len(MODEL_BYTES))

        assert cached_files(store) == sorted([names["a live process, writing"], entry_name(manifest)])
    finally:
        alive.kill()
        alive.wait()


def test_bounding_the_cache_removes_partial_files_of_dead_loads(store, root):
    first, second = publish(root, version="1"), publish(root, data=MODEL_BYTES[1:] + b"x", version="2")
    store.fetch(first)
    leftover = store.cache_dir / partial_name(first, dead_pid(), "f")
    leftover.write_bytes(b"half a model")
    store.fetch(second)
    assert not leftover.exists()
    assert cached_files(store) == sorted(entry_name(m) for m in (first, second))


def test_a_load_in_flight_keeps_its_partial_file_when_another_store_starts(root, tmp_path):
    """Two stores of one process may share a cache folder (the local API and the local pipeline):
    a store that starts leaves alone what another is writing."""
    manifest = publish(root, compression="none")
    cache = tmp_path / "cache"
    release = threading.Event()

    class HeldSource(FileSource):  # the artifact's first bytes come at once, the rest on release
        def open(self, key):
            body = super().open(key)
            if key.endswith(manifest.artifact):
                return _HeldBody(body, release)
            return body

    first = ArtifactStore(HeldSource(root), cache, cache_max_bytes=3 * len(MODEL_BYTES))
    thread = threading.Thread(target=first.fetch, args=(manifest,))
    thread.start()
    try:
        for _ in range(200):
            partials = list(cache.glob(".*.partial")) if cache.exists() else []
            if partials and partials[0].stat().st_size:
                break
            time.sleep(0.05)
        assert partials, "the first store never started writing"
        ArtifactStore(FileSource(root), cache, cache_max_bytes=3 * len(MODEL_BYTES))  # starts: sweeps
        assert partials[0].exists()
    finally:
        release.set()
        thread.join(10)
    assert cached_files(first) == [entry_name(manifest)]


class _HeldBody:
    """A file whose first read is served at once and whose later reads wait for ``release``."""

    def __init__(self, body, release: threading.Event) -> None:
        self._body, self._release, self._reads = body, release, 0

    def read(self, size: int = -1) -> bytes:
        self._reads += 1
        if self._reads > 1:
            self._release.wait(10)
        return self._body.read(min(size, 64 * 1024) if size > 0 else size)

    def close(self) -> None:
        self._body.close()


# ---------------------------------------------------------------- the load's deadline


class _TricklingBody:
    """A stream that gives one byte per ``interval_s``: no socket timeout would ever fire."""

    def __init__(self, data: bytes, interval_s: float) -> None:
        self._data, self._interval_s, self._closed = data, interval_s, threading.Event()

    def read(self, size: int = -1) -> bytes:
        out = b""
        while len(out) < max(size, 1) and self._data and not self._closed.wait(self._interval_s):
            out, self._data = out + self._data[:1], self._data[1:]
        return out

    def close(self) -> None:
        self._closed.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TricklingSource(FileSource):
    """The files of a folder, each read as a trickle."""

    def open(self, key):
        return _TricklingBody(self._path(key).read_bytes(), interval_s=0.05)


@pytest.mark.parametrize("what", ["artifact", "manifest"])
def test_a_trickling_source_ends_at_the_deadline_with_a_504_and_no_partial_file(root, tmp_path, what):
    from tierserve import aws
    from tierserve.errors import UpstreamTimeout

    manifest = publish(root)
    store = ArtifactStore(TricklingSource(root), tmp_path / "cache", cache_max_bytes=3 * len(MODEL_BYTES))
    with aws.within(aws.Deadline.after(0.5)), pytest.raises(UpstreamTimeout, match="S3 was too slow"):
        if what == "artifact":
            store.fetch(manifest)
        else:
            store.read_manifest("m", "1")
    assert cached_files(store) == []


# ---------------------------------------------------------------- only what onnxruntime accepted


def test_a_download_joins_the_cache_only_when_the_block_accepts_it(store, root):
    from tierserve.errors import Overloaded

    manifest = publish(root)
    with pytest.raises(ArtifactRejected), store.verified(manifest) as fetched:
        assert fetched.path.read_bytes() == MODEL_BYTES
        assert fetched.path.parent.name.endswith(".partial")  # a private folder: the model's file alone
        assert [p.name for p in fetched.path.parent.iterdir()] == ["model.onnx"]
        raise ArtifactRejected("onnxruntime cannot load m@1")
    assert cached_files(store) == []

    with pytest.raises(RuntimeError), store.verified(manifest):
        raise RuntimeError("a bug while opening it")
    assert cached_files(store) == []

    # Verified and not refused, only not opened yet: kept, so that the retry goes on from here.
    with pytest.raises(Overloaded), store.verified(manifest):
        raise Overloaded("no room in the memory budget yet")
    assert cached_files(store) == [entry_name(manifest)]
    with store.verified(manifest) as fetched:
        assert fetched.cache_hit


def test_a_cached_copy_that_is_refused_leaves_the_cache(store, root):
    manifest = publish(root)
    store.fetch(manifest)
    with pytest.raises(ArtifactRejected), store.verified(manifest) as fetched:
        assert fetched.cache_hit
        raise ArtifactRejected("the manifest does not match the model")
    assert cached_files(store) == []


def test_a_manifest_claiming_another_models_digest_cannot_reach_its_copy(store, root):
    """The cache is named by the stored digest, verified on every download: a manifest that
    declares another model's decompressed digest gets no cache hit on that model's copy."""
    first = publish(root, version="1")
    store.fetch(first)
    other_data = MODEL_BYTES[::-1]
    second = publish(root, data=other_data, version="2")
    liar = dataclasses.replace(second, model=Digest(first.model.sha256, len(other_data)))
    fetched = store.fetch(liar)
    assert not fetched.cache_hit and fetched.path.read_bytes() == other_data  # its own bytes
    assert sorted(cached_files(store)) == sorted([entry_name(first), entry_name(second)])


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd_create is Linux's")
@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_without_a_disk_cache_a_model_lands_in_memory_and_never_in_tmp(root, tmp_path, compression):
    manifest = publish(root, compression=compression)
    store = ArtifactStore(FileSource(root), tmp_path / "cache", cache_max_bytes=0)
    with store.verified(manifest) as fetched:
        assert not fetched.kept and str(fetched.path).startswith("/proc/self/fd/")
        assert fetched.path.read_bytes() == MODEL_BYTES
        assert cached_files(store) == []  # not even a partial folder
    assert cached_files(store) == []
