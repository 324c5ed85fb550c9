"""Which drives the monitor watches: the ublkml devices of the host, and the user's.

Devices are found as ``ublkml list`` and ``ublkml status`` find them: the
servers' state files and admin sockets in ``$UBLKML_STATE_DIR`` (and its
``-ctl`` fall-back for sockets).  Each live server's ``status`` reply maps its
completion paths to drives (``paths[].drives``); a server that predates that
field is mapped here from its target's backing files through
:func:`ublk_driver.drives.drives_of`.

Where the monitor *measures* a drive: at the drive itself, unless the file
system of the path sits on a stacked device (dm, md) built on that one drive
alone - then at that device, whose latency includes everything the stack adds
on the way down (a dm-delay, dm-crypt or LVM layer over the disk): the latency
the device's users get.  A stacked device over several drives (RAID) is not
attributed to any one of them: its members are measured one by one.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernel_agent.accounting import BlockDevice, resolve_device
from kernel_agent.errors import UnknownDeviceError
from ublk_driver.admin import AdminClient, AdminError
from ublk_driver.admin.paths import default_state_dir, fallback_path, socket_path

_DEV_FILE = re.compile(r"^(\d+)\.(json|sock)$")


def whole_device(spec: str) -> BlockDevice:
    """``sda``, ``/dev/sda1``, ``8:1`` -> the whole device (a partition -> its disk)."""
    name = spec
    if spec.startswith("/"):
        try:
            st = os.stat(spec)
        except OSError as e:
            raise UnknownDeviceError(f"no block device {spec}: {e.strerror}") from None
        if not stat.S_ISBLK(st.st_mode):
            raise UnknownDeviceError(f"{spec} is not a block device")
        name = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    if ":" in name:
        link = Path("/sys/dev/block") / name
        if not link.exists():
            raise UnknownDeviceError(f"no block device {spec} (no {link})")
        name = link.resolve().name
    cls = Path("/sys/class/block") / name
    if (cls / "partition").exists():
        name = cls.resolve().parent.name
    return resolve_device(name)


def fs_device(path: str) -> BlockDevice | None:
    """The whole block device a backing file's file system sits on (or the
    backing block device itself); None when it is not a block device (tmpfs,
    an anonymous device)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    dev = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
    try:
        return whole_device(f"{os.major(dev)}:{os.minor(dev)}")
    except UnknownDeviceError:
        return None


def is_stacked(bd: BlockDevice) -> bool:
    """dm, md and the like: a device built on others (``slaves/`` not empty)."""
    slaves = bd.sysfs / "slaves"
    try:
        return slaves.is_dir() and any(slaves.iterdir())
    except OSError:
        return False


@dataclass(frozen=True)
class Use:
    """One completion path of one ublkml device that uses a drive."""

    dev_id: int
    path: int
    leg: bool                # a mirror leg (the path can be demoted)
    backing: str | None

    def to_json(self) -> dict[str, Any]:
        return {"dev_id": self.dev_id, "path": self.path, "leg": self.leg,
                "backing": self.backing}


@dataclass
class PathInfo:
    index: int
    backing: str | None
    drives: list[BlockDevice]
    no_drive: str | None
    errors: int | None       # the server's own count of failed I/Os on the path

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "backing": self.backing,
                "drives": [d.name for d in self.drives], "no_drive": self.no_drive,
                "errors": self.errors}


@dataclass
class DeviceInfo:
    dev_id: int
    bdev: str | None = None
    target: str | None = None
    mirror: bool = False
    paths: list[PathInfo] = field(default_factory=list)
    error: str | None = None  # why it could not be asked

    def to_json(self) -> dict[str, Any]:
        return {"bdev": self.bdev, "target": self.target, "mirror": self.mirror,
                "paths": [p.to_json() for p in self.paths], "error": self.error}


@dataclass
class Topology:
    """Every drive of the host the monitor watches, and who uses it."""

    drives: dict[str, BlockDevice] = field(default_factory=dict)
    measured_at: dict[str, BlockDevice] = field(default_factory=dict)
    users: dict[str, list[Use]] = field(default_factory=dict)
    named: set[str] = field(default_factory=set)
    devices: dict[int, DeviceInfo] = field(default_factory=dict)

    def add_drive(self, drive: BlockDevice, at: BlockDevice | None = None) -> None:
        self.drives.setdefault(drive.name, drive)
        if at is not None and at.name != drive.name:
            self.measured_at[drive.name] = at
        else:
            self.measured_at.setdefault(drive.name, drive)


