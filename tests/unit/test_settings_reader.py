"""The one settings reader: every environment variable, through the reader that reads it, names
the variable, the value and the fix when the value is bad; unset and empty mean the default."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from tierserve import sagemaker_hosting, settings
from tierserve.jobs import settings as jobs_settings
from tierserve.jobs.settings import JobsSettings
from tierserve.s3_pipeline import settings as pipeline_settings
from tierserve.s3_pipeline.settings import PipelineSettings
from tierserve.sagemaker_hosting import ServerSettings, server_model_settings
from tierserve.settings import ModelRef, Settings, SettingsError, Variable
from tierserve.streams import settings as stream_settings
from tierserve.streams.settings import StreamSettings

READERS: dict[str, Callable[[Mapping[str, str]], object]] = {
    **{v.name: Settings.from_env for v in settings.VARIABLES},
    **{v.name: PipelineSettings.from_env for v in pipeline_settings.VARIABLES},
    **{v.name: ServerSettings.from_env for v in sagemaker_hosting.VARIABLES},
    **{v.name: StreamSettings.from_env for v in stream_settings.VARIABLES},
    **{
        v.name: lambda env: JobsSettings.from_env({"TIERSERVE_DATA_BUCKET": "data", **env})
        for v in jobs_settings.VARIABLES
    },
}

# One bad value per variable: what a person plausibly types by mistake.
BAD_VALUES = {
    "TIERSERVE_MODEL_BUCKET": "s3://my-models",
    "TIERSERVE_MODEL_PREFIX": "models/../secrets",
    "TIERSERVE_MODEL_ROOT": "/var/models",
    "TIERSERVE_MODELS": "iris",
    "TIERSERVE_PRELOAD": "iris@1",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "2GB",
    "AWS_LAMBDA_INITIALIZATION_TYPE": "snap start",
    "TIERSERVE_MEMORY_BUDGET_MB": "0",
    "TIERSERVE_THREADS": "x",
    "TIERSERVE_CACHE_DIR": "tmp/tierserve",
    "TIERSERVE_CACHE_MAX_MB": "1.5",
    "TIERSERVE_FETCH_CONNECTIONS": "32",
    "TIERSERVE_MAX_REQUEST_MB": "-1",
    "TIERSERVE_MAX_RESPONSE_MB": "inf",
    "TIERSERVE_DATA_BUCKET": "My_Bucket",
    "TIERSERVE_GPU_ENDPOINTS": "big:big-endpoint",
    "TIERSERVE_ROW_BATCH_SIZE": "sixty-four",
    "TIERSERVE_MAX_INPUT_MB": "64MB",
    "TIERSERVE_MAX_ROWS": "-5",
    "TIERSERVE_MAX_JSONL_MB": "nan",
    "TIERSERVE_WORKER_CONCURRENCY": "1000",
    "TIERSERVE_COLD_RETRY_S": "-1",
    "SAGEMAKER_BIND_TO_PORT": "80800",
    "TIERSERVE_MODEL_DIR": "opt/ml/model",
    "TIERSERVE_MAX_BATCH_SIZE": "many",
    "TIERSERVE_MAX_QUEUE_DELAY_MS": "soon",
    "TIERSERVE_MAX_QUEUE_SIZE": "0",
    "TIERSERVE_RUN_TIMEOUT_S": "forever",
    "TIERSERVE_PROVIDERS": "tpu",
    "TIERSERVE_TRT_FP16": "perhaps",
    "TIERSERVE_TRT_CACHE_DIR": "engines",
    "TIERSERVE_IO_BINDING": "sometimes",
    "TIERSERVE_DRAIN_TIMEOUT_S": "-3",
    "TIERSERVE_OUTPUT_STREAM": "arn:aws:kinesis:us-east-1:123456789012:stream/results",
    "TIERSERVE_STREAM_MODEL": "Iris v1",
    "TIERSERVE_JOBS_URL_EXPIRES_S": "7200",
}


def every_variable() -> list[Variable]:
    return [
        *settings.VARIABLES,
        *pipeline_settings.VARIABLES,
        *sagemaker_hosting.VARIABLES,
        *stream_settings.VARIABLES,
        *jobs_settings.VARIABLES,
    ]


def test_every_variable_name_is_declared_once_and_has_a_bad_value_here():
    declared = [v.name for v in every_variable()]
    assert len(declared) == len(set(declared))
    names = {value for key, value in vars(settings).items() if key.endswith("_ENV")}
    assert names == set(declared), "a variable without a Variable, or one without a name constant"
    assert set(BAD_VALUES) == set(declared)


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_a_bad_value_names_the_variable_the_value_and_the_fix(name):
    value = BAD_VALUES[name]
    with pytest.raises(SettingsError) as raised:
        READERS[name]({name: value})
    message = str(raised.value)
    assert message.startswith(f"{name}={value!r} "), message
    assert "; set it to " in message and ", or unset it for " in message, message
    assert "\n" not in message


def test_the_threads_message_reads_as_documented():
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"TIERSERVE_THREADS": "x"})
    assert str(raised.value) == (
        "TIERSERVE_THREADS='x' is not a whole number; set it to 1 to 256, or unset it for "
        "one per 1,769 MB of memory (Lambda) or one per CPU (GPU server)"
    )


def test_the_gpu_server_reads_the_model_variables_through_the_same_reader():
    with pytest.raises(SettingsError, match=r"^TIERSERVE_THREADS='0' is under 1"):
        server_model_settings({"TIERSERVE_THREADS": "0"})
    assert server_model_settings({"TIERSERVE_THREADS": " 3 "}).threads == 3


def test_unset_and_empty_mean_the_default_and_good_values_parse():
    blank = {v.name: "  " for v in every_variable()}
    assert Settings.from_env(blank) == Settings.from_env({})
    assert PipelineSettings.from_env(blank) == PipelineSettings()
    assert ServerSettings.from_env(blank) == ServerSettings()
    parsed = Settings.from_env(
        {
            "TIERSERVE_MODEL_ROOT": "s3://my-models/prod/models",
            "TIERSERVE_MODEL_PREFIX": "/prod/models/",
            "TIERSERVE_MODELS": " iris@1 , mlp@2024-06-01 ",
            "TIERSERVE_PRELOAD": "*",
            "TIERSERVE_CACHE_DIR": "/mnt/cache",
            "TIERSERVE_MAX_REQUEST_MB": "0.5",
        }
    )
    assert parsed.model_root == "s3://my-models/prod/models" and parsed.model_prefix == "prod/models"
    assert parsed.models == (ModelRef("iris", "1"), ModelRef("mlp", "2024-06-01"))
    assert parsed.should_preload("anything") and parsed.cache_dir == Path("/mnt/cache")
    assert parsed.max_request_bytes == 512 * 1024
    assert (
        Settings.from_env({"TIERSERVE_MODEL_ROOT": "file:///srv/models"}).model_root == "file:///srv/models"
    )
    assert Settings.from_env({"TIERSERVE_MODEL_PREFIX": "/"}).model_prefix == ""  # the bucket's root
    assert ServerSettings.from_env({"TIERSERVE_TRT_FP16": "OFF"}).providers.trt_fp16 is False
    assert ServerSettings.from_env({"TIERSERVE_MAX_QUEUE_DELAY_MS": "0"}).batching.max_queue_delay_ms == 0


def test_a_bad_value_at_init_is_one_line_on_stderr_and_an_exit(capsys):
    with pytest.raises(SystemExit) as raised, settings.exit_on_bad_settings():
        Settings.from_env({"TIERSERVE_CACHE_MAX_MB": "lots"})
    assert raised.value.code == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "tierserve: TIERSERVE_CACHE_MAX_MB='lots' is not a whole number; set it to 0 or more, "
        "or unset it for the default, 1024 (0: no disk cache, sessions hold the models)"
    ]


def test_the_readme_lists_every_variable():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [v.name for v in every_variable() if f"`{v.name}`" not in readme]
    assert missing == [], "add them to the README's configuration tables"
