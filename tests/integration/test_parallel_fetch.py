"""A fetch bound by the network (issue 9): an artifact is read as ranged GETs on several
connections at once, reassembled in order, hashed once and bounded as a single stream was;
an object whose size differs from its manifest is refused, and a trickling part ends the
load at the deadline with every connection shut. moto's S3 on loopback behind a proxy that
records the ranges and holds each answer a moment, so requests in flight overlap."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from support.common import BUCKET
from support.flaky import FlakyProxy
from tierserve import aws
from tierserve.errors import ArtifactRejected, UpstreamTimeout
from tierserve.fetch import CHUNK_BYTES, PART_BYTES, ArtifactReader, S3Source
from tierserve.registry import ModelRegistry
from tierserve.settings import ModelRef, Settings
from tierserve.tools.local import samples
from tierserve.tools.packaging import package_model, upload_package

PART = 64 * 1024
SLOW = 1e6  # bytes/s per connection: far below the fan-out rate
DATA = np.random.default_rng(0).bytes(16 * PART + 123)  # 17 parts, the last one short


@pytest.fixture
def proxy(embedded_s3, s3, monkeypatch) -> Iterator[FlakyProxy]:
    front = FlakyProxy(embedded_s3.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", front.endpoint)
    aws.clear_clients()
    yield front
    front.stop()


def read_all(
    source: S3Source, key: str, size: int, tmp_path: Path, deadline: aws.Deadline | None = None
) -> bytes:
    with (tmp_path / "out").open("w+b") as out:
        reader = ArtifactReader(
            source, key, size=size, too_long="too long", deadline=deadline, destination=out
        )
        try:
            reader.drain()
        finally:
            reader.close()
        assert reader.digest() == hashlib.sha256(DATA).hexdigest()
        out.seek(0)
        return out.read()


def fetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tierserve-fetch") and t.is_alive()]


def most_fetch_threads_while(read: Callable[[], bytes]) -> tuple[bytes, int]:
    """What ``read`` returns, and the most fetch threads (parts being read) seen at once."""
    most, done = 0, threading.Event()

    def watch() -> None:
        nonlocal most
        while not done.is_set():
            most = max(most, len(fetch_threads()))
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        return read(), most
    finally:
        done.set()
        watcher.join()


def test_a_slow_first_get_is_cut_to_one_part_and_the_other_connections_open(s3, proxy, tmp_path):
    """Ranges on several connections at once, in order: the first GET asks for everything,
    alone, and is cut to its first part once its first chunk came slowly; the other parts
    then go out together."""
    s3.put_object(Bucket=BUCKET, Key="blob", Body=DATA)
    proxy.trickle_bytes_per_s = SLOW  # each connection as slow as S3's from a function, or slower
    source = S3Source(BUCKET, "", connections=4, part_bytes=PART)
    data, most = most_fetch_threads_while(lambda: read_all(source, "blob", len(DATA), tmp_path))
    assert data == DATA
    expected = [f"bytes=0-{len(DATA) - 1}"] + [
        f"bytes={start}-{min(start + PART, len(DATA)) - 1}" for start in range(PART, len(DATA), PART)
    ]
    assert proxy.ranges[0] == expected[0]
    assert sorted(proxy.ranges) == sorted(expected)  # every byte once, in parts
    assert proxy.range_arrivals[1][0] - proxy.range_arrivals[0][0] >= PART / SLOW / 2
    # At once, and no more than the connections (plus, for a moment, a finished part's thread
    # closing its connection as the next part's starts).
    assert 3 <= most <= 4 + 1


def test_the_other_connections_open_after_the_first_chunk_not_the_first_part(s3, proxy, tmp_path):
    """Parts of several chunks (the loader's own: 8 chunks of 1 MiB): the first chunk decides,
    and the other GETs go out while the first part is still arriving."""
    part = 2 * CHUNK_BYTES
    data = np.random.default_rng(1).bytes(3 * part)
    s3.put_object(Bucket=BUCKET, Key="big", Body=data)
    proxy.trickle_bytes_per_s = 8e6
    source = S3Source(BUCKET, "", connections=3, part_bytes=part)
    with (tmp_path / "out").open("w+b") as out:
        reader = ArtifactReader(source, "big", size=len(data), too_long="too long", destination=out)
        try:
            reader.drain()
        finally:
            reader.close()
        assert reader.digest() == hashlib.sha256(data).hexdigest() and reader.gets == 3
    _, sent_when_the_others_came = proxy.range_arrivals[1]
    assert CHUNK_BYTES <= sent_when_the_others_came < part


def test_a_fast_first_get_reads_the_whole_object(s3, proxy, tmp_path):
    """A connection that already brings bytes as fast as they can be taken in: more would only
    add requests, so the first GET goes on to the end, and every byte is hashed once, in order."""
    s3.put_object(Bucket=BUCKET, Key="blob", Body=DATA)
    source = S3Source(BUCKET, "", connections=4, part_bytes=PART, fan_out_below=0)  # any rate is fast
    assert read_all(source, "blob", len(DATA), tmp_path) == DATA
    assert proxy.ranges == [f"bytes=0-{len(DATA) - 1}"]


def test_one_connection_is_one_get_of_the_whole_object(s3, proxy, tmp_path):
    s3.put_object(Bucket=BUCKET, Key="blob", Body=DATA)
    source = S3Source(BUCKET, "", connections=1, part_bytes=PART)
    assert read_all(source, "blob", len(DATA), tmp_path) == DATA
    assert proxy.ranges == [] and proxy.max_in_flight == 1


@pytest.mark.parametrize(
    ("stored", "said"),
    [(DATA + b"x", f"is {len(DATA) + 1:,} bytes"), (DATA[:-PART], f"is {len(DATA) - PART:,} bytes")],
    ids=["longer", "shorter"],
)
def test_an_object_of_another_size_than_declared_is_refused(s3, proxy, tmp_path, stored, said):
    s3.put_object(Bucket=BUCKET, Key="blob", Body=stored)
    source = S3Source(BUCKET, "", connections=4, part_bytes=PART)
    with pytest.raises(ArtifactRejected, match=said):
        read_all(source, "blob", len(DATA), tmp_path)


def test_a_trickling_part_ends_the_read_at_the_deadline_and_frees_every_connection(s3, proxy, tmp_path):
    s3.put_object(Bucket=BUCKET, Key="blob", Body=DATA)
    proxy.trickle_bytes_per_s = 2000
    source = S3Source(BUCKET, "", connections=4, part_bytes=PART)
    start = time.monotonic()
    with pytest.raises(UpstreamTimeout, match="S3 was too slow"):
        read_all(source, "blob", len(DATA), tmp_path, deadline=aws.Deadline.after(1.0))
    assert time.monotonic() - start < 5  # the deadline ended it, not the trickle (over 8 minutes)
    for _ in range(100):  # the connections were shut down: the fetch threads end, none stays blocked
        if not fetch_threads():
            break
        time.sleep(0.05)
    assert not fetch_threads()


def test_the_registry_serves_a_model_fetched_on_several_connections(s3, proxy, tmp_path):
    """End to end with the settings a function gets: TIERSERVE_FETCH_CONNECTIONS, the loader's
    layout (its weights mapped where they lie in the verified file), the same predictions."""
    # About 17 MB: three parts of the loader's own 8 MiB.
    source = samples.mlp(tmp_path / "mlp.onnx", features=16, hidden=1024, layers=5, classes=5)
    packaged = package_model(source, name="mlp", version="1", out_dir=tmp_path / "pkg", compression="none")
    upload_package(packaged, s3, BUCKET, "models")
    settings = Settings.from_env(
        {
            "TIERSERVE_MODEL_BUCKET": BUCKET,
            "TIERSERVE_MODELS": "mlp@1",
            "TIERSERVE_CACHE_DIR": str(tmp_path / "cache"),
            "TIERSERVE_FETCH_CONNECTIONS": "4",
        }
    )
    proxy.trickle_bytes_per_s = 20e6  # about S3's rate to a function, per connection
    registry = ModelRegistry(settings)
    model = registry.get(ModelRef("mlp", "1"))
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    import onnxruntime as ort

    reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    got = model.predict({"input": x})
    for name, value in zip((o.name for o in model.session.get_outputs()), reference, strict=True):
        np.testing.assert_array_equal(got[name], value)
    assert len(proxy.ranges) == -(-packaged.manifest.stored.bytes // PART_BYTES) >= 2
    assert model.timings.artifact_gets == len(proxy.ranges)  # what "model loaded" logs
    entry = next((tmp_path / "cache").iterdir())
    assert sorted(p.name for p in entry.iterdir()) == ["graph.onnx", "model.onnx"]  # the loader's layout
