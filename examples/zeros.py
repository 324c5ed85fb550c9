"""The smallest plug-in: a read-only device of zeros.

Only ``size`` and ``read`` are defined, so only reads are advertised to the
kernel (no write, flush, discard).  Serve it from the repository's root with::

    ublkml add -t python --plugin examples/zeros.py:ReadOnlyZeros --plugin-arg size=16M
"""

from __future__ import annotations

from ublk_driver import Target, parse_size


class ReadOnlyZeros(Target):
    """The smallest plug-in: reads zeros, accepts nothing else."""

    def __init__(self, size: str | int = "16M") -> None:
        self._size = parse_size(size)

    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)
