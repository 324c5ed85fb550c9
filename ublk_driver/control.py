"""The control plane: ``/dev/ublk-control`` commands for a device's lifecycle.

Every method sends one command and waits for it.  Feature probing happens once
per :class:`Control`: ``GET_FEATURES`` says whether the kernel takes the
ioctl-encoded opcodes (6.4+); when it does not, or cannot even answer, the
legacy opcodes are used.
"""

from __future__ import annotations

import errno
import os
import re
import time
from types import TracebackType

from ublk_driver import _bindings
from ublk_driver.core.errors import ControlError, DeviceNotFoundError, DriverUnavailableError
from ublk_driver.uapi import (
    DEV_INFO_SIZE,
    PARAMS_SIZE,
    QUEUE_ID_NONE,
    Cmd,
    DevInfo,
    Feature,
    Params,
    ctrl_opcode,
)

CONTROL_PATH = "/dev/ublk-control"

# Flags the server asks for when the kernel has them; the kernel masks the
# rest and we read back what was negotiated.
WANTED_FLAGS = Feature.CMD_IOCTL_ENCODE


def driver_available(path: str = CONTROL_PATH) -> bool:
    return os.path.exists(path)


def cdev_path(dev_id: int) -> str:
    return f"/dev/ublkc{dev_id}"


def bdev_path(dev_id: int) -> str:
    return f"/dev/ublkb{dev_id}"


