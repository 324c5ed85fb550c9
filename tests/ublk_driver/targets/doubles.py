"""Plug-ins that misbehave on purpose, for the tests: :class:`Faulty` and :class:`Sleepy`.

A server started from the repository's root loads them as
``--plugin tests.ublk_driver.targets.doubles:Faulty`` (``python -m`` puts the
current directory on ``sys.path``), as it loads ``examples.ramdisk:RamDisk``.
"""

from __future__ import annotations

import errno
import threading

from examples.ramdisk import RamDisk
from ublk_driver import IoError, Target, parse_size


class Faulty(Target):
    """A RAM disk that misbehaves on purpose in chosen byte ranges.

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
