"""``cdk.json`` context, validated once into a typed object: the one reader of it for the CDK
app (``infra.config`` re-exports this module), ``tierserve local`` and the packaging tools
(``tierserve package | upload | catalog``), so the three refuse a bad value the same way.

Config flows one way: ``cdk.json`` context -> :meth:`InfraConfig.from_context` (here) ->
construct parameters -> function environment. Every key is snake_case and its default lives
in :class:`InfraConfig`; ``cdk.json`` repeats the defaults so ops see and edit them in one
place (a test keeps the two equal). Values given as ``cdk synth -c key=value`` arrive as
strings, so numbers and booleans are parsed from text too. The tools read the file
(:meth:`InfraConfig.from_cdk_json`, found by :func:`find_cdk_json`).

Pure Python (no ``aws_cdk``), so the tools import it without the CDK. A later issue adds a
setting by adding a field with its default, a parser in ``_PARSERS`` and the key in
``cdk.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from tierserve.catalog import DEFAULT_LAMBDA_MAX_MODEL_MB, LAMBDA_MAX_MEMORY_MB
from tierserve.catalog import NAME_PATTERN as MODEL_NAME_PATTERN
from tierserve.settings import (
    DEFAULT_FETCH_CONNECTIONS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE_DELAY_MS,
    MAX_FETCH_CONNECTIONS,
)

AuthMode = Literal["iam", "api_key", "none"]
Architecture = Literal["x86_64", "arm64"]

AUTH_MODES: tuple[str, ...] = ("iam", "api_key", "none")
ARCHITECTURES: tuple[str, ...] = ("x86_64", "arm64")
LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The only retention periods CloudWatch Logs accepts.
LOG_RETENTION_DAYS: tuple[int, ...] = (
    1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653,
)  # fmt: skip
API_GATEWAY_TIMEOUT_SECONDS = 29
LAMBDA_MAX_TIMEOUT_SECONDS = 900
LAMBDA_MIN_EPHEMERAL_MB = 512
LAMBDA_MAX_EPHEMERAL_MB = 10240
# SageMaker hosting instance types look like ml.<family>.<size>, e.g. ml.g5.xlarge.
INSTANCE_TYPE_PATTERN = re.compile(r"^ml\.[a-z0-9-]+\.[a-z0-9-]+$")
GPU_MAX_INSTANCES = 100
GPU_MAX_COPIES = 100
# SageMaker's longest ContainerStartupHealthCheckTimeoutInSeconds.
GPU_MAX_STARTUP_SECONDS = 3600
# Application Auto Scaling's own target-tracking scale-in needs about this many idle minutes
# (its low alarm: 15 one-minute datapoints under the target) and then scales in by itself, so
# an idle period longer than this would never be the one that acts.
GPU_MAX_IDLE_MINUTES = 15
GPU_ROUTING_STRATEGIES: tuple[str, ...] = ("LEAST_OUTSTANDING_REQUESTS", "RANDOM")
# Keys of the per-model GPU endpoints (before inference components), and what replaced them.
REMOVED_KEYS: dict[str, str] = {
    "gpu_invocations_per_instance": (
        "GPU-tier models now scale per model copy on shared endpoints: set 'gpu_invocations_per_copy' "
        "(target invocations per copy per minute) instead"
    ),
}
# SQS: a batch larger than 10 needs a batching window.
SQS_MAX_BATCH_WITHOUT_WINDOW = 10
SQS_MAX_BATCH_SIZE = 10_000
SQS_MAX_BATCHING_WINDOW_SECONDS = 300
LAMBDA_MAX_RESERVED_CONCURRENCY = 1_000
# Step Functions: a Distributed Map runs at most 10,000 child executions at once.
DISTRIBUTED_MAP_MAX_CONCURRENCY = 10_000
BATCH_MAX_ITEMS_PER_BATCH = 10_000
# Kinesis: an event source mapping's batch is at most 10,000 records, its retries at most 10,000.
KINESIS_MAX_BATCH_SIZE = 10_000
KINESIS_MAX_RETRY_ATTEMPTS = 10_000
KINESIS_MAX_SHARDS = 500  # a new account's default shard quota per region
EMAIL_PATTERN = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
# One S3 connection from a Lambda function moves about this many MB/s.
DEFAULT_S3_MB_PER_S_PER_CONNECTION = 90.0
# Lambda's account default for concurrent executions: provisioned concurrency cannot exceed it.
LAMBDA_MAX_PROVISIONED_CONCURRENCY = 1_000
CDK_JSON = "cdk.json"
# Operating it (infra/waf.py, infra/monitoring.py, infra/rollout.py).
WAF_MIN_RATE_LIMIT = 10  # WAF's bounds for a rate-based rule (requests per 5 minutes)
WAF_MAX_RATE_LIMIT = 2_000_000_000
QUOTA_PERIODS: tuple[str, ...] = ("DAY", "WEEK", "MONTH")
# How a new default version reaches traffic: CodeDeploy's predefined Lambda configs, by name
# (infra/rollout.py maps each to the Lambda config and the GPU tier's rolling update).
ROLLOUT_STRATEGIES: tuple[str, ...] = (
    "canary10_5min", "canary10_10min", "canary10_15min", "canary10_30min",
    "linear10_1min", "linear10_2min", "linear10_3min", "linear10_10min",
    "all_at_once",
)  # fmt: skip
MAX_LATENCY_BUDGET_MS = 900_000


class ConfigError(ValueError):
    """A context value the app cannot use; the message names the key and how to fix it."""


@dataclass(frozen=True)
class InfraConfig:
    """Every ``cdk.json`` context key the app reads, typed and validated.

    Build it with :meth:`from_context`; construct it directly in tests.
    """

    catalog: str = "catalog.json"
    lambda_max_model_mb: int = DEFAULT_LAMBDA_MAX_MODEL_MB
    auth: AuthMode = "iam"
    throttle_rate_limit: float = 50
    throttle_burst_limit: int = 100
    lambda_timeout_seconds: int = API_GATEWAY_TIMEOUT_SECONDS
    lambda_ephemeral_storage_mb: int = 2048
    lambda_architecture: Architecture = "x86_64"
    log_retention_days: int = 30
    log_level: str = "INFO"
    preload: bool = True
    api_cloudwatch_role: bool = True
    # Cold starts (infra/lambda_tier.py): SnapStart for every Lambda-tier model (true), none
    # (false), or the models named; provisioned concurrency per model instead (name -> count).
    snapstart: bool | tuple[str, ...] = True
    provisioned_concurrency: tuple[tuple[str, int], ...] = ()
    lambda_disk_cache: bool = True
    fetch_connections: int = DEFAULT_FETCH_CONNECTIONS
    s3_mb_per_s_per_connection: float = DEFAULT_S3_MB_PER_S_PER_CONNECTION
    # GPU tier (infra/sagemaker_inference.py): one SageMaker endpoint per instance type, every
    # GPU-tier model on it as an inference component that scales to zero copies.
    gpu_instance_type: str = "ml.g5.xlarge"
    gpu_instance_types: str = ""  # per-model instance types, "model=ml.type,..." ("" none)
    gpu_initial_instance_count: int = 1
    gpu_min_instances: int = 0
    gpu_max_instances: int = 4
    gpu_routing_strategy: str = "LEAST_OUTSTANDING_REQUESTS"
    gpu_initial_copies: int = 1
    gpu_min_copies: int = 0
    gpu_max_copies: int = 4
    gpu_invocations_per_copy: float = 200
    gpu_scale_out_cooldown_seconds: int = 60
    gpu_scale_in_cooldown_seconds: int = 300
    gpu_scale_in_idle_minutes: int = 10
    gpu_memory_headroom: float = 1.5
    gpu_base_memory_mb: int = 1024
    gpu_cpu_cores_per_copy: float = 1
    gpu_startup_timeout_seconds: int = 900
    gpu_cold_start_minutes: int = 10
    gpu_retry_after_seconds: int = 60
    gpu_max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    gpu_max_queue_delay_ms: float = DEFAULT_MAX_QUEUE_DELAY_MS
    # S3-triggered pipeline (infra/s3_pipeline.py).
    pipeline_worker_timeout_seconds: int = 120
    pipeline_max_receive_count: int = 5
    pipeline_batch_size: int = 10
    pipeline_batching_window_seconds: int = 5
    pipeline_reserved_concurrency: int = 0
    alarm_email: str = ""
    # Async jobs (infra/jobs.py): kept under jobs/ of the data bucket this many days; presigned
    # URLs live this long; the largest .json/.bin/.npy input of a job and of the S3 pipeline.
    jobs_expiry_days: int = 3
    jobs_url_expiry_seconds: int = 900
    max_input_mb: int = 64
    # Bulk inference (infra/batch.py): the Distributed Map over an S3 prefix or manifest.
    batch_items_per_batch: int = 100
    batch_max_concurrency: int = 100
    batch_tolerated_failure_percentage: float = 0
    batch_function_timeout_seconds: int = 600
    # Streams (infra/streams.py): a Kinesis stream served by one model of the catalog, "" for none.
    stream: str = ""
    stream_shards: int = 1
    stream_batch_size: int = 100
    stream_max_retry_attempts: int = 3
    # Drift (infra/drift.py): request capture per model, "model:rate[:outputs],..." ("" none).
    capture: str = ""
    capture_retention_days: int = 30
    drift_window_hours: int = 24
    drift_psi_threshold: float = 0.25
    drift_min_rows: int = 100
    # Keeping abusers out (infra/waf.py, infra/api.py): a WAF web ACL on the stage, and with
    # auth=api_key per-key throttles and a quota in the usage plan (quota 0: none).
    waf: bool = True
    waf_rate_limit: int = 2000
    api_key_rate_limit: float = 10
    api_key_burst_limit: int = 20
    api_key_quota: int = 100_000
    api_key_quota_period: str = "DAY"
    # Seeing it (infra/monitoring.py): alarm thresholds; the per-model latency budget (p99, ms).
    error_rate_percent: float = 5
    latency_budget_ms: tuple[tuple[str, float], ...] = ()
    latency_budget_default_ms: float = 1000
    # Rolling out (infra/rollout.py): how a new default version takes traffic, per model too.
    rollout: str = "canary10_5min"
    rollout_overrides: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        """Checks that involve more than one key (each key alone is checked by its parser)."""
        self._check_range("instances", self.gpu_min_instances, self.gpu_max_instances)
        self._check_initial(
            "gpu_initial_instance_count",
            self.gpu_initial_instance_count,
            "instances",
            "managed instance scaling",
        )
        self._check_range("copies", self.gpu_min_copies, self.gpu_max_copies)
        self._check_initial("gpu_initial_copies", self.gpu_initial_copies, "copies", "copy autoscaling")
        if (
            self.pipeline_batch_size > SQS_MAX_BATCH_WITHOUT_WINDOW
            and self.pipeline_batching_window_seconds < 1
        ):
            raise ConfigError(
                f"cdk.json context 'pipeline_batch_size' ({self.pipeline_batch_size}) is over "
                f"{SQS_MAX_BATCH_WITHOUT_WINDOW}, which SQS allows only with a batching window: set "
                "'pipeline_batching_window_seconds' to 1 or more, or the batch size to 10 or less"
            )

    def _check_range(self, what: str, low: int, high: int) -> None:
        if low > high:
            raise ConfigError(
                f"cdk.json context 'gpu_min_{what}' ({low}) is over 'gpu_max_{what}' ({high}); "
                "raise the maximum or lower the minimum"
            )

    def _check_initial(self, key: str, value: int, what: str, scaler: str) -> None:
        low, high = getattr(self, f"gpu_min_{what}"), getattr(self, f"gpu_max_{what}")
        if not max(1, low) <= value <= high:
            raise ConfigError(
                f"cdk.json context '{key}' ({value}) must be from 'gpu_min_{what}' ({low}, and at least 1: "
                f"SageMaker creates nothing with 0) to 'gpu_max_{what}' ({high}), or {scaler} would change "
                "it right after deployment"
            )

    def gpu_instance_type_of(self, model: str) -> str:
        """The instance type ``model`` runs on: its entry in ``gpu_instance_types``, else
        ``gpu_instance_type``."""
        return gpu_instance_overrides(self.gpu_instance_types).get(model, self.gpu_instance_type)

    @classmethod
    def from_context(cls, get: Callable[[str], Any]) -> InfraConfig:
        """Read and validate every key through ``get`` (``app.node.try_get_context``).

        A key that ``get`` returns None for keeps its default. Raises :class:`ConfigError`
        naming the first bad key, its value and the accepted values, or a key that was removed
        and what replaced it.
        """
        for key, replacement in REMOVED_KEYS.items():
            if get(key) is not None:
                raise ConfigError(f"cdk.json context {key!r} was removed: {replacement}; delete {key!r}")
        values: dict[str, Any] = {}
        for field in fields(cls):
            raw = get(field.name)
            if raw is not None:
                values[field.name] = _PARSERS[field.name](field.name, raw)
        return cls(**values)

    @classmethod
    def from_cdk_json(cls, path: Path) -> InfraConfig:
        """Read and validate the ``context`` of the ``cdk.json`` at ``path`` (what the tools do;
        the CDK app gets the same context from the CLI). No file: the defaults.

        Raises:
            ConfigError: the file is not JSON, its context is not an object, or a key is bad
                (the same message as ``cdk synth``).
        """
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, RecursionError) as error:
            reason = getattr(error, "strerror", None) or str(error).splitlines()[0][:200]
            raise ConfigError(f"{path} cannot be read as JSON ({reason}): fix it") from None
        context = document.get("context", {}) if isinstance(document, dict) else None
        if not isinstance(context, dict):
            raise ConfigError(f'{path} must be a JSON object whose "context" is an object: fix it')
        try:
            return cls.from_context(context.get)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None

    @property
    def cold_start_mb_per_s(self) -> float:
        """The S3 bandwidth a cold start reads a model at: every connection at its rate."""
        return self.fetch_connections * self.s3_mb_per_s_per_connection

    def snapstart_for(self, model: str) -> bool:
        """Whether the function of Lambda-tier ``model`` gets SnapStart (context ``snapstart``)."""
        return self.snapstart if isinstance(self.snapstart, bool) else model in self.snapstart

    def provisioned_concurrency_for(self, model: str) -> int:
        """Provisioned concurrency of ``model``'s alias (context ``provisioned_concurrency``), 0: none."""
        return dict(self.provisioned_concurrency).get(model, 0)

    def latency_budget_for(self, model: str) -> float:
        """The p99 latency (ms) over which ``model``'s latency alarm goes off."""
        return dict(self.latency_budget_ms).get(model, self.latency_budget_default_ms)

    def rollout_for(self, model: str) -> str:
        """How a new default version of ``model`` takes traffic (a :data:`ROLLOUT_STRATEGIES` name)."""
        return dict(self.rollout_overrides).get(model, self.rollout)

    def catalog_path(self, root: Path) -> Path:
        """The catalog file: ``catalog`` as given when absolute, else relative to ``root``."""
        path = Path(self.catalog)
        return path if path.is_absolute() else root / path

    def to_context(self) -> dict[str, Any]:
        """The context keys and values this config stands for (the inverse of :meth:`from_context`),
        as JSON writes them (lists and objects for the per-model keys)."""
        context = {field.name: getattr(self, field.name) for field in fields(self)}
        if not isinstance(self.snapstart, bool):
            context["snapstart"] = list(self.snapstart)
        context["provisioned_concurrency"] = dict(self.provisioned_concurrency)
        context["latency_budget_ms"] = dict(self.latency_budget_ms)
        context["rollout_overrides"] = dict(self.rollout_overrides)
        return context


