"""What the kernel's unprivileged ublk mode (UBLK_F_UNPRIVILEGED_DEV) does, probed.

Run as root where /dev/ublk-control exists (the test bed:
``ublkml vm run -- python scripts/unprivileged_probe.py``).  It opens the
control device to everyone (as udev's ``MODE="0666"`` rule would), then, as
uid/gid 65534, sends ADD_DEV without and with the flag and a few commands
without the char device path that unprivileged devices require; then the
same commands as root.  Prints one line per step; ublkml itself never sets
the flag (see docs/reliability.md, "Unprivileged devices").
"""

from __future__ import annotations

import errno
import os
import stat
import sys

from ublk_driver import _bindings
from ublk_driver.control import Control
from ublk_driver.uapi import (
    DEV_ID_AUTO,
    DEV_INFO_SIZE,
    QUEUE_ID_NONE,
    Cmd,
    DevInfo,
    Feature,
    ctrl_opcode,
)

CTRL = "/dev/ublk-control"


def step(what: str, ret: int) -> None:
    text = "ok" if ret >= 0 else f"-{errno.errorcode.get(-ret, -ret)}"
    print(f"  {what}: {text}", flush=True)


def probe(as_uid: int) -> int | None:
    ring = _bindings.CtrlRing(CTRL)
    feats = Control().features if as_uid == 0 else 0
    dev = None
    for flags, name in ((0, "ADD_DEV without the flag"),
                        (int(Feature.UNPRIVILEGED_DEV), "ADD_DEV with UNPRIVILEGED_DEV")):
        info = DevInfo(nr_hw_queues=1, queue_depth=32, max_io_buf_bytes=65536,
                       dev_id=DEV_ID_AUTO, ublksrv_pid=os.getpid(),
                       flags=flags | int(Feature.CMD_IOCTL_ENCODE))
        buf = bytearray(info.pack())
        ret = ring.cmd(ctrl_opcode(Cmd.ADD_DEV, True), DEV_ID_AUTO, QUEUE_ID_NONE, buf)
        step(name, ret)
        if ret >= 0:
            got = DevInfo.unpack(bytes(buf))
            unpriv = bool(got.flags & Feature.UNPRIVILEGED_DEV)
            print(f"    device {got.dev_id}: UNPRIVILEGED_DEV kept: {unpriv}, owner "
                  f"{got.owner_uid}:{got.owner_gid}", flush=True)
            cdev = f"/dev/ublkc{got.dev_id}"
            if os.path.exists(cdev):
                st = os.stat(cdev)
                print(f"    {cdev}: {stat.filemode(st.st_mode)} {st.st_uid}:{st.st_gid} "
                      "(no udev here: nobody changed it)", flush=True)
            dev = got.dev_id if dev is None else dev
            if not unpriv:  # root: the kernel dropped the flag, a normal device
                ret = ring.cmd(ctrl_opcode(Cmd.DEL_DEV, True), got.dev_id, QUEUE_ID_NONE, None)
                step(f"DEL_DEV {got.dev_id} (a normal device)", ret)
                dev = None
    if dev is not None:
        for cmd in (Cmd.GET_DEV_INFO, Cmd.GET_DEV_INFO2, Cmd.DEL_DEV):
            buf = bytearray(DEV_INFO_SIZE) if cmd != Cmd.DEL_DEV else None
            step(f"{cmd.name} on device {dev} without the char device path",
                 ring.cmd(ctrl_opcode(cmd, True), dev, QUEUE_ID_NONE, buf))
    if feats:
        print(f"  GET_FEATURES lists UNPRIVILEGED_DEV: {bool(feats & Feature.UNPRIVILEGED_DEV)}")
    ring.close()
    return dev


def main() -> int:
    if os.geteuid() != 0:
        print("run as root (it drops to uid 65534 itself)", file=sys.stderr)
        return 2
    print(f"kernel {os.uname().release}")
    print("as root:")
    probe(0)
    os.chmod(CTRL, 0o666)
    pid = os.fork()
    if pid == 0:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        print("as uid 65534, /dev/ublk-control mode 0666:", flush=True)
        try:
            dev = probe(65534)
        except OSError as e:
            print(f"  {e}")
            os._exit(1)
        os._exit(0 if dev is None else 10 + dev)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code >= 10:
        dev = code - 10
        print(f"as root, the unprivileged device {dev}:")
        ring = _bindings.CtrlRing(CTRL)
        for cmd in (Cmd.GET_DEV_INFO, Cmd.DEL_DEV):
            buf = bytearray(DEV_INFO_SIZE) if cmd != Cmd.DEL_DEV else None
            step(f"{cmd.name} without the char device path",
                 ring.cmd(ctrl_opcode(cmd, True), dev, QUEUE_ID_NONE, buf))
        ring.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
