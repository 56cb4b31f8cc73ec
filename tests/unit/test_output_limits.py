"""Output limits: read strictly from the manifest, and applied to outputs (round, top-k) the
same way wherever they are applied."""

from __future__ import annotations

import json

import numpy as np
import pytest

from support.manifests import manifest_text, raw_manifest
from tierserve import output_limits
from tierserve.catalog import Manifest, ManifestError, OutputLimits

TWO_OUTPUTS = [
    {"name": "label", "datatype": "INT64", "shape": [-1]},
    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 4]},
]


def limited(**limits: object) -> Manifest:
    return Manifest.from_json(manifest_text(outputs=TWO_OUTPUTS, output_limits=limits))


def test_limits_round_trip_and_are_absent_by_default():
    manifest = limited(round=3, top_k=2, outputs=["probabilities"])
    assert manifest.output_limits == OutputLimits(round=3, top_k=2, outputs=("probabilities",))
    assert Manifest.from_json(manifest.to_json()) == manifest
    plain = Manifest.from_json(manifest_text())
    assert plain.output_limits is None
    assert "output_limits" not in json.loads(plain.to_json())  # an older reader still reads it


@pytest.mark.parametrize(
    ("limits", "fragment"),
    [
        ({}, "limits nothing"),
        ({"round": 16}, '"output_limits.round" must be a whole number (a JSON integer) from 0 to 15'),
        ({"round": -1}, '"output_limits.round"'),
        ({"round": 2.0}, '"output_limits.round"'),
        ({"round": True}, '"output_limits.round"'),
        ({"top_k": 0}, '"output_limits.top_k" must be a whole number (a JSON integer) from 1'),
        ({"top_k": "3"}, '"output_limits.top_k"'),
        ({"top_k": 1, "classes": 3}, "unknown field 'classes'"),
        ({"top_k": 1, "outputs": "probabilities"}, '"output_limits.outputs" must be a list'),
        ({"top_k": 1, "outputs": [7]}, '"output_limits.outputs[0]" must be a string'),
        (
            {"top_k": 1, "outputs": ["scores"]},
            "names 'scores', not an output of the model (label, probabilities)",
        ),
        ({"top_k": 1, "outputs": ["label"]}, "names 'label', a INT64 output"),
    ],
)
def test_bad_limits_are_refused_with_what_to_fix(limits, fragment):
    with pytest.raises(ManifestError) as refused:
        limited(**limits)
    assert fragment in str(refused.value)


def test_limits_on_a_model_without_float_outputs_are_refused():
    text = manifest_text(outputs=[TWO_OUTPUTS[0]], output_limits={"round": 2})
    with pytest.raises(ManifestError, match="no FP16/FP32/FP64 output"):
        Manifest.from_json(text)


def test_a_limits_object_that_is_not_an_object_is_refused():
    with pytest.raises(ManifestError, match="must be a JSON object"):
        Manifest.from_dict(raw_manifest(outputs=TWO_OUTPUTS, output_limits=[1]))


SCORES = np.array([[0.123456, 0.5, 0.3, 0.076544], [0.25, 0.25, 0.25, 0.25]], dtype=np.float32)


def test_top_k_keeps_the_largest_of_each_row_and_zeroes_the_rest():
    result = output_limits.limit(SCORES, OutputLimits(top_k=2))
    np.testing.assert_array_equal(result[0], np.array([0, 0.5, 0.3, 0], dtype=np.float32))
    np.testing.assert_array_equal(
        result[1], np.array([0.25, 0.25, 0, 0], dtype=np.float32)
    )  # ties: lowest first
    assert (result.dtype, result.shape) == (SCORES.dtype, SCORES.shape)


def test_round_keeps_the_datatype_and_the_decimals_asked_for():
    result = output_limits.limit(SCORES, OutputLimits(round=2))
    assert result.dtype == np.float32
    assert result[0].tolist() == pytest.approx([0.12, 0.5, 0.3, 0.08])
    assert json.dumps(float(result[0, 0])) != json.dumps(float(SCORES[0, 0]))


def test_limits_apply_to_float_outputs_only_and_are_idempotent():
    manifest = limited(round=1, top_k=1)
    outputs = {"label": np.array([1, 0], dtype=np.int64), "probabilities": SCORES}
    once = output_limits.apply(manifest, outputs)
    np.testing.assert_array_equal(once["label"], outputs["label"])
    np.testing.assert_array_equal(once["probabilities"][0], np.array([0, 0.5, 0, 0], dtype=np.float32))
    twice = output_limits.apply(manifest, once)
    for name in outputs:
        np.testing.assert_array_equal(twice[name], once[name])
    np.testing.assert_array_equal(outputs["probabilities"], SCORES)  # the model's own arrays are untouched


def test_only_the_named_outputs_are_limited():
    outputs_spec = [*TWO_OUTPUTS, {"name": "embedding", "datatype": "FP32", "shape": [-1, 4]}]
    manifest = Manifest.from_json(
        manifest_text(outputs=outputs_spec, output_limits={"top_k": 1, "outputs": ["probabilities"]})
    )
    result = output_limits.apply(manifest, {"probabilities": SCORES, "embedding": SCORES})
    np.testing.assert_array_equal(result["embedding"], SCORES)
    assert np.count_nonzero(result["probabilities"], axis=-1).tolist() == [1, 1]


def test_a_k_as_large_as_the_row_keeps_everything():
    np.testing.assert_array_equal(output_limits.limit(SCORES, OutputLimits(top_k=4)), SCORES)