def find_cdk_json(start: Path) -> Path | None:
    """The ``cdk.json`` in ``start`` or the nearest folder above it (as git finds ``.git``)."""
    for folder in (start.resolve(), *start.resolve().parents):
        candidate = folder / CDK_JSON
        if candidate.is_file():
            return candidate
    return None


def _problem(key: str, raw: Any, wanted: str) -> ConfigError:
    default = _DEFAULTS[key]
    example = str(default).lower() if isinstance(default, bool) else '""' if default in ("", ()) else default
    return ConfigError(
        f"cdk.json context {key!r} is {raw!r}; it must be {wanted}. "
        f"Fix it in cdk.json or on the command line, e.g. `cdk synth -c {key}={example}` (the default)"
    )


def _number(key: str, raw: Any, low: float, high: float, *, integer: bool) -> Any:
    kind = "a whole number" if integer else "a number"
    try:
        if isinstance(raw, bool):
            raise ValueError(raw)
        value = float(raw)
        if integer and not value.is_integer():
            raise ValueError(raw)
    except (TypeError, ValueError):
        raise _problem(key, raw, f"{kind} from {low:g} to {high:g}") from None
    if not low <= value <= high:
        raise _problem(key, raw, f"{kind} from {low:g} to {high:g}")
    return int(value) if integer else value


