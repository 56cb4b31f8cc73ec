"""Which files were opened or read while a block ran: Linux's inotify, through ctypes.

with watching(path) as opened:
    ...                      # code that must not touch ``path``
assert opened == []
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import struct
from collections.abc import Iterator
from pathlib import Path

IN_ACCESS, IN_OPEN, IN_NONBLOCK = 0x001, 0x020, 0o4000
_EVENT = struct.Struct("iIII")


@contextlib.contextmanager
def watching(*paths: Path) -> Iterator[list[str]]:
    """Yield a list that, once the block ends, names each of ``paths`` opened or read in it."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    descriptor = libc.inotify_init1(IN_NONBLOCK)
    if descriptor < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    watches: dict[int, str] = {}
    events: list[str] = []
    try:
        for path in paths:
            watch = libc.inotify_add_watch(descriptor, str(path).encode(), IN_OPEN | IN_ACCESS)
            if watch < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
            watches[watch] = str(path)
        yield events
        try:
            data = os.read(descriptor, 64 * 1024)
        except BlockingIOError:
            data = b""
        offset = 0
        while offset + _EVENT.size <= len(data):
            watch, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size + length
            events.append(watches.get(watch, "?"))
    finally:
        os.close(descriptor)
