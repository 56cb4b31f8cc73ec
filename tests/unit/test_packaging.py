"""Packaging without S3: validation, quantization, optimization, compression, the accuracy
budget, and that a failure leaves nothing behind. Real onnx and onnxruntime, small models."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from support.sklearn_models import sklearn_classifier
from tierserve.catalog import MANIFEST_NAME, Digest, Manifest, TensorSpec
from tierserve.model import create_session
from tierserve.store import ArtifactStore, FileSource
from tierserve.tools.packaging import (
    AccuracyOutOfBudget,
    InvalidModel,
    PackageOptions,
    PackagingError,
    QuantizationUnsupported,
    check_model,
    choose_zstd_level,
    generate_inputs,
    load_calibration,
    package,
    package_model,
)
from tierserve.tools.packaging._accuracy import Budget, compare, violations
from tierserve.tools.packaging._feeds import iter_batches
from tierserve.tools.packaging._upload import stored_artifact_name


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def mlp_packages(mlp_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The mlp sample packaged as fp32 and as int8 (shared: packaging is the slow part)."""
    root = tmp_path_factory.mktemp("mlp-packages")
    return {
        quantization: package(
            mlp_onnx,
            root / quantization,
            PackageOptions(name="mlp", version="1", quantization=quantization, compression="zstd"),
        )
        for quantization in ("none", "int8")
    }


@pytest.mark.parametrize(("target_mb_s", "expected"), [(1.0, "zstd"), (100_000.0, "none")])
def test_zstd_is_kept_only_where_it_makes_a_cold_start_faster(mlp_onnx, tmp_path, target_mb_s, expected):
    """At 1 MB/s every byte saved is worth far more than its decoding; at 100 GB/s none is."""
    report = package(
        mlp_onnx,
        tmp_path / "models" / "mlp" / "1",
        PackageOptions(name="mlp", version="1", optimize=False, target_mb_s=target_mb_s),
    )
    manifest = report.manifest
    assert manifest.compression == expected
    assert manifest.extra["compression_choice"]["compression"] == expected
    assert manifest.extra["compression_choice"]["target_mb_s"] == target_mb_s
    assert any(
        note.startswith("zstd pays" if expected == "zstd" else "stored uncompressed") for note in report.notes
    )
    if expected == "none":
        assert manifest.stored == manifest.model and manifest.artifact.endswith(".onnx")
    # Served as the core reads it, either way.
    store = ArtifactStore(FileSource(tmp_path / "models"), tmp_path / "cache", 1 << 30)
    session = create_session(store.fetch(manifest).path, manifest, threads=1)
    assert [i.name for i in session.get_inputs()] == [spec.name for spec in manifest.inputs]


def test_int8_mlp_is_smaller_and_within_budget(mlp_packages, mlp_onnx):
    fp32, int8 = mlp_packages["none"], mlp_packages["int8"]
    manifest = int8.manifest
    assert manifest.quantization == "int8-dynamic" and manifest.optimized
    assert manifest.extra["int8_scales"] in ("per-tensor", "per-channel")  # the more accurate of both
    assert manifest.stored.bytes < fp32.manifest.stored.bytes < mlp_onnx.stat().st_size
    assert int8.stored_ratio < 0.5
    accuracy = manifest.accuracy
    assert accuracy["within_budget"] is True
    assert accuracy["top1"] >= 0.98 and accuracy["outputs"]["probabilities"]["kind"] == "classifier"
    assert accuracy["rows"] == 256 and "generated" in accuracy["inputs"]
    on_disk = Manifest.from_dict(json.loads((int8.packaged.directory / MANIFEST_NAME).read_text()))
    assert on_disk == manifest
    assert sorted(p.name for p in int8.packaged.directory.iterdir()) == [MANIFEST_NAME, "model.onnx.zst"]
    assert _leftovers(int8.packaged.directory.parent) == []
    assert "stored / original" in int8.table() and "top-1 agreement" in int8.table()


def test_unquantized_package_keeps_outputs_within_the_tight_default(mlp_packages):
    report = mlp_packages["none"]
    assert report.manifest.quantization == "none"
    assert report.accuracy["budget"]["max_abs_diff"] == 1e-3
    assert report.accuracy["max_abs_diff"] <= 1e-5
    assert report.manifest.extra["zstd_level"] in (3, 9, 15, 19)
    assert report.manifest.extra["source_sha256"] and report.manifest.extra["onnxruntime"]


