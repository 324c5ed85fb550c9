"""The control plane's helpers that need no driver (host-only)."""

from __future__ import annotations

import os
from pathlib import Path

from ublk_driver.control import bdev_openers


def _proc(root: Path, pid: int, comm: str, fds: dict[int, str]) -> None:
    (root / str(pid) / "fd").mkdir(parents=True)
    (root / str(pid) / "comm").write_text(comm + "\n")
    for fd, target in fds.items():
        os.symlink(target, root / str(pid) / "fd" / str(fd))


def test_openers_of_a_deleted_device_are_found_by_their_fd_links(tmp_path: Path) -> None:
    """A /proc tree made of real symlinks stands in for the kernel's: the
    parsing is under test, not the kernel's (the test bed's del tests are)."""
    _proc(tmp_path, 328, "fio", {0: "/dev/null", 8: "/dev/ublkb7 (deleted)"})
    _proc(tmp_path, 41, "dd", {3: "/dev/ublkb7", 4: "/dev/ublkb7"})
    _proc(tmp_path, 50, "other", {3: "/dev/ublkb70", 4: "/dev/ublkb7x", 5: "/dev/ublkc7"})
    (tmp_path / "self").mkdir()  # not a pid
    assert bdev_openers(7, proc=str(tmp_path)) == [(41, "dd"), (328, "fio")]
    assert bdev_openers(70, proc=str(tmp_path)) == [(50, "other")]
    assert bdev_openers(8, proc=str(tmp_path)) == []

