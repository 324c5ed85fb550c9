"""Example plug-in targets, also used by the tests and benchmarks.

``RamDisk`` is the canonical "hello world" of a Python block device: a
buffer of memory.  Serve it with::

    ublkml add -t python --plugin ublk_driver.targets.ramdisk:RamDisk --plugin-arg size=64M

Its memory is an anonymous shared mapping rather than a ``bytearray``, so
that it may also be served with a process per queue (``--queue-processes``):
the processes forked from the server see the same bytes.
"""

from __future__ import annotations

import errno
import mmap
import threading

from ublk_driver.errors import IoError
from ublk_driver.sizes import parse_size
from ublk_driver.targets.base import Target


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


class ReadOnlyZeros(Target):
    """The smallest plug-in: reads zeros, accepts nothing else."""

    def __init__(self, size: str | int = "16M") -> None:
        self._size = parse_size(size)

    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)


class Faulty(Target):
    """A RAM disk that misbehaves on purpose in chosen byte ranges (tests).

    It uses the plain ``read()`` API, so short data takes the real path:
    - reads overlapping [short_from, short_to) return half the bytes asked for;
    - reads overlapping [raise_from, raise_to) raise ``RuntimeError``;
    - writes overlapping [eio_from, eio_to) raise ``IoError(ENOSPC)``.
    """

    def __init__(self, size: str | int = "16M", short_from: str = "0", short_to: str = "0",
                 raise_from: str = "0", raise_to: str = "0", eio_from: str = "0",
                 eio_to: str = "0") -> None:
        self._data = bytearray(parse_size(size))
        self._view = memoryview(self._data)
        self.short = (parse_size(short_from), parse_size(short_to))
        self.raising = (parse_size(raise_from), parse_size(raise_to))
        self.eio = (parse_size(eio_from), parse_size(eio_to))

    @staticmethod
    def _hit(rng: tuple[int, int], offset: int, length: int) -> bool:
        return offset < rng[1] and offset + length > rng[0]

    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        if self._hit(self.raising, offset, length):
            raise RuntimeError("injected plug-in failure")
        data = bytes(self._view[offset:offset + length])
        if self._hit(self.short, offset, length):
            return data[: length // 2]
        return data

    def write(self, offset: int, data: memoryview) -> None:
        if self._hit(self.eio, offset, len(data)):
            raise IoError(errno.ENOSPC)
        self._view[offset:offset + len(data)] = data

    def flush(self) -> None:
        pass


class Sleepy(RamDisk):
    """A RAM disk whose calls touching [hang_from, hang_to) never return
    (tests the plug-in timeout, ``--plugin-timeout``); elsewhere it works."""

    def __init__(self, size: str | int = "16M", hang_from: str = "0",
                 hang_to: str = "0") -> None:
        super().__init__(size)
        self.hang = (parse_size(hang_from), parse_size(hang_to))
        self._never = threading.Event()

    def _maybe_hang(self, offset: int, length: int) -> None:
        if offset < self.hang[1] and offset + max(length, 1) > self.hang[0]:
            self._never.wait()  # forever (releases the GIL, as I/O would)

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._maybe_hang(offset, len(buf))
        super().read_into(offset, buf)

    def write(self, offset: int, data: memoryview) -> None:
        self._maybe_hang(offset, len(data))
        super().write(offset, data)

    def flush(self) -> None:
        if self.hang[0] == 0 and self.hang[1] > 0:
            self._never.wait()