def test_ort_format_is_served_by_the_core_as_packaged(mlp_onnx, tmp_path):
    report = package(
        mlp_onnx,
        tmp_path / "ort",
        PackageOptions(name="mlp", version="1", quantization="int8", model_format="ort"),
    )
    suffix = {"zstd": ".zst", "none": ""}[report.manifest.compression]  # whichever pays
    assert report.manifest.format == "ort" and report.manifest.artifact == "model.ort" + suffix
    assert report.accuracy["within_budget"] is True  # measured through tierserve.model.create_session


def test_fp16_on_the_gpu_tier_is_not_optimized_for_cpu(mlp_onnx, tmp_path):
    report = package(
        mlp_onnx, tmp_path / "fp16", PackageOptions(name="mlp", version="1", quantization="fp16", tier="gpu")
    )
    assert report.manifest.quantization == "fp16" and report.manifest.tier == "gpu"
    assert report.manifest.optimized is False
    assert report.accuracy["max_abs_diff"] <= 1e-2
    assert any("GPU tier optimizes at load" in note for note in report.notes)


def test_static_int8_uses_the_calibration_rows(mlp_onnx, tmp_path):
    rows = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    np.save(tmp_path / "rows.npy", rows)
    report = package(
        mlp_onnx,
        tmp_path / "static",
        PackageOptions(
            name="mlp", version="1", quantization="int8", calibration=tmp_path / "rows.npy", force=True
        ),
    )
    assert report.manifest.quantization == "int8-static"
    assert report.accuracy["rows"] == 64 and "calibration" in report.accuracy["inputs"]
    assert report.accuracy["outputs"]["probabilities"]["cosine"] > 0.99


def test_over_budget_is_refused_and_leaves_nothing(mlp_onnx, tmp_path):
    out = tmp_path / "pkg"
    options = PackageOptions(name="mlp", version="1", quantization="int8", min_cosine=1.0, min_top1=1.0)
    options = PackageOptions(**{**options.__dict__, "max_abs_diff": 1e-9})
    with pytest.raises(
        AccuracyOutOfBudget, match=r"outside the accuracy budget: probabilities: max abs diff"
    ):
        package(mlp_onnx, out, options)
    assert not out.exists() and _leftovers(tmp_path) == []

    forced = package(mlp_onnx, out, PackageOptions(**{**options.__dict__, "force": True}))
    assert forced.accuracy["forced"] is True and forced.accuracy["within_budget"] is False
    assert any("--force" in note for note in forced.notes)


def test_a_failed_package_keeps_the_previous_one_whole(mlp_onnx, iris_onnx, tmp_path):
    out = tmp_path / "pkg"
    first = package(mlp_onnx, out, PackageOptions(name="mlp", version="1"))
    with pytest.raises(QuantizationUnsupported):
        package(iris_onnx, out, PackageOptions(name="mlp", version="1", quantization="int8"))
    assert Manifest.from_dict(json.loads((out / MANIFEST_NAME).read_text())) == first.manifest
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("quantization", "message"),
    [
        (
            "int8",
            r"int8-dynamic quantization failed on this model .*LinearClassifier \(ai.onnx.ml\).*--quantization none",
        ),
        ("fp16", r"fp16 quantization changed nothing.*--quantization none"),
    ],
)
def test_quantization_that_cannot_handle_the_ops_is_refused(iris_onnx, tmp_path, quantization, message):
    with pytest.raises(QuantizationUnsupported, match=message):
        package(
            iris_onnx, tmp_path / "pkg", PackageOptions(name="iris", version="1", quantization=quantization)
        )


def test_iris_unquantized_reports_label_agreement(iris_onnx, tmp_path):
    report = package(iris_onnx, tmp_path / "pkg", PackageOptions(name="iris", version="1"))
    outputs = report.accuracy["outputs"]
    assert outputs["label"] == {"kind": "label", "agreement": 1.0}
    assert outputs["probabilities"]["kind"] == "classifier" and outputs["probabilities"]["top1"] == 1.0


# --- validation -------------------------------------------------------------------------


def _linear_model(weight_location: str | None = None) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if weight_location is not None:
        tensor = model.graph.initializer[0]
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", weight_location), ("offset", "0"), ("length", "48")):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return model


