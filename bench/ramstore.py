"""One RAM-backed block store, served two ways for a like-for-like comparison.

The "python" group of the benchmark compares two ways of serving a block
device from Python: ublkml's plug-in API and nbdkit's Python plug-in over the
kernel's NBD client.  For the comparison to measure the *plumbing* and not
the storage code, both serve this one class, :class:`RamStore`:

* :class:`RamStoreTarget` wraps it as a ublkml plug-in
  (``ublkml add -t python --plugin bench.ramstore:RamStoreTarget --plugin-arg size=256M``);
* ``bench/nbdkit_ramdisk.py`` wraps it as an nbdkit Python plug-in
  (``nbdkit python bench/nbdkit_ramdisk.py size=256M``).

This module is imported by nbdkit's *embedded system* Python too, which may
lack the project's dependencies: :class:`RamStore` needs nothing but the
standard library, and the ublkml base class is imported only if available.
"""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ublk_driver.targets.base import Target
else:
    try:
        from ublk_driver.targets.base import Target
    except ImportError:  # nbdkit's interpreter without cffi: RamStore alone is needed there
        Target = object

__all__ = ["DEFAULT_SIZE", "RamStore", "RamStoreTarget", "parse_size"]

#: Default store size: big enough that random I/O does not stay in one CPU
#: cache, small enough for the 2-4 GiB test-bed guest.
DEFAULT_SIZE = 256 << 20

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """``256M`` -> bytes (binary units, optional ``B``/``iB``); ints pass through.

    A standard-library copy of the rule of ``ublk_driver.core.sizes.parse_size``,
    because nbdkit's embedded interpreter may not be able to import ublk_driver.
    """
    if isinstance(text, int):
        return text
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = s[-1:] if s[-1:] in _UNITS else ""
    number = s[: len(s) - len(unit)].strip()
    if not number.isdigit():
        raise ValueError(f"not a size: {text!r} (examples: 4096, 64M, 1G)")
    return int(number) * _UNITS[unit]


class RamStore:
    """Shared anonymous memory with pread/pwrite/flush/trim, the storage logic under test.

    The memory is an anonymous *shared* mapping (``mmap.mmap(-1, n)``), not a
    ``bytearray``: a forked process sees the same bytes, so ublkml may serve
    each queue from its own process (``--queue-processes``).

    Data moves with one slice assignment through a ``memoryview`` (no
    intermediate ``bytes``), which is the cheapest copy pure Python has.  Out
    of range accesses raise ``ValueError``; both servers reject them before
    they get here anyway.

    Thread safety: each call is a single slice assignment, done under the GIL,
    so concurrent calls (nbdkit's parallel thread model, ublkml's queue
    threads) never see a torn 4 KiB block of one request.  Across queue
    processes, concurrent requests to the same block are as unordered as they
    are on a disk.
    """

    def __init__(self, size: int | str = DEFAULT_SIZE) -> None:
        nbytes = parse_size(size)
        if nbytes <= 0 or nbytes % 4096:
            raise ValueError(f"size must be a positive multiple of 4096, got {nbytes}")
        self._data = mmap.mmap(-1, nbytes)   # MAP_SHARED | MAP_ANONYMOUS, zero-filled
        self._view = memoryview(self._data)

    @property
    def size(self) -> int:
        """Size in bytes."""
        return len(self._data)

    def pread(self, buf: memoryview | bytearray, offset: int) -> None:
        """Fill all of ``buf`` from ``offset`` (like pread(2), but never short)."""
        n = len(buf)
        src = self._view[offset:offset + n]
        # A bytearray would silently shrink to a short source: check the size.
        if len(src) != n:
            raise ValueError(f"read of {n} bytes at {offset} is beyond the end ({self.size})")
        buf[:] = src

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Store ``data`` at ``offset``."""
        self._view[offset:offset + len(data)] = data

    def flush(self) -> None:
        """Nothing to do: RAM is the stable storage here (and the same for both servers)."""

    def trim(self, offset: int, length: int) -> None:
        """Discard a range; it reads back as zeros."""
        self._view[offset:offset + length] = bytes(length)


class RamStoreTarget(Target):
    """:class:`RamStore` as a ublkml plug-in target (read, write, flush, discard).

    ``size`` comes from ``--plugin-arg size=256M`` (a string) or ``--size``.
    """

    discard_zeroes = True
    fork_safe = True   # the store is shared memory: queue processes see one disk

    def __init__(self, size: str | int = DEFAULT_SIZE) -> None:
        self.store = RamStore(size)

    def size(self) -> int:
        return self.store.size

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.store.pread(buf, offset)

    def write(self, offset: int, data: memoryview) -> None:
        self.store.pwrite(data, offset)

    def flush(self) -> None:
        self.store.flush()

    def discard(self, offset: int, length: int) -> None:
        self.store.trim(offset, length)
