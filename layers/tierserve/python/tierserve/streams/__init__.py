"""Inference on streams: Kinesis records to result records, in each shard's order.

records.py   what a record holds (a v2 infer request or a row) and the result documents
worker.py    :class:`StreamWorker` and one batch of records (:class:`StreamBatch`)
settings.py  the stream worker's ``TIERSERVE_*`` variables
"""

from tierserve.streams.records import RecordId, decode_record, error_document
from tierserve.streams.settings import StreamSettings
from tierserve.streams.worker import EarlierRecordFailed, StreamBatch, StreamWorker

__all__ = [
    "EarlierRecordFailed",
    "RecordId",
    "StreamBatch",
    "StreamSettings",
    "StreamWorker",
    "decode_record",
    "error_document",
]
