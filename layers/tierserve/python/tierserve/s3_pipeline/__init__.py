"""Inference on files put into S3: ``inputs/{model}/{path}`` -> ``outputs/{model}/{path}.json``
(or ``errors/{model}/{path}.json`` with the reason), nothing lost, nothing duplicated.

    events.py    SQS message bodies -> the S3 objects they announce; input keys; sequencers
    formats.py   .json / .npy / .jsonl files -> validated model batches, within their bounds
    results.py   the results already written, and conditional writes of new ones
    errors.py    what a failed S3 call on an input or a result means (from tierserve.aws)
    worker.py    :class:`Pipeline`: one object to its one result (see its docstring)
    settings.py  the worker's ``TIERSERVE_*`` variables
"""

from tierserve.s3_pipeline.events import (
    InputKey,
    PoisonMessage,
    S3Object,
    compare_sequencers,
    parse_input_key,
    parse_message,
)
from tierserve.s3_pipeline.formats import FORMATS, decode_npy, iter_lines, iter_row_batches
from tierserve.s3_pipeline.results import (
    META_INPUT_ETAG,
    Outcome,
    Recorded,
    stale_other_result,
    why_skip,
)
from tierserve.s3_pipeline.settings import PipelineSettings
from tierserve.s3_pipeline.worker import Pipeline

__all__ = [
    "FORMATS",
    "META_INPUT_ETAG",
    "InputKey",
    "Outcome",
    "Pipeline",
    "PipelineSettings",
    "PoisonMessage",
    "Recorded",
    "S3Object",
    "compare_sequencers",
    "decode_npy",
    "iter_lines",
    "iter_row_batches",
    "parse_input_key",
    "parse_message",
    "stale_other_result",
    "why_skip",
]
