"""The CDK app's settings: ``cdk.json`` context, validated once into a typed object.

Config flows one way: ``cdk.json`` context -> :meth:`InfraConfig.from_context` (here) ->
construct parameters -> function environment. Every key is snake_case and its default lives
in :class:`InfraConfig`; ``cdk.json`` repeats the defaults so ops see and edit them in one
place (a test keeps the two equal). Values given as ``cdk synth -c key=value`` arrive as
strings, so numbers and booleans are parsed from text too.

A later issue adds a setting by adding a field with its default, a parser in ``_PARSERS``
and the key in ``cdk.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from tierserve.catalog import DEFAULT_LAMBDA_MAX_MODEL_MB, LAMBDA_MAX_MEMORY_MB

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

    @classmethod
    def from_context(cls, get: Callable[[str], Any]) -> InfraConfig:
        """Read and validate every key through ``get`` (``app.node.try_get_context``).

        A key that ``get`` returns None for keeps its default. Raises :class:`ConfigError`
        naming the first bad key, its value and the accepted values.
        """
        values: dict[str, Any] = {}
        for field in fields(cls):
            raw = get(field.name)
            if raw is not None:
                values[field.name] = _PARSERS[field.name](field.name, raw)
        return cls(**values)

    def catalog_path(self, root: Path) -> Path:
        """The catalog file: ``catalog`` as given when absolute, else relative to ``root``."""
        path = Path(self.catalog)
        return path if path.is_absolute() else root / path

    def to_context(self) -> dict[str, Any]:
        """The context keys and values this config stands for (the inverse of :meth:`from_context`)."""
        return {field.name: getattr(self, field.name) for field in fields(self)}


def _problem(key: str, raw: Any, wanted: str) -> ConfigError:
    default = _DEFAULTS[key]
    example = str(default).lower() if isinstance(default, bool) else default
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


def _text(key: str, raw: Any) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise _problem(key, raw, "a non-empty path to the catalog JSON file")
    return raw.strip()


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
}
