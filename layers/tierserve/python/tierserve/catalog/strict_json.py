"""Strict, bounded JSON for manifests and catalogs, and the typed-field readers that say which
field is wrong and how (:class:`ManifestError`). Hostile data: strict JSON (no ``NaN`` or
``Infinity``, no number past a double, no key twice in one object), nested at most
:data:`MAX_JSON_DEPTH` levels, every field of its JSON type, no field unknown.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Iterable, Mapping
from typing import Any

MB = 1024 * 1024
MAX_JSON_DEPTH = 32  # a manifest nests 5 levels (accuracy.outputs.NAME.metric), a catalog 3 more
MAX_MANIFEST_BYTES = 1 * MB


class ManifestError(ValueError):
    """A manifest or catalog that does not describe a servable model; the message says why."""


def load_json(text: str | bytes, what: str = "the manifest", max_bytes: int = MAX_MANIFEST_BYTES) -> Any:
    """Parse a manifest or catalog (``what`` in messages) as strict, bounded JSON (see the
    module docstring).

    Raises:
        ManifestError: over ``max_bytes``, not UTF-8 JSON, non-finite or overlong numbers, a key
            twice, or nested deeper than :data:`MAX_JSON_DEPTH`; the message names which.
    """
    if len(text) > max_bytes:
        raise ManifestError(f"{what} is {len(text):,} bytes, over the {max_bytes:,} bytes it may be")
    try:
        value = json.loads(
            text, parse_constant=_no_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys
        )
    except _Refused as refused:
        raise ManifestError(f"{what} {refused}") from None
    except RecursionError:
        raise ManifestError(
            f"{what} is nested too deeply to parse (it may be {MAX_JSON_DEPTH} levels deep)"
        ) from None
    except json.JSONDecodeError as error:
        raise ManifestError(f"{what} is not valid JSON ({error})") from None
    except UnicodeError:
        raise ManifestError(f"{what} is not UTF-8 text") from None
    except ValueError:  # Python refuses to convert an integer of over 4,300 digits
        raise ManifestError(f"{what} has an integer with too many digits") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise ManifestError(f"{what} is nested deeper than the {MAX_JSON_DEPTH} levels it may be")
    return value


class _Refused(ValueError):
    """What the strict parser's hooks refuse; :func:`load_json` says where."""


def _no_constant(name: str) -> Any:
    raise _Refused(f"holds {name}, which is not a JSON number: write finite numbers only")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"holds {reprlib.repr(text)}, a number too large for a double")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:  # readers that keep the first and readers that keep the last would disagree
            raise _Refused(f"has the key {reprlib.repr(key)} twice in one object: keep one")
        seen.add(key)
    return dict(pairs)


def _depth(value: Any) -> int:
    """How many levels of arrays and objects ``value`` nests (iteratively: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level <= MAX_JSON_DEPTH:  # deeper is refused whatever lies below
            stack.extend((child, level + 1) for child in children)
    return deepest


# ---------------------------------------------------------------- typed fields

_REQUIRED: Any = object()


def _quoted(path: str) -> str:
    return f'"{path}"'


def _described(value: Any) -> str:
    return f"a list of {len(value):,}" if isinstance(value, list) else reprlib.repr(value)


def _object(value: Any, path: str, known: Iterable[str]) -> Mapping[str, Any]:
    """``value`` as a JSON object with only ``known`` keys."""
    if not isinstance(value, Mapping):
        raise ManifestError(f"{path} must be a JSON object, got {reprlib.repr(value)}")
    known = tuple(known)
    unknown = [key for key in value if key not in known]
    if unknown:
        raise ManifestError(
            f"{path} has an unknown field {reprlib.repr(unknown[0])}: its fields are {', '.join(known)}"
        )
    return value


def _get(data: Mapping[str, Any], key: str, path: str, default: Any = _REQUIRED) -> Any:
    if key in data:
        return data[key]
    if default is _REQUIRED:
        raise ManifestError(f"{_quoted(path)} is missing")
    return default


def _string(value: Any, path: str, *, limit: int) -> str:
    """A JSON string of at most ``limit`` characters (what it must look like, :meth:`Manifest.validate` checks)."""
    if not isinstance(value, str) or len(value) > limit:
        raise ManifestError(
            f"{_quoted(path)} must be a string of at most {limit} characters, got {reprlib.repr(value)}"
        )
    return value


def _choice(value: Any, path: str, choices: Iterable[str]) -> str:
    options = sorted(choices)
    if not isinstance(value, str) or value not in options:
        raise ManifestError(f"{_quoted(path)} must be one of {options}, got {reprlib.repr(value)}")
    return value


def _integer(value: Any, path: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ManifestError(
            f"{_quoted(path)} must be a whole number (a JSON integer) from {low:,} to {high:,}, "
            f"got {reprlib.repr(value)}"
        )
    return value


def _boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ManifestError(
            f"{_quoted(path)} must be true or false (a JSON boolean), got {reprlib.repr(value)}"
        )
    return value


def _optional_object(value: Any, path: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ManifestError(f"{_quoted(path)} must be a JSON object or null, got {reprlib.repr(value)}")
    return dict(value)
