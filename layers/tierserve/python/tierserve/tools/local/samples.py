"""Sample models that tierserve builds itself: nothing is downloaded from a hub.

Used by the local API, the tests and the benchmarks, so all three serve the same models.
Every builder is deterministic (fixed seeds) and needs only numpy, onnx and, for the
classifier, scikit-learn with skl2onnx.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def iris_classifier(path: Path) -> Path:
    """A scikit-learn logistic regression on the iris data, converted with skl2onnx.

    Input ``input`` FP32 [-1, 4]; outputs ``label`` INT64 [-1] and ``probabilities`` FP32 [-1, 3].
    """
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    features, labels = load_iris(return_X_y=True)
    classifier = LogisticRegression(max_iter=500).fit(features.astype(np.float32), labels)
    onnx_model = to_onnx(
        classifier,
        features[:1].astype(np.float32),
        options={id(classifier): {"zipmap": False}},
        target_opset=17,
        final_types=None,
    )
    _rename_io(
        onnx_model,
        inputs={"X": "input"},
        outputs={"output_label": "label", "output_probability": "probabilities"},
    )
    return _save(onnx_model, path)


def iris_rows() -> np.ndarray:
    """The iris features as FP32, for requests and accuracy checks."""
    from sklearn.datasets import load_iris

    return load_iris(return_X_y=True)[0].astype(np.float32)


def mlp(
    path: Path, *, features: int = 256, hidden: int = 1024, layers: int = 4, classes: int = 10, seed: int = 0
) -> Path:
    """A multilayer perceptron (Gemm + Relu, softmax head) with seeded random weights.

    Size grows with ``hidden`` and ``layers``: hidden=2048, layers=8 is about 100 MB (layers=6: 69 MB).
    Input ``input`` FP32 [-1, features]; output ``probabilities`` FP32 [-1, classes].
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    width, current = features, "input"
    for index in range(layers):
        out_width = classes if index == layers - 1 else hidden
        weight = (rng.standard_normal((width, out_width)) / np.sqrt(width)).astype(np.float32)
        bias = np.zeros(out_width, dtype=np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"w{index}"),
            numpy_helper.from_array(bias, f"b{index}"),
        ]
        nodes.append(helper.make_node("Gemm", [current, f"w{index}", f"b{index}"], [f"gemm{index}"]))
        current = f"gemm{index}"
        if index < layers - 1:
            nodes.append(helper.make_node("Relu", [current], [f"relu{index}"]))
            current = f"relu{index}"
        width = out_width
    nodes.append(helper.make_node("Softmax", [current], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        initializers,
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def convnet(path: Path, *, channels: int = 32, classes: int = 1000, seed: int = 0) -> Path:
    """A small image classifier shape (Conv-Relu x3, global pool, Gemm, softmax), seeded weights.

    Input ``image`` FP32 [-1, 3, 224, 224]; output ``probabilities`` FP32 [-1, classes].
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    current, in_channels = "image", 3
    for index, out_channels in enumerate((channels, channels * 2, channels * 4)):
        weight = (
            rng.standard_normal((out_channels, in_channels, 3, 3)) * np.sqrt(2 / (in_channels * 9))
        ).astype(np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"conv{index}_w"),
            numpy_helper.from_array(np.zeros(out_channels, np.float32), f"conv{index}_b"),
        ]
        nodes += [
            helper.make_node(
                "Conv",
                [current, f"conv{index}_w", f"conv{index}_b"],
                [f"conv{index}"],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
            ),
            helper.make_node("Relu", [f"conv{index}"], [f"relu{index}"]),
        ]
        current, in_channels = f"relu{index}", out_channels
    head = (rng.standard_normal((in_channels, classes)) / np.sqrt(in_channels)).astype(np.float32)
    initializers += [
        numpy_helper.from_array(head, "head_w"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "head_b"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [current], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "head_w", "head_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "convnet",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        initializers,
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _rename_io(model: object, *, inputs: dict[str, str], outputs: dict[str, str]) -> None:
    graph = model.graph  # type: ignore[attr-defined]
    renames = {**inputs, **outputs}
    for value in list(graph.input) + list(graph.output):
        value.name = renames.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]


def _save(model: object, path: Path) -> Path:
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)  # type: ignore[arg-type]
    onnx.save(model, str(path))  # type: ignore[arg-type]
    return path
