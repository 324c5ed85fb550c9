"""A RAM disk: the "hello world" of a Python block device.

A buffer of memory, with every operation (read, write, flush, discard,
write-zeroes).  Serve it from the repository's root with::

    ublkml add -t python --plugin examples/ramdisk.py:RamDisk --plugin-arg size=64M

Its memory is an anonymous shared mapping rather than a ``bytearray``, so
that it may also be served with a process per queue (``--queue-processes``):
the processes forked from the server see the same bytes.
"""

from __future__ import annotations

import mmap

from ublk_driver import Target, parse_size


class RamDisk(Target):
    """A RAM disk in shared memory: all operations, discarded ranges read as zeros."""

    discard_zeroes = True
    fork_safe = True

    def __init__(self, size: str | int = "64M") -> None:
        self._data = mmap.mmap(-1, parse_size(size))  # MAP_SHARED|MAP_ANONYMOUS, zeros
        self._view = memoryview(self._data)

    def size(self) -> int:
        return len(self._data)

    def read_into(self, offset: int, buf: memoryview) -> None:
        buf[:] = self._view[offset:offset + len(buf)]

    def write(self, offset: int, data: memoryview) -> None:
        self._view[offset:offset + len(data)] = data

    def flush(self) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        self._view[offset:offset + length] = bytes(length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._view[offset:offset + length] = bytes(length)
