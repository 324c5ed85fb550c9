"""Which drives a path's I/O lands on, read from sysfs.

A *drive* here is a whole disk as the kernel lists it in ``/sys/block``
(``sda``, ``nvme0n1``, ``vda``, ``loop3``): the unit the block layer's
tracepoints, its statistics and SMART speak of.  :func:`resolve` finds the
drives under a path:

1. ``stat(path)``, symlinks followed.  A block device stands for itself
   (``st_rdev``); anything else (a file, a directory) for the block device of
   its file system (``st_dev``).
2. Major 0 is an anonymous device: the file system has no block device of its
   own (tmpfs, overlay, 9p, NFS, FUSE, proc, and btrfs, which gives each
   subvolume an anonymous number).  No drive; :attr:`Resolution.reason` names
   the file system (from ``/proc/self/mountinfo``).
3. ``<sysfs>/dev/block/MAJ:MIN`` leads to the device's directory.  A partition
   (the directory has a ``partition`` file) is replaced by its disk, the
   parent directory.
4. A disk with members in ``slaves/`` (device-mapper, md, bcache...) is
   replaced by its members, each resolved from step 3 on, recursively.  A dm
   or md device without members (``dm-zero``, ``dm-error``, an md array not
   assembled) has no drive.
5. What is left is a drive.

Loop devices are drives in their own right: their backing file is not
followed.  The block layer accounts a loop device's I/O to ``loopN`` (that is
what the eBPF agent sees and what the test bed and benchmarks use as a
stand-in disk, often with dm-delay on top); following the backing file would
cross into another file system, often one with no drive at all (tmpfs), and
``loop/backing_file`` is a path in the namespace of whoever set the loop up.
Callers who want the disk under the loop resolve ``loop/backing_file``
themselves.

Each drive appears once, ordered by (major, minor); a cycle (only a broken or
faked tree has one) ends at the device seen before.  A missing path is a
:class:`DriveLookupError`; everything else that stops the walk is a reason,
not an error, since a device may vanish while it is being read.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from ublk_driver.core.errors import UblkError

__all__ = ["Drive", "DriveLookupError", "Resolution", "drives_of", "resolve", "resolve_dev",
           "resolve_fd", "why_no_drive"]

MOUNTINFO = "/proc/self/mountinfo"


class DriveLookupError(UblkError, OSError):
    """The path whose drives were asked for cannot be looked at (missing, no access)."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass(frozen=True, order=True)
class Drive:
    """A whole disk as in ``/sys/block``: ``name`` (``sda``), ``major``, ``minor``."""

    name: str
    major: int
    minor: int

    @property
    def dev(self) -> str:
        """``"MAJ:MIN"``, as in ``/sys/dev/block`` and the block tracepoints."""
        return f"{self.major}:{self.minor}"

    @property
    def path(self) -> str:
        """``/dev/<name>`` (sysfs spells ``/`` in a name ``!``: ``cciss!c0d0``)."""
        return "/dev/" + self.name.replace("!", "/")

    def to_dict(self) -> dict[str, str]:
        """``{"name": "sda", "dev": "8:0"}``, as the admin socket's ``status`` shows it."""
        return {"name": self.name, "dev": self.dev}


@dataclass(frozen=True)
class Resolution:
    """The drives under ``path``, or why there are none (``reason``)."""

    path: str
    drives: tuple[Drive, ...]
    #: why ``drives`` is empty; None when it is not
    reason: str | None


