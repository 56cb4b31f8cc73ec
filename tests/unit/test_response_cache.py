"""The response cache: keys that tell every part of a request apart, bounds by entries and by
bytes, models and callers kept apart, off unless the manifest opts in."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from support.manifests import manifest_text
from support.operations import dimension_sets, emf, emf_lines  # noqa: F401
from tierserve import telemetry
from tierserve.catalog import Digest, Manifest, ManifestError, ResponseCachePolicy
from tierserve.response_cache import ResponseCache, outputs_bytes, request_digest

ROWS = np.arange(8, dtype=np.float32).reshape(2, 4)


def cached_manifest(name: str = "iris", **policy: object) -> Manifest:
    return Manifest.from_json(manifest_text(name=name, response_cache=policy))


MANIFEST = cached_manifest()


def key(manifest: Manifest = MANIFEST, inputs=None, outputs=None, caller: str | None = "iam:alice") -> bytes:
    return request_digest(manifest, {"x": ROWS} if inputs is None else inputs, outputs, caller)


def test_the_policy_is_read_strictly_and_absent_by_default():
    assert MANIFEST.response_cache == ResponseCachePolicy()
    assert Manifest.from_json(MANIFEST.to_json()) == MANIFEST
    assert Manifest.from_json(manifest_text()).response_cache is None
    assert "response_cache" not in json.loads(Manifest.from_json(manifest_text()).to_json())
    for policy, fragment in [
        ({"max_entries": 0}, '"response_cache.max_entries" must be a whole number'),
        ({"max_mb": 10241}, '"response_cache.max_mb"'),
        ({"shared_across_callers": "yes"}, '"response_cache.shared_across_callers" must be true or false'),
        ({"ttl": 5}, "unknown field 'ttl'"),
    ]:
        with pytest.raises(ManifestError) as refused:
            cached_manifest(**policy)
        assert fragment in str(refused.value)


def test_every_part_of_a_request_changes_its_key():
    base = key()
    assert key() == base  # the same request, the same key
    other_rows = ROWS.copy()
    other_rows[1, 3] += 1
    variants = {
        "input bytes": key(inputs={"x": other_rows}),
        "datatype": key(inputs={"x": ROWS.astype(np.float64)}),
        "shape": key(inputs={"x": ROWS.reshape(4, 2)}),
        "input name": key(inputs={"y": ROWS}),
        "outputs asked for": key(outputs=["y"]),
        "caller": key(caller="iam:bob"),
        "version": key(Manifest.from_json(manifest_text(version="2", response_cache={}))),
        "artifact": key(replace(MANIFEST, model=Digest("c" * 64, 20))),
        "model": key(cached_manifest("other")),
        "shared": key(caller=None),
    }
    assert base not in variants.values()
    assert len(set(variants.values())) == len(variants)


def test_fields_cannot_run_into_each_other():
    split = {"ab": np.zeros(1, np.float32), "c": np.zeros(1, np.float32)}
    joined = {"a": np.zeros(1, np.float32), "bc": np.zeros(1, np.float32)}
    assert key(inputs=split) != key(inputs=joined)
    assert key(outputs=["a", "b"]) != key(outputs=["a\0b"])
    assert key(outputs=[]) != key(outputs=None)
    strings = {"s": np.array([b"ab", b"c"], dtype=object)}
    assert key(inputs=strings) != key(inputs={"s": np.array([b"a", b"bc"], dtype=object)})


def test_off_unless_the_manifest_opts_in():
    plain = Manifest.from_json(manifest_text())
    assert ResponseCache().key(plain, {"x": ROWS}, None, "iam:alice") is None


def test_callers_share_answers_only_when_the_model_says_so():
    cache = ResponseCache()
    assert cache.key(MANIFEST, {"x": ROWS}, None, "iam:alice") != cache.key(
        MANIFEST, {"x": ROWS}, None, "iam:bob"
    )
    shared = cached_manifest(shared_across_callers=True)
    assert cache.key(shared, {"x": ROWS}, None, "iam:alice") == cache.key(
        shared, {"x": ROWS}, None, "iam:bob"
    )


@pytest.mark.parametrize("caller", ["anonymous", "sagemaker", "direct", "unknown", ""])
def test_callers_that_name_nobody_get_nothing_cached_unless_answers_are_shared(caller):
    cache = ResponseCache()
    assert cache.key(MANIFEST, {"x": ROWS}, None, caller) is None  # they could not be kept apart
    assert cache.key(cached_manifest(shared_across_callers=True), {"x": ROWS}, None, caller) is not None


def answer(value: float) -> dict[str, np.ndarray]:
    return {"y": np.full((2, 3), value, dtype=np.float32)}


def test_entries_are_bounded_least_recently_used_first():
    manifest = cached_manifest(max_entries=2)
    cache = ResponseCache()
    keys = [bytes([i]) * 32 for i in range(3)]
    cache.put(manifest, keys[0], answer(0))
    cache.put(manifest, keys[1], answer(1))
    assert cache.get(manifest, keys[0]) is not None  # touched: the other is older now
    cache.put(manifest, keys[2], answer(2))
    assert cache.get(manifest, keys[1]) is None
    assert cache.get(manifest, keys[0])["y"][0, 0] == 0
    assert cache.size(manifest)[0] == 2


def test_bytes_are_bounded_and_an_answer_past_the_bound_is_not_kept():
    manifest = cached_manifest(max_mb=1)
    cache = ResponseCache()
    half = {"y": np.zeros(128 * 1024, dtype=np.float32)}  # 512 KiB
    for i in range(3):
        cache.put(manifest, bytes([i]) * 32, half)
    entries, held = cache.size(manifest)
    assert (entries, held) == (2, 2 * outputs_bytes(half))
    cache.put(manifest, b"big" * 11, {"y": np.zeros(300 * 1024, dtype=np.float32)})  # 1.2 MB
    assert cache.get(manifest, b"big" * 11) is None
    assert cache.size(manifest) == (2, held)


def test_one_models_answers_never_evict_anothers():
    small, other = cached_manifest(max_entries=1), cached_manifest("other", max_entries=1)
    cache = ResponseCache()
    cache.put(other, b"o" * 32, answer(9))
    for i in range(5):
        cache.put(small, bytes([i]) * 32, answer(i))
    assert cache.get(other, b"o" * 32)["y"][0, 0] == 9
    assert cache.get(small, b"o" * 32) is None  # nor does a key of one model read in another


def test_cached_answers_are_copies_that_cannot_be_changed():
    cache = ResponseCache()
    outputs = answer(1)
    cache.put(MANIFEST, b"k" * 32, outputs)
    outputs["y"][:] = 7  # the caller's arrays change after they were kept
    kept = cache.get(MANIFEST, b"k" * 32)
    assert kept["y"][0, 0] == 1
    with pytest.raises(ValueError):
        kept["y"][0, 0] = 5


@pytest.mark.usefixtures("emf")
def test_hits_and_misses_are_counted_under_the_model(capsys):
    cache = ResponseCache()
    cache.get(MANIFEST, b"k" * 32)
    cache.put(MANIFEST, b"k" * 32, answer(1))
    cache.get(MANIFEST, b"k" * 32)
    telemetry.flush_metrics()
    [line] = emf_lines(capsys.readouterr().out)
    assert dimension_sets(line) == [["service"], ["service", "model", "version"]]
    assert (line["model"], line["version"]) == ("iris", "1")
    assert (line["ResponseCacheHit"], line["ResponseCacheMiss"]) in ((1, 1), ([1], [1]), ([1.0], [1.0]))
