"""scikit-learn models converted by skl2onnx as users convert them (its defaults included)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx


def sklearn_classifier(path: Path, *, zipmap: bool, string_labels: bool = False) -> tuple[Path, object]:
    """A logistic regression on iris converted by skl2onnx: with its default ZipMap output (a
    sequence of maps) or with ``zipmap=False`` (a probability tensor). Returns it and the model."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    features, labels = load_iris(return_X_y=True)
    if string_labels:
        labels = np.array(["setosa", "versicolor", "virginica"])[labels]
    classifier = LogisticRegression(max_iter=500).fit(features.astype(np.float32), labels)
    options = None if zipmap else {id(classifier): {"zipmap": False}}
    onnx.save(to_onnx(classifier, features[:1].astype(np.float32), options=options), str(path))
    return path, classifier