def resolve(path: str, *, sysfs: str = "/sys") -> Resolution:
    """The drives under ``path`` (a file, directory or block device), or why none."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DriveLookupError(e.errno or errno.ENOENT,
                               f"cannot find the drives of {path}: "
                               f"{e.strerror or e}") from None
    return _resolve_stat(path, st, sysfs)


def resolve_fd(fd: int, label: str, *, sysfs: str = "/sys") -> Resolution:
    """The drives under an open file or block device (``label``: what to call it).

    The file that is open, even if its path has been renamed or replaced since.
    """
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise DriveLookupError(e.errno or errno.EBADF,
                               f"cannot find the drives of {label}: "
                               f"{e.strerror or e}") from None
    return _resolve_stat(label, st, sysfs)


def resolve_dev(major: int, minor: int, *, sysfs: str = "/sys") -> Resolution:
    """The drives under block device ``major:minor`` (as the block tracepoints
    and ``st_dev`` number them); ``path`` of the answer is ``"MAJ:MIN"``."""
    label = f"{major}:{minor}"
    if major == 0:
        return Resolution(label, (), f"device {label} is anonymous (major 0): no block "
                          "device is behind it")
    return _resolve_number(label, "device", major, minor, sysfs)


def drives_of(path: str, *, sysfs: str = "/sys") -> tuple[Drive, ...]:
    """The drives under ``path``; ``()`` when there are none (:func:`why_no_drive`)."""
    return resolve(path, sysfs=sysfs).drives


def why_no_drive(path: str, *, sysfs: str = "/sys") -> str | None:
    """Why ``path`` has no drive under it, in one line; None when it has one."""
    return resolve(path, sysfs=sysfs).reason


# ---- the walk ------------------------------------------------------------------------


def _resolve_stat(path: str, st: os.stat_result, sysfs: str) -> Resolution:
    if stat.S_ISCHR(st.st_mode):
        return Resolution(path, (), f"{path} is a character device: no block device is "
                          "behind it")
    is_bdev = stat.S_ISBLK(st.st_mode)
    dev = st.st_rdev if is_bdev else st.st_dev
    major, minor = os.major(dev), os.minor(dev)
    if major == 0:
        return Resolution(path, (), _anonymous_reason(path, major, minor))
    what = "block device" if is_bdev else "file system's device"
    return _resolve_number(path, f"{path}: its {what}", major, minor, sysfs)


def _resolve_number(path: str, what: str, major: int, minor: int, sysfs: str) -> Resolution:
    node = os.path.join(sysfs, "dev", "block", f"{major}:{minor}")
    if not os.path.isdir(node):
        return Resolution(path, (), f"{what} {major}:{minor} is not in "
                          f"{sysfs}/dev/block (gone, or sysfs is not mounted)")
    drives, reasons = _walk(os.path.realpath(node))
    if drives:
        return Resolution(path, tuple(sorted(drives, key=lambda d: (d.major, d.minor))), None)
    why = "; ".join(dict.fromkeys(reasons)) or "no whole disk found"
    return Resolution(path, (), f"{path}: {why}")


def _walk(start: str) -> tuple[list[Drive], list[str]]:
    """Drives reachable from the sysfs device directory ``start``, and why
    branches ended without one.  Iterative: a deep stack cannot exhaust Python's."""
    drives: dict[tuple[int, int], Drive] = {}
    reasons: list[str] = []
    seen: set[str] = set()
    todo = [start]
    while todo:
        d = todo.pop()
        if os.path.isfile(os.path.join(d, "partition")):
            d = os.path.dirname(d)   # a partition's directory sits in its disk's
        if d in seen:
            continue
        seen.add(d)
        name = os.path.basename(d)
        members = _members(d)
        if members:
            todo.extend(reversed(members))
            continue
        if os.path.isdir(os.path.join(d, "dm")):
            reasons.append(f"{name} is a device-mapper device with no underlying device")
            continue
        if os.path.isdir(os.path.join(d, "md")):
            reasons.append(f"{name} is an md array with no member device")
            continue
        numbers = _dev_numbers(d)
        if numbers is None:
            reasons.append(f"{name} has no readable dev file in sysfs")
            continue
        drives.setdefault(numbers, Drive(name, *numbers))
    return list(drives.values()), reasons


def _members(d: str) -> list[str]:
    """The sysfs directories of the devices under ``d`` (``slaves/``), sorted by name."""
    slaves = os.path.join(d, "slaves")
    try:
        names = sorted(os.listdir(slaves))
    except OSError:
        return []
    out = []
    for n in names:
        target = os.path.realpath(os.path.join(slaves, n))
        if os.path.isdir(target):  # a dangling link: a member that is going away
            out.append(target)
    return out


def _dev_numbers(d: str) -> tuple[int, int] | None:
    try:
        with open(os.path.join(d, "dev")) as f:
            major, _, minor = f.read().strip().partition(":")
        return int(major), int(minor)
    except (OSError, ValueError):
        return None


# ---- file systems without a block device -------------------------------------------


def _anonymous_reason(path: str, major: int, minor: int) -> str:
    kind = _fs_type(path, f"{major}:{minor}")
    text = (f"{path} is on {kind} (device {major}:{minor}), a file system with no block "
            "device of its own")
    if kind == "btrfs":
        text += (" (btrfs numbers its subvolumes anonymously; its devices are in "
                 "/sys/fs/btrfs/UUID/devices, not followed)")
    return text


def _fs_type(path: str, dev: str) -> str:
    """The type of the file system ``path`` is on: the mount with device ``dev``,
    else the mount point that holds ``path`` (btrfs subvolumes have their own numbers)."""
    real = os.path.realpath(path)
    best, by_path = "", "an unknown file system"
    try:
        with open(MOUNTINFO) as f:
            lines = f.readlines()
    except OSError:
        return by_path
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right.split():
            continue
        kind = right.split()[0]
        if fields[2] == dev:
            return kind
        mnt = fields[4].replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, by_path = mnt, kind
    return by_path
