"""Model manifests, the catalog, and the one tier rule.

A manifest (:mod:`.manifest`) describes one immutable model version stored under
``models/{name}/{version}/``. The catalog (:mod:`.deployment`) is a JSON file listing the
models to deploy, each with its manifest, so the CDK app synthesizes offline. Both the CDK app
and the local API ask :func:`tier_for` which tier serves a model: they can never disagree.

Manifests are data that can be hostile, so they are read strictly (:meth:`Manifest.from_json`,
:meth:`Catalog.load`, both through :func:`load_json`, :mod:`.strict_json`): strict JSON (no
``NaN`` or ``Infinity``, no number past a double, no key twice in one object), nested at most
:data:`MAX_JSON_DEPTH` levels, and every field of its JSON type: booleans are ``true``/``false``,
sizes and dimensions are integers in range, datatypes are v2 datatypes, names follow their
patterns, and no field is unknown. A :class:`ManifestError` says which field is wrong and how;
readers report it as "<where> is not a valid manifest: <what>".
"""

from tierserve.catalog.deployment import (
    DEFAULT_LAMBDA_MAX_MODEL_MB,
    LAMBDA_MAX_MEMORY_MB,
    LAMBDA_MIN_MEMORY_MB,
    MAX_CATALOG_BYTES,
    Catalog,
    CatalogEntry,
    lambda_memory_mb,
    manifest_key,
    tier_for,
)
from tierserve.catalog.manifest import (
    COMPRESSIONS,
    DATATYPE_NAMES,
    FLOAT_DATATYPES,
    FORMATS,
    MANIFEST_FIELDS,
    MANIFEST_NAME,
    MANIFEST_SCHEMA_VERSION,
    MAX_ARTIFACT_NAME,
    MAX_CACHE_ENTRIES,
    MAX_CACHE_MB,
    MAX_DIMENSION,
    MAX_LABEL,
    MAX_MODEL_BYTES,
    MAX_RANK,
    MAX_ROUND_DECIMALS,
    MAX_TENSOR_NAME,
    MAX_TENSORS,
    MAX_TOP_K,
    NAME_PATTERN,
    TIERS,
    VERSION_PATTERN,
    Digest,
    Manifest,
    OutputLimits,
    ResponseCachePolicy,
    TensorSpec,
    Tier,
)
from tierserve.catalog.strict_json import (
    MAX_JSON_DEPTH,
    MAX_MANIFEST_BYTES,
    MB,
    ManifestError,
    load_json,
)

__all__ = [
    "COMPRESSIONS",
    "DATATYPE_NAMES",
    "DEFAULT_LAMBDA_MAX_MODEL_MB",
    "FLOAT_DATATYPES",
    "FORMATS",
    "LAMBDA_MAX_MEMORY_MB",
    "LAMBDA_MIN_MEMORY_MB",
    "MANIFEST_FIELDS",
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA_VERSION",
    "MAX_ARTIFACT_NAME",
    "MAX_CACHE_ENTRIES",
    "MAX_CACHE_MB",
    "MAX_CATALOG_BYTES",
    "MAX_DIMENSION",
    "MAX_JSON_DEPTH",
    "MAX_LABEL",
    "MAX_MANIFEST_BYTES",
    "MAX_MODEL_BYTES",
    "MAX_RANK",
    "MAX_ROUND_DECIMALS",
    "MAX_TENSORS",
    "MAX_TENSOR_NAME",
    "MAX_TOP_K",
    "MB",
    "NAME_PATTERN",
    "TIERS",
    "VERSION_PATTERN",
    "Catalog",
    "CatalogEntry",
    "Digest",
    "Manifest",
    "ManifestError",
    "OutputLimits",
    "ResponseCachePolicy",
    "TensorSpec",
    "Tier",
    "lambda_memory_mb",
    "load_json",
    "manifest_key",
    "tier_for",
]
