"""The loader's own layout: a graph file whose large weights are references into the verified
model file, read by onnxruntime in place. Same outputs, nothing copied, and an artifact that
declares external data of its own is refused."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from support.hostile_artifacts import add_model
from tierserve.errors import ArtifactRejected
from tierserve.onnx_layout import GRAPH_FILE, WEIGHTS_FILE, NotOnnx, write_graph
from tierserve.tools.local import samples


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_the_graph_file_references_the_weights_where_they_lie_and_answers_the_same(tmp_path):
    model = samples.mlp(tmp_path / WEIGHTS_FILE, features=16, hidden=128, layers=3, classes=5)
    moved = write_graph(model, tmp_path / GRAPH_FILE, "mlp@1")
    assert moved >= 2  # its large initializers
    graph = tmp_path / GRAPH_FILE
    assert graph.stat().st_size < model.stat().st_size / 10  # the graph alone: the weights stay put
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    for want, got in zip(
        session(model).run(None, {"input": x}), session(graph).run(None, {"input": x}), strict=True
    ):
        np.testing.assert_array_equal(want, got)


def test_a_model_of_small_initializers_moves_nothing(tmp_path):
    (tmp_path / WEIGHTS_FILE).write_bytes(add_model())
    assert write_graph(tmp_path / WEIGHTS_FILE, tmp_path / GRAPH_FILE, "add@1") == 0


def test_external_data_an_artifact_declares_is_refused(tmp_path):
    (tmp_path / WEIGHTS_FILE).write_bytes(add_model(external_location="../other/model.onnx"))
    with pytest.raises(ArtifactRejected, match="add@1 declares ONNX external data"):
        write_graph(tmp_path / WEIGHTS_FILE, tmp_path / GRAPH_FILE, "add@1")


@pytest.mark.parametrize(
    "data", [b"not a protobuf at all", b"\x3a\xff\xff\xff\x0f"], ids=["text", "overlong"]
)
def test_bytes_that_are_not_onnx_are_left_to_onnxruntime(tmp_path, data):
    (tmp_path / WEIGHTS_FILE).write_bytes(data)
    with pytest.raises(NotOnnx):
        write_graph(tmp_path / WEIGHTS_FILE, tmp_path / GRAPH_FILE, "x@1")