def _integer(low: float, high: float) -> Callable[[str, Any], int]:
    return lambda key, raw: _number(key, raw, low, high, integer=True)


def _real(low: float, high: float) -> Callable[[str, Any], float]:
    return lambda key, raw: _number(key, raw, low, high, integer=False)


def _choice(choices: tuple[str, ...], *, upper: bool = False) -> Callable[[str, Any], str]:
    def parse(key: str, raw: Any) -> str:
        value = str(raw).strip()
        value = value.upper() if upper else value
        if value not in choices:
            raise _problem(key, raw, "one of " + ", ".join(repr(c) for c in choices))
        return value

    return parse


def _boolean(key: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in {"true", "1", "yes"}:
        return True
    if text in {"false", "0", "no"}:
        return False
    raise _problem(key, raw, "true or false")


def _retention(key: str, raw: Any) -> int:
    days = _number(key, raw, 1, max(LOG_RETENTION_DAYS), integer=True)
    if days not in LOG_RETENTION_DAYS:
        allowed = ", ".join(str(d) for d in LOG_RETENTION_DAYS)
        raise _problem(key, raw, f"a retention CloudWatch Logs accepts ({allowed})")
    return days


def _model_names(key: str, raw: Any) -> bool | tuple[str, ...]:
    """true, false, or model names: a JSON list, or text (``-c``) as true/false or ``a,b``."""
    wanted = "true, false, or a list of model names (JSON list, or names joined by commas)"
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        text = raw.strip()
        if text.lower() in {"true", "false", "1", "0", "yes", "no"}:
            return _boolean(key, text)
        raw = (
            _json_text(key, text, wanted)
            if text.startswith("[")
            else [p.strip() for p in text.split(",") if p.strip()]
        )
    if not isinstance(raw, list) or not all(isinstance(n, str) and MODEL_NAME_PATTERN.match(n) for n in raw):
        raise _problem(key, raw, wanted)
    return tuple(dict.fromkeys(raw))


def _json_text(key: str, text: str, wanted: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise _problem(key, text, wanted) from None


def _text(key: str, raw: Any) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise _problem(key, raw, "a non-empty path to the catalog JSON file")
    return raw.strip()


def _instance_type(key: str, raw: Any) -> str:
    value = str(raw).strip()
    if isinstance(raw, bool) or not INSTANCE_TYPE_PATTERN.match(value):
        raise _problem(key, raw, "a SageMaker hosting instance type such as ml.g5.xlarge or ml.g6.2xlarge")
    return value


def gpu_instance_overrides(text: str) -> dict[str, str]:
    """``gpu_instance_types`` as a mapping, model name -> instance type (the value is
    already validated: :func:`_instance_types` wrote it)."""
    pairs = (part.split("=", 1) for part in text.split(",") if part)
    return {name: instance_type for name, instance_type in pairs}


def _instance_types(key: str, raw: Any) -> str:
    """``{"big-llm": "ml.g6.xlarge"}`` (cdk.json) or ``big-llm=ml.g6.xlarge,...`` (``-c``), as
    the normalized text ``big-llm=ml.g6.xlarge,...`` sorted by model."""
    wanted = (
        'model names and instance types, {"big-llm": "ml.g6.xlarge"} in cdk.json or '
        "big-llm=ml.g6.xlarge,other=ml.g5.2xlarge on the command line"
    )
    if isinstance(raw, dict):
        pairs = list(raw.items())
    elif isinstance(raw, str):
        parts = [part.strip() for part in raw.split(",") if part.strip()]
        pairs = [tuple(s.strip() for s in part.partition("=")[::2]) for part in parts]
        if any("=" not in part for part in parts):
            raise _problem(key, raw, wanted)
    else:
        raise _problem(key, raw, wanted)
    overrides: dict[str, str] = {}
    for name, instance_type in pairs:
        if not isinstance(name, str) or not MODEL_NAME_PATTERN.match(name) or name in overrides:
            raise _problem(key, raw, wanted + " (each model once)")
        overrides[name] = _instance_type(key, instance_type)
    return ",".join(f"{name}={overrides[name]}" for name in sorted(overrides))


def _email(key: str, raw: Any) -> str:
    value = "" if raw is None else str(raw).strip()
    if isinstance(raw, bool) or (value and not EMAIL_PATTERN.match(value)):
        raise _problem(key, raw, 'an e-mail address for alarm notifications, or "" for none')
    return value


def _model_or_none(key: str, raw: Any) -> str:
    value = "" if raw is None else str(raw).strip()
    if isinstance(raw, bool) or (value and not MODEL_NAME_PATTERN.match(value)):
        raise _problem(
            key, raw, 'the name of a catalog model whose records the stream carries, or "" for no stream'
        )
    return value


def _capture(key: str, raw: Any) -> str:
    """``{"iris": {"rate": 0.1, "outputs": false}}`` (cdk.json) or ``iris:0.1,mlp:0.05:outputs``
    (``-c``), as the normalized text the functions read (``TIERSERVE_CAPTURE``)."""
    from tierserve.capture import CaptureRule, join_rules, parse_rules

    wanted = (
        'models and sampling rates, {"iris": {"rate": 0.1, "outputs": false}} in cdk.json or '
        "iris:0.1,mlp:0.05:outputs on the command line (rates from 0 to 1, each model once)"
    )
    if isinstance(raw, dict):
        rules = {}
        for name, rule in raw.items():
            if not isinstance(rule, dict) or set(rule) - {"rate", "outputs"} or "rate" not in rule:
                raise _problem(key, raw, wanted)
            rate, outputs = rule["rate"], rule.get("outputs", False)
            if isinstance(rate, bool) or not isinstance(rate, int | float) or not isinstance(outputs, bool):
                raise _problem(key, raw, wanted)
            rules[name] = CaptureRule(float(rate), outputs)
        text = join_rules(rules)
    elif isinstance(raw, str):
        text = raw
    else:
        raise _problem(key, raw, wanted)
    try:
        return join_rules(parse_rules(text))
    except ValueError:
        raise _problem(key, raw, wanted) from None


def _per_model(
    parse_value: Callable[[str, Any], Any], example: str, cli_example: str
) -> Callable[[str, Any], tuple[tuple[str, Any], ...]]:
    """``{"model": value}`` (a JSON object, or text ``a=x,b=y`` from ``-c``), each value read by
    ``parse_value``; an empty object or text is none."""

    def parse(key: str, raw: Any) -> tuple[tuple[str, Any], ...]:
        wanted = f"an object of model names and values, e.g. {example} (on the command line: {cli_example})"
        if isinstance(raw, str):
            text = raw.strip()
            if text.startswith("{"):
                raw = _json_text(key, text, wanted)
            else:
                pairs = [p.partition("=") for p in text.split(",") if p.strip()]
                if any(not sep for _, sep, _ in pairs):
                    raise _problem(key, raw, wanted)
                raw = {name.strip(): value.strip() for name, _, value in pairs}
        if not isinstance(raw, dict):
            raise _problem(key, raw, wanted)
        values = []
        for name, value in raw.items():
            if not isinstance(name, str) or not MODEL_NAME_PATTERN.match(name):
                raise _problem(key, raw, wanted)
            try:
                values.append((name, parse_value(key, value)))
            except ConfigError as error:  # says what the value must be
                raise ConfigError(f"model {name!r} in {error}") from None
        return tuple(values)

    return parse


_DEFAULTS: dict[str, Any] = {field.name: field.default for field in fields(InfraConfig)}
_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "catalog": _text,
    "lambda_max_model_mb": _integer(1, LAMBDA_MAX_MEMORY_MB),
    "auth": _choice(AUTH_MODES),
    "throttle_rate_limit": _real(1, 10_000),
    "throttle_burst_limit": _integer(1, 5_000),
    "lambda_timeout_seconds": _integer(1, LAMBDA_MAX_TIMEOUT_SECONDS),
    "lambda_ephemeral_storage_mb": _integer(LAMBDA_MIN_EPHEMERAL_MB, LAMBDA_MAX_EPHEMERAL_MB),
    "lambda_architecture": _choice(ARCHITECTURES),
    "log_retention_days": _retention,
    "log_level": _choice(LOG_LEVELS, upper=True),
    "preload": _boolean,
    "api_cloudwatch_role": _boolean,
    "snapstart": _model_names,
    "provisioned_concurrency": _per_model(
        _integer(1, LAMBDA_MAX_PROVISIONED_CONCURRENCY), '{"iris": 2}', "iris=2,mlp=1"
    ),
    "lambda_disk_cache": _boolean,
    "fetch_connections": _integer(1, MAX_FETCH_CONNECTIONS),
    "s3_mb_per_s_per_connection": _real(1, 10_000),
    "gpu_instance_type": _instance_type,
    "gpu_instance_types": _instance_types,
    "gpu_initial_instance_count": _integer(1, GPU_MAX_INSTANCES),
    "gpu_min_instances": _integer(0, GPU_MAX_INSTANCES),
    "gpu_max_instances": _integer(1, GPU_MAX_INSTANCES),
    "gpu_routing_strategy": _choice(GPU_ROUTING_STRATEGIES, upper=True),
    "gpu_initial_copies": _integer(1, GPU_MAX_COPIES),
    "gpu_min_copies": _integer(0, GPU_MAX_COPIES),
    "gpu_max_copies": _integer(1, GPU_MAX_COPIES),
    "gpu_invocations_per_copy": _real(1, 100_000),
    "gpu_scale_out_cooldown_seconds": _integer(0, 3600),
    "gpu_scale_in_cooldown_seconds": _integer(0, 3600),
    "gpu_scale_in_idle_minutes": _integer(1, GPU_MAX_IDLE_MINUTES),
    "gpu_memory_headroom": _real(1, 10),
    "gpu_base_memory_mb": _integer(0, 65_536),
    "gpu_cpu_cores_per_copy": _real(0.25, 192),
    "gpu_startup_timeout_seconds": _integer(60, GPU_MAX_STARTUP_SECONDS),
    "gpu_cold_start_minutes": _integer(1, 60),
    "gpu_retry_after_seconds": _integer(1, 3600),
    "gpu_max_batch_size": _integer(1, 4096),
    "gpu_max_queue_delay_ms": _real(0, 10_000),
    "pipeline_worker_timeout_seconds": _integer(1, LAMBDA_MAX_TIMEOUT_SECONDS),
    "pipeline_max_receive_count": _integer(1, 1000),
    "pipeline_batch_size": _integer(1, SQS_MAX_BATCH_SIZE),
    "pipeline_batching_window_seconds": _integer(0, SQS_MAX_BATCHING_WINDOW_SECONDS),
    "pipeline_reserved_concurrency": _integer(0, LAMBDA_MAX_RESERVED_CONCURRENCY),
    "alarm_email": _email,
    "jobs_expiry_days": _integer(1, 365),
    "jobs_url_expiry_seconds": _integer(60, 3600),
    "max_input_mb": _integer(1, 2048),
    "batch_items_per_batch": _integer(1, BATCH_MAX_ITEMS_PER_BATCH),
    "batch_max_concurrency": _integer(1, DISTRIBUTED_MAP_MAX_CONCURRENCY),
    "batch_tolerated_failure_percentage": _real(0, 100),
    "batch_function_timeout_seconds": _integer(1, LAMBDA_MAX_TIMEOUT_SECONDS),
    "stream": _model_or_none,
    "stream_shards": _integer(1, KINESIS_MAX_SHARDS),
    "stream_batch_size": _integer(1, KINESIS_MAX_BATCH_SIZE),
    "stream_max_retry_attempts": _integer(0, KINESIS_MAX_RETRY_ATTEMPTS),
    "capture": _capture,
    "capture_retention_days": _integer(1, 3650),
    "drift_window_hours": _integer(1, 24 * 7),
    "drift_psi_threshold": _real(0.01, 10),
    "drift_min_rows": _integer(1, 1_000_000),
    "waf": _boolean,
    "waf_rate_limit": _integer(WAF_MIN_RATE_LIMIT, WAF_MAX_RATE_LIMIT),
    "api_key_rate_limit": _real(1, 10_000),
    "api_key_burst_limit": _integer(1, 5_000),
    "api_key_quota": _integer(0, 2_000_000_000),
    "api_key_quota_period": _choice(QUOTA_PERIODS, upper=True),
    "error_rate_percent": _real(0.1, 100),
    "latency_budget_ms": _per_model(_real(1, MAX_LATENCY_BUDGET_MS), '{"iris": 200}', "iris=200,mlp=500"),
    "latency_budget_default_ms": _real(1, MAX_LATENCY_BUDGET_MS),
    "rollout": _choice(ROLLOUT_STRATEGIES),
    "rollout_overrides": _per_model(
        _choice(ROLLOUT_STRATEGIES), '{"iris": "all_at_once"}', "iris=all_at_once,mlp=linear10_1min"
    ),
}
