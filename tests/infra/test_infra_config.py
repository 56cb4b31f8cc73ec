"""InfraConfig: cdk.json context parsed, validated, and explained when wrong."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from infra.config import ConfigError, InfraConfig
from tierserve.catalog import DEFAULT_LAMBDA_MAX_MODEL_MB


def from_mapping(context: dict) -> InfraConfig:
    return InfraConfig.from_context(context.get)


def test_cdk_json_repeats_every_default(cdk_context):
    """Ops read defaults in cdk.json; code holds them too. They must not drift apart."""
    assert from_mapping({}) == InfraConfig()
    assert {key: cdk_context[key] for key in InfraConfig().to_context()} == InfraConfig().to_context()


def test_documented_defaults():
    config = InfraConfig()
    assert config.catalog == "catalog.json"
    assert config.lambda_max_model_mb == DEFAULT_LAMBDA_MAX_MODEL_MB == 512
    assert config.auth == "iam"
    assert (config.throttle_rate_limit, config.throttle_burst_limit) == (50, 100)
    assert config.lambda_timeout_seconds == 29
    assert config.lambda_ephemeral_storage_mb == 2048
    assert config.log_retention_days == 30
    assert config.preload is True


def test_command_line_strings_are_parsed():
    """`cdk synth -c key=value` passes strings."""
    config = from_mapping(
        {
            "lambda_max_model_mb": "1024",
            "throttle_rate_limit": "12.5",
            "preload": "false",
            "auth": "api_key",
            "log_level": "debug",
            "log_retention_days": "90",
        }
    )
    assert config.lambda_max_model_mb == 1024
    assert config.throttle_rate_limit == 12.5
    assert config.preload is False
    assert config.auth == "api_key"
    assert config.log_level == "DEBUG"
    assert config.log_retention_days == 90


def test_bad_auth_names_the_key_the_value_and_the_choices():
    with pytest.raises(ConfigError) as raised:
        from_mapping({"auth": "oauth"})
    message = str(raised.value)
    assert "'auth'" in message and "'oauth'" in message
    assert "'iam'" in message and "'api_key'" in message and "'none'" in message
    assert "-c auth=iam" in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lambda_max_model_mb", "big"),
        ("lambda_max_model_mb", 0),
        ("lambda_max_model_mb", True),
        ("throttle_burst_limit", 1.5),
        ("lambda_timeout_seconds", 901),
        ("lambda_ephemeral_storage_mb", 256),
        ("log_retention_days", 31),
        ("preload", "maybe"),
        ("lambda_architecture", "riscv"),
        ("catalog", ""),
        ("gpu_instance_type", "g5.xlarge"),
        ("gpu_instance_type", "ml.g5"),
        ("gpu_instance_types", "big-llm"),
        ("gpu_instance_types", "big-llm=g5.xlarge"),
        ("gpu_instance_types", {"Big": "ml.g5.xlarge"}),
        ("gpu_instance_types", "a=ml.g5.xlarge,a=ml.g6.xlarge"),
        ("gpu_instance_types", ["ml.g5.xlarge"]),
        ("gpu_initial_instance_count", 0),
        ("gpu_min_instances", -1),
        ("gpu_max_instances", 101),
        ("gpu_routing_strategy", "ROUND_ROBIN"),
        ("gpu_initial_copies", 0),
        ("gpu_min_copies", -1),
        ("gpu_max_copies", 0),
        ("gpu_invocations_per_copy", 0),
        ("gpu_scale_out_cooldown_seconds", -1),
        ("gpu_scale_in_cooldown_seconds", 3601),
        ("gpu_scale_in_idle_minutes", 16),
        ("gpu_scale_in_idle_minutes", 0),
        ("gpu_memory_headroom", 0.5),
        ("gpu_base_memory_mb", -1),
        ("gpu_cpu_cores_per_copy", 0),
        ("gpu_startup_timeout_seconds", 3601),
        ("gpu_cold_start_minutes", 0),
        ("gpu_retry_after_seconds", 0),
        ("gpu_max_batch_size", 0),
        ("gpu_max_queue_delay_ms", -1),
        ("pipeline_worker_timeout_seconds", 901),
        ("pipeline_max_receive_count", 0),
        ("pipeline_batch_size", 10_001),
        ("pipeline_batching_window_seconds", 301),
        ("pipeline_reserved_concurrency", -1),
        ("alarm_email", "ops"),
        ("alarm_email", True),
        ("snapstart", "iris,Not-Valid!"),
        ("snapstart", ["Not A Name"]),
        ("snapstart", 3),
        ("provisioned_concurrency", "iris"),
        ("provisioned_concurrency", {"iris": 0}),
        ("provisioned_concurrency", {"iris": "two"}),
        ("provisioned_concurrency", ["iris"]),
        ("lambda_disk_cache", "sometimes"),
        ("fetch_connections", 0),
        ("fetch_connections", 17),
        ("s3_mb_per_s_per_connection", 0),
    ],
)
def test_every_bad_value_is_an_error_naming_its_key(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        from_mapping({key: value})


def test_catalog_path_is_relative_to_the_app_not_the_working_directory(tmp_path):
    assert InfraConfig().catalog_path(Path("/repo")) == Path("/repo/catalog.json")
    absolute = tmp_path / "elsewhere.json"
    assert InfraConfig(catalog=str(absolute)).catalog_path(Path("/repo")) == absolute


def test_cdk_json_runs_the_python_app():
    cdk_json = json.loads((Path(__file__).resolve().parents[2] / "cdk.json").read_text())
    assert cdk_json["app"] == "python3 app.py"


def test_every_accepted_retention_maps_to_a_cdk_value():
    from infra.cdk_values import RETENTION
    from infra.config import LOG_RETENTION_DAYS

    assert set(RETENTION) == set(LOG_RETENTION_DAYS)


def test_gpu_and_pipeline_defaults():
    config = InfraConfig()
    assert config.gpu_instance_type == "ml.g5.xlarge" == config.gpu_instance_type_of("any-model")
    assert (config.gpu_initial_instance_count, config.gpu_min_instances, config.gpu_max_instances) == (
        1,
        0,
        4,
    )
    assert (config.gpu_initial_copies, config.gpu_min_copies, config.gpu_max_copies) == (1, 0, 4)
    assert config.gpu_invocations_per_copy == 200
    assert config.gpu_routing_strategy == "LEAST_OUTSTANDING_REQUESTS"
    assert (config.gpu_scale_out_cooldown_seconds, config.gpu_scale_in_cooldown_seconds) == (60, 300)
    assert config.gpu_scale_in_idle_minutes == 10
    assert (config.gpu_memory_headroom, config.gpu_base_memory_mb, config.gpu_cpu_cores_per_copy) == (
        1.5,
        1024,
        1,
    )
    assert config.gpu_startup_timeout_seconds == 900
    assert (config.gpu_cold_start_minutes, config.gpu_retry_after_seconds) == (10, 60)
    assert (config.pipeline_max_receive_count, config.pipeline_worker_timeout_seconds) == (5, 120)
    assert (config.pipeline_batch_size, config.pipeline_batching_window_seconds) == (10, 5)
    assert config.pipeline_reserved_concurrency == 0 and config.alarm_email == ""


def test_gpu_and_pipeline_values_from_the_command_line():
    config = from_mapping(
        {
            "gpu_instance_type": " ml.g6.2xlarge ",
            "gpu_max_instances": "8",
            "gpu_min_instances": "1",
            "gpu_invocations_per_copy": "75.5",
            "gpu_routing_strategy": "random",
            "gpu_max_copies": "2",
            "gpu_max_queue_delay_ms": "0",
            "pipeline_batch_size": "500",
            "pipeline_batching_window_seconds": "20",
            "pipeline_reserved_concurrency": "50",
            "alarm_email": "ops@example.com",
        }
    )
    assert config.gpu_instance_type == "ml.g6.2xlarge"
    assert (config.gpu_min_instances, config.gpu_max_instances) == (1, 8)
    assert config.gpu_invocations_per_copy == 75.5
    assert config.gpu_routing_strategy == "RANDOM"
    assert config.gpu_max_copies == 2
    assert config.gpu_max_queue_delay_ms == 0
    assert (config.pipeline_batch_size, config.pipeline_batching_window_seconds) == (500, 20)
    assert config.pipeline_reserved_concurrency == 50
    assert config.alarm_email == "ops@example.com"


@pytest.mark.parametrize(
    ("context", "names"),
    [
        ({"gpu_min_instances": 3, "gpu_max_instances": 2}, ("'gpu_min_instances'", "'gpu_max_instances'")),
        ({"gpu_initial_instance_count": 5}, ("'gpu_initial_instance_count'", "'gpu_max_instances'")),
        (
            {"gpu_min_instances": 2, "gpu_initial_instance_count": 1},
            ("'gpu_initial_instance_count'", "'gpu_min_instances'"),
        ),
        ({"gpu_min_copies": 5, "gpu_max_copies": 4}, ("'gpu_min_copies'", "'gpu_max_copies'")),
        ({"gpu_initial_copies": 5}, ("'gpu_initial_copies'", "'gpu_max_copies'")),
        ({"gpu_min_copies": 2}, ("'gpu_initial_copies'", "'gpu_min_copies'")),
        (
            {"pipeline_batch_size": 11, "pipeline_batching_window_seconds": 0},
            ("'pipeline_batch_size'", "'pipeline_batching_window_seconds'"),
        ),
    ],
)
def test_keys_that_must_agree_are_checked_together(context, names):
    with pytest.raises(ConfigError) as raised:
        from_mapping(context)
    assert all(name in str(raised.value) for name in names)


def test_per_model_instance_types_from_cdk_json_or_the_command_line():
    from_json = from_mapping({"gpu_instance_types": {"zeta": "ml.g6.xlarge", "alpha": " ml.g5.2xlarge "}})
    from_cli = from_mapping({"gpu_instance_types": "zeta=ml.g6.xlarge, alpha=ml.g5.2xlarge"})
    assert from_json == from_cli
    assert from_cli.gpu_instance_types == "alpha=ml.g5.2xlarge,zeta=ml.g6.xlarge"
    assert from_cli.gpu_instance_type_of("zeta") == "ml.g6.xlarge"
    assert from_cli.gpu_instance_type_of("other") == "ml.g5.xlarge"


def test_a_removed_key_says_what_replaced_it():
    with pytest.raises(ConfigError) as raised:
        from_mapping({"gpu_invocations_per_instance": 200})
    message = str(raised.value)
    assert "'gpu_invocations_per_instance' was removed" in message and "'gpu_invocations_per_copy'" in message


def test_an_empty_alarm_email_is_the_example_in_the_message():
    with pytest.raises(ConfigError, match='-c alarm_email=""'):
        from_mapping({"alarm_email": "not-an-address"})


# ---------------------------------------------------------------- one reader for synth and the tools

BAD_CONTEXT = [
    ("lambda_max_model_mb", "big"),
    ("lambda_max_model_mb", 0.001),
    ("catalog", ""),
    ("auth", "oauth"),
    ("gpu_max_batch_size", 0),
]


@pytest.fixture(scope="module")
def app_main(repo_root):
    return runpy.run_path(str(repo_root / "app.py"), run_name="tierserve_app")["main"]


def project_with(tmp_path: Path, context: dict) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    (project / "cdk.json").write_text(json.dumps({"app": "python3 app.py", "context": context}))
    return project


@pytest.mark.parametrize(("key", "value"), BAD_CONTEXT)
def test_synth_tierserve_local_and_catalog_list_refuse_a_bad_value_alike(
    app_main, make_app, tmp_path, capsys, monkeypatch, key, value
):
    from tierserve.tools import cli
    from tierserve.tools.local import stack

    with pytest.raises(ConfigError) as expected:
        from_mapping({key: value})
    message = str(expected.value)

    with pytest.raises(SystemExit) as synth:
        app_main(make_app(**{key: value}))
    assert message in str(synth.value.code)

    project = project_with(tmp_path, {key: value})
    monkeypatch.setattr(stack, "CDK_JSON", project / "cdk.json")
    assert cli.main(["local", "--work-dir", str(tmp_path / "work")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "work").exists()  # refused before anything was built

    monkeypatch.chdir(project)
    assert cli.main(["catalog", "list"]) == 1
    assert message in capsys.readouterr().err


def test_the_tools_read_the_catalog_and_threshold_synth_reads(tmp_path, monkeypatch):
    from tierserve.tools.local import stack
    from tierserve.tools.packaging import project_config

    project = project_with(tmp_path, {"catalog": "deploy/models.json", "lambda_max_model_mb": "64"})
    (project / "deploy").mkdir()
    config = project_config(start=project / "deploy")
    assert (config.catalog_path, config.lambda_max_model_mb) == (project / "deploy" / "models.json", 64)
    assert stack.lambda_max_model_mb(project / "cdk.json") == 64
    assert stack.lambda_max_model_mb(tmp_path / "absent.json") == InfraConfig().lambda_max_model_mb


@pytest.mark.parametrize("text", ["{not json", '{"context": ["a"]}', "[]"])
def test_a_cdk_json_that_is_no_json_object_is_refused_with_its_path(tmp_path, text):
    path = tmp_path / "cdk.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{path}.*fix it"):
        InfraConfig.from_cdk_json(path)


def test_cold_start_keys_from_cdk_json_and_from_the_command_line():
    config = InfraConfig()
    assert config.snapstart is True and config.provisioned_concurrency == ()
    assert config.snapstart_for("iris") and config.provisioned_concurrency_for("iris") == 0
    assert config.lambda_disk_cache is True
    assert config.cold_start_mb_per_s == 8 * 90
    listed = from_mapping({"snapstart": ["iris", "mlp"], "provisioned_concurrency": {"resnet-50": 2}})
    assert listed.snapstart_for("iris") and not listed.snapstart_for("resnet-50")
    assert listed.provisioned_concurrency_for("resnet-50") == 2
    typed = from_mapping(
        {"snapstart": "iris,mlp", "provisioned_concurrency": "resnet-50=2, big=1", "fetch_connections": "4"}
    )
    assert typed.snapstart == ("iris", "mlp")
    assert typed.provisioned_concurrency == (("resnet-50", 2), ("big", 1))
    assert typed.fetch_connections == 4
    assert from_mapping({"snapstart": "false"}).snapstart is False
    assert from_mapping({"provisioned_concurrency": '{"iris": 3}'}).provisioned_concurrency_for("iris") == 3
    assert listed.to_context()["snapstart"] == ["iris", "mlp"]
    assert listed.to_context()["provisioned_concurrency"] == {"resnet-50": 2}


def test_the_readme_lists_every_context_key(repo_root):
    from dataclasses import fields

    readme = (repo_root / "README.md").read_text()
    missing = [f.name for f in fields(InfraConfig) if f"`{f.name}`" not in readme]
    assert missing == [], "add them to the README's context table"
