"""Artifacts with honest digests that onnxruntime refuses (or that try to read another
model's bytes), built by the tests and uploaded as ``tierserve upload`` would store them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tierserve.catalog import Digest, Manifest, TensorSpec
from tierserve.tools.packaging import PackagedModel, compress_file, sha256_file, upload_package

SIGNATURE_IN = (TensorSpec("x", "FP32", (4,)),)
SIGNATURE_OUT = (TensorSpec("y", "FP32", (4,)),)


def external_tensor(name: str, location: str, elements: int = 4) -> TensorProto:
    """A FP32 initializer whose bytes ONNX external data says are in ``location``."""
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[elements])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(4 * elements))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def add_model(*, external_location: str | None = None, padding_floats: int = 0, op: str = "Add") -> bytes:
    """``y = x + w`` for a [4] FP32 ``x``: ``w`` inline (zeros), or as external data at
    ``external_location``; ``padding_floats`` adds an unused inline initializer, so the model
    is as large as a test needs; ``op`` other than Add makes an operator onnxruntime lacks."""
    weights = (
        external_tensor("w", external_location)
        if external_location is not None
        else numpy_helper.from_array(np.zeros(4, np.float32), "w")
    )
    initializers = [weights]
    if padding_floats:
        padding = np.random.default_rng(0).standard_normal(padding_floats).astype(np.float32)
        initializers.append(numpy_helper.from_array(padding, "padding"))
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "w"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def upload_artifact(
    s3: object,
    bucket: str,
    work: Path,
    *,
    name: str,
    model_bytes: bytes,
    inputs: tuple[TensorSpec, ...] = SIGNATURE_IN,
) -> Manifest:
    """Package ``model_bytes`` as they are (zstd, both digests honest, nothing checked) and
    upload them as ``{name}@1``; returns the manifest as stored."""
    work.mkdir(parents=True, exist_ok=True)
    model_file, artifact = work / f"{name}.onnx", work / f"{name}.onnx.zst"
    model_file.write_bytes(model_bytes)
    compress_file(model_file, artifact, "zstd", level=3)
    manifest = Manifest(
        name=name,
        version="1",
        format="onnx",
        compression="zstd",
        artifact=artifact.name,
        stored=Digest(sha256_file(artifact), artifact.stat().st_size),
        model=Digest(sha256_file(model_file), model_file.stat().st_size),
        inputs=inputs,
        outputs=SIGNATURE_OUT,
    )
    return upload_package(PackagedModel(manifest, artifact), s3, bucket, "models").manifest