def device_ids(state_dir: str | None = None) -> list[int]:
    """The ublkml devices that left a state file or an admin socket."""
    sd = state_dir or default_state_dir()
    ids: set[int] = set()
    for d in (sd, os.path.dirname(fallback_path(socket_path(0, sd)))):
        with contextlib.suppress(OSError):
            for name in os.listdir(d):
                m = _DEV_FILE.match(name)
                if m:
                    ids.add(int(m.group(1)))
    return sorted(ids)


DrivesOf = Callable[[str], Iterable[Any]]


def _default_drives_of() -> DrivesOf | None:
    try:
        from ublk_driver.drives import drives_of
    except ImportError:
        return None
    return drives_of


def _to_block(d: Any) -> BlockDevice | None:
    """A drive from a status reply (``{"name", "dev"}``) or ``ublk_driver.drives.Drive``."""
    if isinstance(d, dict):
        name, dev = d.get("name"), d.get("dev")
    else:
        name, dev = getattr(d, "name", None), getattr(d, "dev", None)
    if not isinstance(name, str) or not isinstance(dev, str) or ":" not in dev:
        return None
    try:
        major, minor = (int(x) for x in dev.split(":"))
    except ValueError:
        return None
    return BlockDevice(name, major, minor)


def paths_of(reply: dict[str, Any], drives_of: DrivesOf | None = None) -> list[PathInfo]:
    """The completion paths of a status reply and their drives."""
    legs = reply.get("legs") if isinstance(reply.get("legs"), list) else []
    errors: dict[int, int] = {}
    for leg in legs or []:
        if isinstance(leg, dict) and isinstance(leg.get("leg"), int):
            errors[leg["leg"]] = int(leg.get("errors") or 0)
    if not errors:
        queues = (reply.get("stats") or {}).get("queues") or []
        with contextlib.suppress(TypeError, ValueError):
            errors[0] = sum(int(q.get("errors") or 0) for q in queues if isinstance(q, dict))
    out: list[PathInfo] = []
    if isinstance(reply.get("paths"), list) and reply["paths"]:
        for p in reply["paths"]:
            if not isinstance(p, dict) or not isinstance(p.get("index"), int):
                continue
            found = [b for b in map(_to_block, p.get("drives") or []) if b is not None]
            out.append(PathInfo(p["index"], p.get("backing"), found, p.get("no_drive"),
                                errors.get(p["index"])))
        return out
    # A server without "paths": map its target's backing files here.
    target = reply.get("target") or {}
    backings: list[str | None]
    if isinstance(target.get("legs"), list):
        backings = [str(b) for b in target["legs"]]
    else:
        backings = [str(target["backing"]) if target.get("backing") else None]
    fn = drives_of or _default_drives_of()
    for i, backing in enumerate(backings):
        drives: list[BlockDevice] = []
        why: str | None = None
        if backing is None:
            why = f"{target.get('target', 'this')} target has no backing file"
        elif fn is None:
            why = "cannot map files to drives (ublk_driver.drives is not available)"
        else:
            try:
                drives = [b for b in map(_to_block, fn(backing)) if b is not None]
            except (OSError, ValueError) as e:
                why = f"cannot map {backing} to drives: {e}"
            if not drives and why is None:
                why = f"{backing} is on no block device"
        out.append(PathInfo(i, backing, drives, why, errors.get(i)))
    return out


def ask_device(dev_id: int, state_dir: str | None = None, timeout: float = 2.0,
               drives_of: DrivesOf | None = None) -> DeviceInfo:
    """One device's paths and drives, from its server's status reply."""
    info = DeviceInfo(dev_id)
    try:
        reply = AdminClient(dev_id, timeout=timeout, state_dir=state_dir).call("status")
    except AdminError as e:
        info.error = str(e)
        return info
    target = reply.get("target") or {}
    info.bdev = reply.get("bdev")
    info.target = target.get("target")
    info.mirror = isinstance(reply.get("legs"), list) or info.target == "mirror"
    info.paths = paths_of(reply, drives_of)
    return info


def build_topology(named: Iterable[BlockDevice], devices: Iterable[DeviceInfo]) -> Topology:
    """The drives to watch: the user's, and those under every device's paths."""
    topo = Topology()
    for bd in named:
        topo.add_drive(bd)
        topo.named.add(bd.name)
    for info in devices:
        topo.devices[info.dev_id] = info
        for p in info.paths:
            at = fs_device(p.backing) if p.backing else None
            for drive in p.drives:
                # Measure above the drive only where that device is built on it alone.
                stacked = (at is not None and len(p.drives) == 1 and at.name != drive.name
                           and is_stacked(at))
                topo.add_drive(drive, at if stacked else None)
                topo.users.setdefault(drive.name, []).append(
                    Use(info.dev_id, p.index, info.mirror, p.backing))
    return topo
