"""What a failed S3 call on the data bucket (an input, a result) means to the pipeline: one
translation of :func:`tierserve.aws.classify`'s reading into the error the worker reports.

The callers decide first what needs no error at all: an input that is ``gone`` or
``changed`` is skipped, a result that is ``gone`` was never written, a ``changed`` or
``raced`` conditional write is looked at again.
"""

from __future__ import annotations

from typing import Literal

from tierserve import aws
from tierserve.errors import ModelUnavailable, TierserveError, UpstreamTimeout, UpstreamUnavailable

S3Action = Literal["reading", "writing", "deleting"]
_PERMISSIONS: dict[str, str] = {
    "reading": "s3:GetObject",
    "writing": "s3:PutObject",
    "deleting": "s3:DeleteObject",
}


def data_error(
    error: BaseException, where: str, action: S3Action = "reading", bucket_setting: str | None = None
) -> TierserveError:
    """The error for ``error``, met while ``action`` the data object ``where``.

    ``bucket_setting`` names the variable that chose the bucket (``TIERSERVE_DATA_BUCKET`` for
    results written elsewhere); None means the bucket came from the S3 event. A tierserve
    error passes through unchanged.
    """
    if isinstance(error, TierserveError):
        return error
    failure = aws.classify(error)
    if failure.bucket_missing:
        fix = f"check {bucket_setting}" if bucket_setting else "was it deleted after the event?"
        return ModelUnavailable(f"the bucket of {where} does not exist: {fix}")
    if failure.kind == "denied":
        return ModelUnavailable(
            f"access to {where} is denied ({failure.code}): the worker's role must allow "
            f"{_PERMISSIONS[action]} there"
        )
    if failure.kind == "timeout":
        return UpstreamTimeout(f"S3 did not answer in time while {action} {where}; retry")
    return UpstreamUnavailable(f"S3 is unavailable while {action} {where} ({failure.code}); retry shortly")
