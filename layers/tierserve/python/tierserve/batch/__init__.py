"""Bulk inference over S3: every input under a prefix (or listed by a manifest or an S3
Inventory report) through the S3 pipeline's own code, in batches, writing results exactly
where and as the S3 worker writes them (a rerun skips inputs whose result is current).

    items.py   where a run's items come from, read as Step Functions' Distributed Map reads them
    runner.py  one batch of items: the batch function's work (functions/inference/batch.py)
    local.py   a whole map run in this process, for the local stack and the tests

In AWS the ``TierserveBatch`` state machine (``infra/batch.py``) reads, batches, retries and
summarizes; here :func:`run_locally` does the same around the same batch code.
"""

from tierserve.batch.items import (
    MANIFEST_READERS,
    READERS,
    BadManifest,
    BadSource,
    BatchSource,
    PoisonItem,
    read_items,
    to_object,
)
from tierserve.batch.local import (
    BATCH_RETRY,
    COLD_RETRY,
    ItemCounts,
    MapRunResult,
    MapSettings,
    RetryPolicy,
    run_locally,
)
from tierserve.batch.runner import (
    BatchItemsFailed,
    BatchModelStarting,
    BatchSummary,
    InvalidBatch,
    PoisonItems,
    serve_batch,
)

__all__ = [
    "BATCH_RETRY",
    "COLD_RETRY",
    "MANIFEST_READERS",
    "READERS",
    "BadManifest",
    "BadSource",
    "BatchItemsFailed",
    "BatchModelStarting",
    "BatchSource",
    "BatchSummary",
    "InvalidBatch",
    "ItemCounts",
    "MapRunResult",
    "MapSettings",
    "PoisonItem",
    "PoisonItems",
    "RetryPolicy",
    "read_items",
    "run_locally",
    "serve_batch",
    "to_object",
]
