"""Scratch storage in RAM for the files behind a device: ext4 on a brd RAM disk.

Why not tmpfs: shmem files have no FMODE_NOWAIT, so io_uring hands every
read and write on them to an io-wq worker thread; a loop or mirror target
over tmpfs files then measures tmpfs's io_uring support, not the target.
ext4 on a block device is also what such a target is used on.

:func:`ram_ext4` needs root and the ``brd`` module; where it cannot be had it
raises :class:`ScratchUnavailableError` before touching anything, and callers
fall back to tmpfs and say so.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ublk_driver.core.errors import UblkError

__all__ = ["RAM_DISK", "ScratchUnavailableError", "loop_device", "ram_ext4", "unload_module",
           "with_sbin"]

#: The brd disk this module creates (``rd_nr=1``): it refuses to run if it exists.
RAM_DISK = "/dev/ram0"
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class ScratchUnavailableError(UblkError):
    """ext4 on brd cannot be set up here (the message says why)."""


def with_sbin(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the sbin directories on PATH (modprobe, mkfs, losetup live there)."""
    path = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join(p for p in [*path, *(d for d in _SBIN if d not in path)] if p)
    return env


def _sh(argv: Sequence[str], what: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=120,
                              check=False, env=with_sbin(dict(os.environ)))
    except FileNotFoundError:
        raise ScratchUnavailableError(f"{argv[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise ScratchUnavailableError(f"{what} did not finish within 120 s") from None
    if check and proc.returncode != 0:
        text = (proc.stderr.strip() or proc.stdout.strip() or "(no output)").splitlines()
        raise ScratchUnavailableError(f"{what} failed (exit {proc.returncode}): {text[-1]}")
    return proc


def unload_module(module: str) -> bool:
    """rmmod ``module``, retrying for 5 s; whether it is gone."""
    # The last opener may take a moment to let go (udev, a closing fio).
    for _ in range(20):
        if not Path(f"/sys/module/{module}").exists():
            return True
        if _sh(["rmmod", module], f"rmmod {module}", check=False).returncode == 0:
            return True
        time.sleep(0.25)
    return False


@contextlib.contextmanager
def loop_device(backing: Path, *, direct_io: bool = False) -> Iterator[str]:
    """A kernel loop device over the file ``backing`` for the block (``/dev/loopN``).

    Needs root; raises :class:`ScratchUnavailableError` (losetup's own reason)
    where the device cannot be set up, and detaches it afterwards.
    """
    argv = ["losetup", "-f", "--show", *(["--direct-io=on"] if direct_io else []), str(backing)]
    dev = _sh(argv, "losetup").stdout.strip()
    try:
        yield dev
    finally:
        _sh(["losetup", "-d", dev], f"losetup -d {dev}", check=False)


@contextlib.contextmanager
def ram_ext4(mountpoint: Path, size: int) -> Iterator[dict[str, Any]]:
    """ext4 on a ``size``-byte brd RAM disk, mounted at ``mountpoint`` for the block.

    Yields facts for a report (``filesystem``, ``device``, ``device_bytes``);
    unmounts and unloads brd afterwards, whatever happened.  Raises
    :class:`ScratchUnavailableError` where brd is in use or cannot be loaded.
    """
    if Path(RAM_DISK).exists():
        raise ScratchUnavailableError(f"{RAM_DISK} exists already (brd in use): not touching it")
    _sh(["modprobe", "brd", "rd_nr=1", f"rd_size={size >> 10}"], "modprobe brd")
    mounted = False
    try:
        deadline = time.monotonic() + 10
        while not Path(RAM_DISK).exists():
            if time.monotonic() > deadline:
                raise ScratchUnavailableError(f"timed out after 10 s waiting for {RAM_DISK}")
            time.sleep(0.05)
        _sh(["mkfs.ext4", "-q", "-F", RAM_DISK], f"mkfs.ext4 {RAM_DISK}")
        mountpoint.mkdir(parents=True, exist_ok=True)
        _sh(["mount", "-t", "ext4", RAM_DISK, str(mountpoint)], f"mount {RAM_DISK}")
        mounted = True
        yield {"filesystem": "ext4", "device": f"{RAM_DISK} (brd)", "device_bytes": size}
    finally:
        if mounted:
            _sh(["umount", str(mountpoint)], "umount", check=False)
        unload_module("brd")