def bdev_openers(dev_id: int, proc: str = "/proc") -> list[tuple[int, str]]:
    """(pid, command name) of the processes that hold ``/dev/ublkbN`` open.

    A deleted device's node is gone from /dev, but its openers still show it
    in /proc/PID/fd as ``/dev/ublkbN (deleted)``; they are what keeps the
    kernel from freeing the device.
    """
    path = bdev_path(dev_id)
    found = []
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"{proc}/{entry}/fd")
        except OSError:
            continue  # exited, or not ours to look at
        for fd in fds:
            try:
                target = os.readlink(f"{proc}/{entry}/fd/{fd}")
            except OSError:
                continue
            if target in (path, f"{path} (deleted)"):
                try:
                    with open(f"{proc}/{entry}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
                found.append((int(entry), comm))
                break
    return sorted(found)


def still_open_message(dev_id: int) -> str:
    """What to say of a deleted device the kernel has not freed yet: who holds it."""
    found = bdev_openers(dev_id)
    who = (", ".join(f"pid {pid} ({comm})" for pid, comm in found) if found
           else "a process not visible here")
    return (f"device {dev_id} deleted, but {bdev_path(dev_id)} is still open by {who}: "
            f"the kernel frees id {dev_id} once that is closed")


class Control:
    """A handle on the ublk control device."""

    def __init__(self, path: str = CONTROL_PATH) -> None:
        if not os.path.exists(path):
            raise DriverUnavailableError(
                errno.ENOENT,
                f"{path} does not exist: the ublk driver is not loaded "
                "(run `modprobe ublk_drv` as root, or use the test bed: `ublkml vm run -- ...`)",
            )
        try:
            self._ring = _bindings.CtrlRing(path)
        except OSError as e:
            raise DriverUnavailableError(
                e.errno or errno.EIO, f"cannot use {path}: {e.strerror} (are you root?)"
            ) from None
        self.features = self._probe_features()
        self.ioctl_encode = bool(self.features & Feature.CMD_IOCTL_ENCODE)

    def close(self) -> None:
        self._ring.close()

    def __enter__(self) -> Control:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- plumbing -----------------------------------------------------------

    def _probe_features(self) -> int:
        buf = bytearray(8)
        for encode in (True, False):
            ret = self._ring.cmd(ctrl_opcode(Cmd.GET_FEATURES, encode), 0, QUEUE_ID_NONE, buf)
            if ret >= 0:
                return int.from_bytes(buf, "little")
        return 0  # a kernel older than GET_FEATURES (6.5): legacy opcodes only

    def _cmd(self, cmd: Cmd, dev_id: int, buf: bytearray | None = None,
             data0: int = 0) -> int:
        ret = self._ring.cmd(ctrl_opcode(cmd, self.ioctl_encode), dev_id, QUEUE_ID_NONE, buf,
                             data0)
        if ret < 0:
            err = -ret
            name = cmd.name
            if err == errno.ENODEV and cmd not in (Cmd.ADD_DEV,):
                raise DeviceNotFoundError(
                    name, err, f"no ublk device with id {dev_id} (see `ublkml list`)"
                )
            if err == errno.EEXIST and cmd == Cmd.ADD_DEV:
                raise ControlError(name, err, f"ublk device id {dev_id} is already in use "
                                   "(pick another -n, or omit it)")
            raise ControlError(name, err)
        return ret

    # ---- commands -----------------------------------------------------------

    def add(self, info: DevInfo) -> DevInfo:
        """ADD_DEV; returns the info the kernel negotiated (id, queues, flags)."""
        buf = bytearray(info.pack())
        self._cmd(Cmd.ADD_DEV, info.dev_id, buf)
        return DevInfo.unpack(bytes(buf))

    def get_info(self, dev_id: int) -> DevInfo:
        buf = bytearray(DEV_INFO_SIZE)
        self._cmd(Cmd.GET_DEV_INFO, dev_id, buf)
        return DevInfo.unpack(bytes(buf))

    def set_params(self, dev_id: int, params: Params) -> None:
        self._cmd(Cmd.SET_PARAMS, dev_id, bytearray(params.pack()))

    def get_params(self, dev_id: int) -> Params:
        buf = bytearray(Params(types=0).pack())
        self._cmd(Cmd.GET_PARAMS, dev_id, buf)
        return Params.unpack(bytes(buf[:PARAMS_SIZE]))

    def start(self, dev_id: int, pid: int) -> None:
        """START_DEV: blocks until every tag of every queue has a FETCH outstanding."""
        self._cmd(Cmd.START_DEV, dev_id, None, data0=pid)

    def start_recovery(self, dev_id: int) -> None:
        """START_USER_RECOVERY: -EBUSY until the dead server's char device is
        released and the kernel has quiesced the device."""
        self._cmd(Cmd.START_USER_RECOVERY, dev_id)

    def end_recovery(self, dev_id: int, pid: int) -> None:
        """END_USER_RECOVERY: like START_DEV, waits for every tag's FETCH."""
        self._cmd(Cmd.END_USER_RECOVERY, dev_id, None, data0=pid)

    def stop(self, dev_id: int) -> None:
        self._cmd(Cmd.STOP_DEV, dev_id)

    def delete(self, dev_id: int) -> None:
        """DEL_DEV: stops and removes the device, then waits until the kernel
        has freed it: until its server has closed the char device *and* every
        process holding ``/dev/ublkbN`` open has closed it, however long."""
        self._cmd(Cmd.DEL_DEV, dev_id)

    def delete_async(self, dev_id: int) -> bool:
        """DEL_DEV_ASYNC: what DEL_DEV does, without the wait (see
        :meth:`wait_freed`).  False, and nothing done, when the kernel has no
        such command (before 6.9, or legacy opcodes only)."""
        if not self.ioctl_encode:
            return False
        try:
            self._cmd(Cmd.DEL_DEV_ASYNC, dev_id)
        except DeviceNotFoundError:
            raise
        except ControlError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return False
            raise
        return True

    def wait_freed(self, dev_id: int, timeout: float, poll: float = 0.05) -> bool:
        """Until the kernel has freed device ``dev_id`` (its id is free again);
        False if it has not after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get_info(dev_id)
            except DeviceNotFoundError:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)

    def get_queue_affinity(self, dev_id: int, q_id: int) -> set[int]:
        """CPUs that blk-mq maps to queue ``q_id``."""
        buf = bytearray(128)  # a cpumask for up to 1024 CPUs, u64-aligned
        self._cmd(Cmd.GET_QUEUE_AFFINITY, dev_id, buf, data0=q_id)
        mask = int.from_bytes(buf, "little")
        return {cpu for cpu in range(len(buf) * 8) if mask >> cpu & 1}

    def list_ids(self) -> list[int]:
        """Ids of the ublk devices that exist (from sysfs, then /dev)."""
        ids: set[int] = set()
        for d in ("/sys/class/ublk-char", "/dev"):
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for n in names:
                m = re.fullmatch(r"ublkc(\d+)", n)
                if m:
                    ids.add(int(m.group(1)))
        return sorted(ids)

    def list_devices(self) -> list[DevInfo]:
        out = []
        for dev_id in self.list_ids():
            try:
                out.append(self.get_info(dev_id))
            except DeviceNotFoundError:
                continue  # deleted while we looked
        return out
