"""Lambda SnapStart: what a snapshot must not hold, and what a restored environment redoes.

With SnapStart, Lambda runs a function's init once, when a version is published, snapshots the
execution environment (memory and /tmp, the preloaded onnxruntime session included) and starts
every new environment of that version from a copy of it. Lambda's Python runtime (awslambdaric)
runs the hooks registered with ``snapshot-restore-py`` just before the snapshot and just after
each restore; :func:`register_hooks` registers tierserve's:

before the snapshot
    metrics recorded during the init (the preload's timings) are flushed, once, from the init;
    every boto3 client is closed, so no pooled connection is in the snapshot.
after a restore
    the boto3 clients are forgotten, so the next call makes new ones (a restored connection
    pool would hold sockets that died with the snapshot); ``random`` is re-seeded from the
    operating system, or every environment restored from one snapshot would draw the same
    numbers (botocore's retry jitter among them; file names and ids use ``uuid4``, i.e. the OS);
    per-environment telemetry is reset (:func:`tierserve.telemetry.reset_for_new_environment`);
    the restore is logged and counted (``SnapStartRestore``, beside ``ColdStart``).

The hooks hold no state of their own, so registering twice (a handler module imported again,
as the tests and the local stack do) registers nothing more.
"""

from __future__ import annotations

import random

from snapshot_restore_py import (
    get_after_restore,
    get_before_snapshot,
    register_after_restore,
    register_before_snapshot,
)

from tierserve import aws
from tierserve.telemetry import (
    SNAPSTART_RESTORE,
    Versioned,
    flush_metrics,
    logger,
    record_count,
    reset_for_new_environment,
)

_model: Versioned | None = None  # what a restore is counted about (register_hooks)


def before_snapshot() -> None:
    """Leave nothing in the snapshot that belongs to this environment's connections."""
    flush_metrics()
    aws.close_clients()
    logger.info("snapshot: boto3 clients closed, init metrics flushed")


def after_restore() -> None:
    """Make a restored environment its own: new clients, new random state, its own telemetry."""
    aws.clear_clients()
    random.seed()  # from os.urandom
    reset_for_new_environment()
    record_count(SNAPSTART_RESTORE, model=_model)
    logger.info("restored from a SnapStart snapshot: new boto3 clients, random re-seeded")


def register_hooks(model: Versioned | None = None) -> None:
    """Register :func:`before_snapshot` and :func:`after_restore` with the runtime, once;
    restores are counted about ``model`` (the function's default model version) when given."""
    global _model
    _model = model
    if not any(hook is before_snapshot for hook, _, _ in get_before_snapshot()):
        register_before_snapshot(before_snapshot)
    if not any(hook is after_restore for hook, _, _ in get_after_restore()):
        register_after_restore(after_restore)
