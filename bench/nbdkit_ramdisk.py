"""nbdkit Python plug-in serving :class:`bench.ramstore.RamStore` (the benchmark's NBD peer).

Run it (nbdkit >= 1.22, Debian packages ``nbdkit nbdkit-plugin-python``)::

    nbdkit -f -U /run/ram.sock --exit-with-parent python bench/nbdkit_ramdisk.py size=256M
    nbd-client -unix /run/ram.sock /dev/nbd0 -b 4096

nbdkit runs this file as ``__main__`` in its embedded interpreter, the
*system* Python (``/usr/bin/python3``), not the project's virtualenv: the
repository root is added to ``sys.path`` so that ``bench.ramstore`` imports,
and nothing here needs more than the standard library.

One store is shared by every connection (``nbd-client -connections N`` opens
N), and the plug-in says so with ``can_multi_conn``: a flush on one
connection covers writes made on the others, trivially, since all of them
write to the same bytearray.  The thread model is ``parallel``, the most
concurrent nbdkit offers; the GIL then serialises the Python calls, exactly
as it does for ublkml's queue threads.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nbdkit  # type: ignore[import-not-found]  # provided by nbdkit's python plug-in

from bench.ramstore import DEFAULT_SIZE, RamStore, parse_size

API_VERSION = 2

_config: dict[str, int] = {"size": DEFAULT_SIZE}
_store: list[RamStore] = []  # set by config_complete; a list avoids a `global` statement


def config(key: str, value: str) -> None:
    """``size=256M`` on nbdkit's command line."""
    if key == "size":
        _config["size"] = parse_size(value)
    else:
        raise RuntimeError(f"unknown parameter {key!r} (this plug-in takes size=N)")


def config_complete() -> None:
    """Allocate the store once, before any client connects."""
    _store.append(RamStore(_config["size"]))


def thread_model() -> int:
    """Requests of all connections may run concurrently (like ublkml's queues)."""
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def open(readonly: bool) -> int:
    """Every connection uses the one shared store; the handle carries nothing."""
    return 1


def get_size(h: int) -> int:
    return _store[0].size


def can_multi_conn(h: int) -> bool:
    return True


def pread(h: int, buf: memoryview, offset: int, flags: int) -> None:
    _store[0].pread(buf, offset)


def pwrite(h: int, buf: memoryview, offset: int, flags: int) -> None:
    # FUA needs nothing more: the store is RAM, flush() is a no-op.
    _store[0].pwrite(buf, offset)


def flush(h: int, flags: int) -> None:
    _store[0].flush()


def trim(h: int, count: int, offset: int, flags: int) -> None:
    _store[0].trim(offset, count)
