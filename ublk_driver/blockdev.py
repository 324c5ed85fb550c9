"""The served block device's queue settings, through sysfs (``/sys/block/ublkbN/queue``).

Only the I/O scheduler so far.  The kernel gives a single-queue blk-mq device
mq-deadline by default; the kernel's own loop and null_blk end up with none
(loop asks for it, null_blk gets it from its extra poll queue).  A ublk
server is a driver whose backend does its own queueing, so an elevator in
front of it only costs: a single-queue ublkml null device served ~0.7x the
IOPS of the same device with none (4 KiB random read, depth 32, test bed;
docs/benchmarks.md).  The server therefore sets none unless told otherwise.
"""

from __future__ import annotations

import errno
import os
import re

from ublk_driver.core.errors import ConfigError, UblkError

SYSFS_BLOCK = "/sys/block"

#: ``--scheduler keep``: leave the kernel's choice
KEEP = "keep"

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


def check_scheduler(name: str | None) -> str | None:
    """An I/O scheduler name as sysfs takes it (``none``, ``mq-deadline``, ...), or None."""
    if name is None:
        return None
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"I/O scheduler must be a name like none or mq-deadline, got {name!r}")
    return name


def parse_schedulers(text: str) -> tuple[list[str], str | None]:
    """``queue/scheduler``'s text (``none [mq-deadline] kyber``): the names, and the active one."""
    names: list[str] = []
    active: str | None = None
    for word in text.split():
        if word.startswith("[") and word.endswith("]") and len(word) > 2:
            word = word[1:-1]
            active = word
        names.append(word)
    return names, active


def _scheduler_file(disk: str, root: str) -> str:
    return os.path.join(root, disk, "queue", "scheduler")


def read_scheduler(disk: str, root: str = SYSFS_BLOCK) -> tuple[list[str], str | None]:
    """The schedulers the kernel offers for ``disk`` (``ublkb0``) and the active one."""
    path = _scheduler_file(disk, root)
    try:
        with open(path) as f:
            return parse_schedulers(f.read())
    except FileNotFoundError:
        raise UblkError(f"{path} is missing: is {disk} a started block device?") from None


def set_scheduler(disk: str, name: str, root: str = SYSFS_BLOCK) -> str:
    """Make ``name`` the I/O scheduler of ``disk``; returns the active one after.

    The kernel loads a scheduler module on demand, so a name missing from the
    list may still work: the write decides, and its error lists the choices.
    """
    check_scheduler(name)
    path = _scheduler_file(disk, root)
    try:
        with open(path, "w") as f:
            f.write(name)
    except FileNotFoundError:
        raise UblkError(f"{path} is missing: is {disk} a started block device?") from None
    except OSError as e:
        if e.errno == errno.EINVAL:
            names, _ = read_scheduler(disk, root)
            raise ConfigError(f"the kernel has no I/O scheduler {name!r} for {disk}: choose "
                              f"one of {', '.join(names) or 'none'} (or --scheduler keep)"
                              ) from None
        raise UblkError(f"cannot set the I/O scheduler of {disk} to {name!r}: "
                        f"{os.strerror(e.errno or errno.EIO)} (run as root, or "
                        f"--scheduler keep)") from None
    _, active = read_scheduler(disk, root)
    return active or name