def _save_raw(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def outside_weights(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "weights.bin"
    secret.parent.mkdir()
    secret.write_bytes(np.arange(12, dtype=np.float32).tobytes())
    return secret


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_external_data_leaving_the_model_folder_is_refused(tmp_path, outside_weights, how):
    folder = tmp_path / "model"
    folder.mkdir()
    if how == "absolute":
        location = str(outside_weights)
    elif how == "dotdot":
        location = "../outside/weights.bin"
    else:
        os.symlink(outside_weights, folder / "weights.bin")
        location = "weights.bin"
    path = _save_raw(_linear_model(location), folder / "model.onnx")
    expected = {"absolute": "an absolute path", "dotdot": "a path with '..'", "symlink": "resolves outside"}[
        how
    ]
    with pytest.raises(InvalidModel, match=expected):
        check_model(path, tmp_path)
    with pytest.raises(InvalidModel, match=expected):
        package(path, tmp_path / "pkg", PackageOptions(name="linear", version="1"))
    assert not (tmp_path / "pkg").exists()


def test_external_data_inside_the_folder_is_packaged_as_one_file(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(np.arange(12, dtype=np.float32).tobytes())
    path = _save_raw(_linear_model("weights.bin"), folder / "model.onnx")
    report = package(path, tmp_path / "pkg", PackageOptions(name="linear", version="1"))
    assert report.source_bytes == path.stat().st_size + 48
    assert report.accuracy["max_abs_diff"] == 0.0
    assert report.manifest.extra["source_sha256"]


def test_missing_external_data_is_refused(tmp_path):
    path = _save_raw(_linear_model("absent.bin"), tmp_path / "m" / "model.onnx")
    with pytest.raises(InvalidModel, match="missing"):
        check_model(path, tmp_path)


def test_garbage_and_broken_models_are_refused(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not an onnx model at all\xff\xfe" * 10)
    with pytest.raises(InvalidModel, match=r"not an ONNX model|fails the ONNX checker"):
        check_model(garbage, tmp_path)
    broken = _linear_model()
    broken.graph.node[0].input[1] = "undefined"
    with pytest.raises(InvalidModel, match="fails the ONNX checker"):
        check_model(_save_raw(broken, tmp_path / "broken.onnx"), tmp_path)
    with pytest.raises(InvalidModel, match="does not exist"):
        check_model(tmp_path / "nope.onnx", tmp_path)


def test_opset_outside_the_supported_range_is_refused(tmp_path):
    old = _linear_model()
    old.opset_import[0].version = 6
    with pytest.raises(InvalidModel, match="opset 6; tierserve supports opsets 7 to"):
        check_model(_save_raw(old, tmp_path / "old.onnx"), tmp_path)


# --- inputs, metrics, zstd --------------------------------------------------------------


def test_generated_inputs_follow_the_signature():
    specs = (
        TensorSpec("input_ids", "INT64", (-1, -1)),
        TensorSpec("attention_mask", "INT64", (-1, -1)),
        TensorSpec("token_type_ids", "INT64", (-1, -1)),
        TensorSpec("scale", "FP16", (3,)),
    )
    feeds = generate_inputs(specs, rows=20)
    assert feeds["input_ids"].shape == (20, 32) and feeds["input_ids"].max() < 100
    assert (feeds["attention_mask"] == 1).all() and (feeds["token_type_ids"] == 0).all()
    assert feeds["scale"].dtype == np.float16
    again = generate_inputs(specs, rows=20)
    np.testing.assert_array_equal(feeds["input_ids"], again["input_ids"])
    image = generate_inputs((TensorSpec("image", "FP32", (1, 3, 8, 8)),), rows=40)
    assert image["image"].shape == (16, 3, 8, 8)
    assert [
        b["image"].shape[0] for b in iter_batches(image, (TensorSpec("image", "FP32", (1, 3, 8, 8)),))
    ] == [1] * 16


def test_calibration_files_are_checked_against_the_signature(tmp_path):
    specs = (TensorSpec("a", "FP32", (-1, 4)), TensorSpec("b", "INT64", (-1,)))
    np.savez(tmp_path / "ok.npz", a=np.zeros((5, 4)), b=np.zeros(5))
    feeds = load_calibration(tmp_path / "ok.npz", specs)
    assert feeds["a"].dtype == np.float32 and feeds["b"].dtype == np.int64
    np.savez(tmp_path / "missing.npz", a=np.zeros((5, 4)))
    with pytest.raises(InvalidModel, match="no array for input 'b'"):
        load_calibration(tmp_path / "missing.npz", specs)
    np.save(tmp_path / "one.npy", np.zeros((5, 4)))
    with pytest.raises(InvalidModel, match="holds one array but the model has inputs a, b"):
        load_calibration(tmp_path / "one.npy", specs)
    np.savez(tmp_path / "shape.npz", a=np.zeros((5, 3)), b=np.zeros(5))
    with pytest.raises(InvalidModel, match=r"has shape \[5, 3\]"):
        load_calibration(tmp_path / "shape.npz", specs)


def test_metrics_and_budget():
    outputs = (
        TensorSpec("probabilities", "FP32", (-1, 3)),
        TensorSpec("embedding", "FP32", (-1, 4)),
        TensorSpec("label", "INT64", (-1,)),
    )
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], np.float32)
    embedding = np.array([[1.0, -2.0, 0.5, 0.0], [0.3, 0.3, -0.3, 1.0]], np.float32)
    labels = np.array([0, 1])
    flipped = probabilities[:, [1, 0, 2]]
    per_output = compare([probabilities, embedding, labels], [flipped, -embedding, np.array([0, 2])], outputs)
    assert per_output["probabilities"]["kind"] == "classifier" and per_output["probabilities"]["top1"] == 0.0
    assert per_output["embedding"]["kind"] == "embedding" and per_output["embedding"]["cosine"] == -1.0
    assert per_output["label"] == {"kind": "label", "agreement": 0.5}
    problems = violations(per_output, Budget(max_abs_diff=0.1))
    assert len(problems) == 5  # two max-abs-diff, top-1, cosine, label agreement
    same = compare([probabilities, embedding, labels], [probabilities, embedding, labels], outputs)
    assert violations(same, Budget(max_abs_diff=0.0)) == []
    nan = compare([probabilities], [np.full_like(probabilities, np.nan)], outputs[:1])
    assert any("NaN" in p for p in violations(nan, Budget()))


def test_zstd_level_rule(tmp_path):
    path = tmp_path / "blob.bin"
    rng = np.random.default_rng(0)
    path.write_bytes((rng.integers(0, 4, size=200_000, dtype=np.uint8)).tobytes())
    unlimited = choose_zstd_level(path, budget_s=1e9)
    best = min(t["ratio"] for t in unlimited.trials)
    chosen = next(t for t in unlimited.trials if t["level"] == unlimited.level)
    assert chosen["ratio"] <= best * 1.01
    assert all(t["ratio"] > best * 1.01 for t in unlimited.trials if t["level"] < unlimited.level)
    assert choose_zstd_level(path, budget_s=0).level == 3  # nothing fits: the lowest level


def test_package_model_replaces_a_package_in_place(mlp_onnx, iris_onnx, tmp_path):
    out = tmp_path / "pkg"
    package_model(mlp_onnx, name="mlp", version="1", out_dir=out)
    second = package_model(iris_onnx, name="iris", version="1", out_dir=out, compression="gzip")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "model.onnx.gz"]
    assert second.artifact == out / "model.onnx.gz" and _leftovers(tmp_path) == []


def test_unknown_quantization_is_a_packaging_error(mlp_onnx, tmp_path):
    with pytest.raises(PackagingError, match="must be one of none, int8, fp16"):
        package(mlp_onnx, tmp_path / "pkg", PackageOptions(name="mlp", version="1", quantization="int4"))


def test_packaged_int8_runs_through_the_serving_core(mlp_packages, mlp_onnx, tmp_path):
    """Decompressed artifact + manifest -> tierserve.model.create_session, as the loader does."""
    import zstandard

    report = mlp_packages["int8"]
    model_path = tmp_path / "model.onnx"
    with report.packaged.artifact.open("rb") as source, model_path.open("wb") as target:
        zstandard.ZstdDecompressor().copy_stream(source, target)
    session = create_session(model_path, report.manifest, threads=1)
    rows = generate_inputs(report.manifest.inputs, rows=256)
    import onnxruntime as ort

    reference = ort.InferenceSession(str(mlp_onnx), providers=["CPUExecutionProvider"])
    # One row per request, as the accuracy was measured: dynamic int8 scales depend on the batch.
    original = np.concatenate([reference.run(None, {"input": row[None]})[0] for row in rows["input"]])
    served = np.concatenate([session.run(None, {"input": row[None]})[0] for row in rows["input"]])
    assert np.abs(original - served).max() <= report.accuracy["max_abs_diff"] * (1 + 1e-5)
    assert np.mean(original.argmax(1) == served.argmax(1)) == pytest.approx(report.accuracy["top1"], abs=1e-6)


@pytest.mark.parametrize(
    ("artifact", "stored_name"),
    [
        ("model.onnx.zst", "model-0123456789abcdef.onnx.zst"),
        ("model.ort.gz", "model-0123456789abcdef.ort.gz"),
        ("model.onnx", "model-0123456789abcdef.onnx"),
        ("model-0123456789abcdef.onnx.zst", "model-0123456789abcdef.onnx.zst"),  # already named
    ],
)
def test_the_artifact_is_stored_under_a_name_from_its_content(iris_package, artifact, stored_name):
    manifest = dataclasses.replace(
        iris_package.manifest, artifact=artifact, stored=Digest("0123456789abcdef" + "f" * 48, 10)
    )
    assert stored_artifact_name(manifest) == stored_name
    renamed = dataclasses.replace(manifest, artifact=stored_name)
    assert Manifest.from_dict(json.loads(renamed.to_json())).artifact == stored_name  # readers accept it


# ---------------------------------------------------------------- skl2onnx classifiers and ZipMap


@pytest.mark.parametrize("string_labels", [False, True], ids=["int-labels", "string-labels"])
@pytest.mark.parametrize("zipmap", [True, False], ids=["zipmap", "zipmap-false"])
def test_skl2onnx_classifiers_are_packaged_and_served_with_a_probability_tensor(
    tmp_path, zipmap, string_labels
):
    source, classifier = sklearn_classifier(tmp_path / "clf.onnx", zipmap=zipmap, string_labels=string_labels)
    report = package(source, tmp_path / "models" / "clf" / "1", PackageOptions(name="clf", version="1"))
    label, probability = ("output_label", "output_probability") if zipmap else ("label", "probabilities")
    outputs = {spec.name: spec for spec in report.manifest.outputs}
    assert outputs[probability] == TensorSpec(probability, "FP32", (-1, 3))  # ZipMap's output keeps its name
    assert outputs[label].datatype == ("BYTES" if string_labels else "INT64")
    assert report.accuracy["within_budget"] is True
    assert any("was a ZipMap" in note and "zipmap=False" in note for note in report.notes) is zipmap
    # As the serving core opens it: fetched and verified from the package folder, signature checked.
    store = ArtifactStore(FileSource(tmp_path / "models"), tmp_path / "cache", 1 << 30)
    session = create_session(store.fetch(report.manifest).path, report.manifest, threads=1)
    rows = np.random.default_rng(0).uniform(0, 7, (5, 4)).astype(np.float32)
    labels, probabilities = session.run([label, probability], {"X": rows})
    np.testing.assert_allclose(probabilities, classifier.predict_proba(rows), atol=1e-5)
    assert list(labels) == list(classifier.predict(rows))


def test_a_zipmap_that_cannot_become_its_tensor_is_refused_naming_zipmap_false(tmp_path):
    source, _ = sklearn_classifier(tmp_path / "clf.onnx", zipmap=True)
    model = onnx.load(str(source))
    zipmap = next(node for node in model.graph.node if node.op_type == "ZipMap")
    model.graph.output.append(helper.make_tensor_value_info(zipmap.input[0], TensorProto.FLOAT, [None, 3]))
    onnx.save(model, str(source))  # its probabilities are a graph output as well
    with pytest.raises(InvalidModel) as refused:
        package(source, tmp_path / "pkg", PackageOptions(name="clf", version="1"))
    assert "output 'output_probability' is a ZipMap" in refused.value.message
    assert "{'zipmap': False}" in refused.value.message
    assert not (tmp_path / "pkg").exists() and _leftovers(tmp_path) == []


def test_the_plain_packaging_step_refuses_a_sequence_of_maps_naming_zipmap_false(tmp_path):
    source, _ = sklearn_classifier(tmp_path / "clf.onnx", zipmap=True)
    with pytest.raises(InvalidModel) as refused:
        package_model(source, name="clf", version="1", out_dir=tmp_path / "pkg")
    message = refused.value.message
    assert "output 'output_probability' is seq(map(int64,tensor(float)))" in message
    assert "{'zipmap': False}" in message
