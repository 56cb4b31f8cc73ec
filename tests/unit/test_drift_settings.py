"""Drift's variables and context keys: read through the one reader (a bad value names the
variable, the value and the fix), and every one of them in the README."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from tierserve import capture
from tierserve.drift import settings as drift_settings
from tierserve.drift.settings import DriftSettings
from tierserve.settings import SettingsError
from tierserve.tools.cdk_context import InfraConfig

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
BAD = {
    "TIERSERVE_CAPTURE": "iris=0.1",
    "TIERSERVE_CAPTURE_BATCH": "0",
    "TIERSERVE_CAPTURE_FLUSH_S": "soon",
    "TIERSERVE_DRIFT_WINDOW_HOURS": "1000",
    "TIERSERVE_DRIFT_PSI_THRESHOLD": "-1",
    "TIERSERVE_DRIFT_MIN_ROWS": "many",
}
DRIFT_KEYS = (
    "capture",
    "capture_retention_days",
    "drift_window_hours",
    "drift_psi_threshold",
    "drift_min_rows",
)


def every_variable():
    return [*capture.VARIABLES, *drift_settings.VARIABLES]


@pytest.mark.parametrize("variable", every_variable(), ids=lambda v: v.name)
def test_a_bad_value_names_the_variable_the_value_and_the_fix(variable):
    value = BAD[variable.name]
    with pytest.raises(SettingsError) as raised:
        variable.read({variable.name: value}, None)
    message = str(raised.value)
    assert message.startswith(f"{variable.name}={value!r} ") and "; set it to " in message, message
    assert ", or unset it for " in message


def test_the_drift_function_needs_both_buckets_and_reads_its_judgement():
    with pytest.raises(SettingsError, match="TIERSERVE_MODEL_BUCKET is not set"):
        DriftSettings.from_env({"TIERSERVE_DATA_BUCKET": "data"})
    with pytest.raises(SettingsError, match="TIERSERVE_DATA_BUCKET is not set"):
        DriftSettings.from_env({"TIERSERVE_MODEL_BUCKET": "models"})
    read = DriftSettings.from_env(
        {
            "TIERSERVE_MODEL_BUCKET": "models",
            "TIERSERVE_DATA_BUCKET": "data",
            "TIERSERVE_MODELS": "iris@3",
            "TIERSERVE_DRIFT_WINDOW_HOURS": "6",
            "TIERSERVE_DRIFT_PSI_THRESHOLD": "0.2",
        }
    )
    assert read.window.total_seconds() == 6 * 3600 and read.threshold == 0.2 and read.min_rows == 100
    assert [str(m) for m in read.models] == ["iris@3"]


def test_the_readme_lists_every_drift_variable_and_key():
    assert [v.name for v in every_variable() if f"`{v.name}`" not in README] == []
    assert [k for k in DRIFT_KEYS if f"`{k}`" not in README] == []
    assert set(DRIFT_KEYS) <= {f.name for f in fields(InfraConfig)}


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ({"iris": {"rate": 0.1}, "mlp": {"rate": 0.05, "outputs": True}}, "iris:0.1,mlp:0.05:outputs"),
        ("mlp:1:outputs,iris:0.5", "iris:0.5,mlp:1:outputs"),
        ("", ""),
    ],
)
def test_context_capture_reads_both_spellings(raw, normalized):
    assert InfraConfig.from_context({"capture": raw}.get).capture == normalized


@pytest.mark.parametrize(
    "raw", [{"iris": 0.1}, {"iris": {"rate": 2}}, {"iris": {"rate": 0.1, "path": "/x"}}, "iris", 3]
)
def test_a_bad_context_capture_names_the_key_and_the_shape(raw):
    from tierserve.tools.cdk_context import ConfigError

    with pytest.raises(
        ConfigError, match=r"cdk\.json context 'capture' is .* it must be models and sampling rates"
    ):
        InfraConfig.from_context({"capture": raw}.get)
