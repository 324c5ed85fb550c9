"""Faults from below: the backing store fails, fills up, is unlinked or shrinks.

Each case drives a real device (marked ``ublk``: natively where the driver
exists, else in the test bed) and checks that the fault reaches the reader
or writer as an error, never as silent success or wrong data, and that the
device stays LIVE, its server keeps running and reports the fault (its log
and ``ublkml status``).  Reads and writes use O_DIRECT, so that the ublk
device's page cache never answers for the backing store.
"""

from __future__ import annotations

import errno
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ublk_driver.ublk_helpers import (
    Device,
    device,
    read_direct,
    sh,
    ublkml,
    write_direct,
)

pytestmark = pytest.mark.ublk

MIB = 1 << 20
BLOCK = 4096


def make_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def pattern(block: int, version: int = 0) -> bytes:
    """4 KiB that name their block and version: a misplaced block shows."""
    head = f"block {block:08d} version {version:04d} ".encode()
    return (head * (BLOCK // len(head) + 1))[:BLOCK]


def status(d: Device) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(ublkml("status", "-n", str(d.dev_id), "--json").stdout)
    return doc


def queue0(d: Device) -> dict[str, Any]:
    q: dict[str, Any] = status(d)["stats"]["queues"][0]
    return q


def assert_up(d: Device) -> None:
    listed = {r["dev_id"]: r for r in json.loads(ublkml("list", "--json").stdout)}
    assert listed[d.dev_id]["state"] == "LIVE"
    assert os.path.exists(f"/proc/{d.info['pid']}"), "the server died"


def wait_log(d: Device, text: str, timeout: float = 10) -> str:
    """The server's log once it contains ``text`` (ErrorWatch writes once a second)."""
    path = Path(d.info["log"])
    deadline = time.monotonic() + timeout
    while True:
        log = path.read_text(errors="replace")
        if text in log:
            return log
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the server's log {path}:\n{log[-2000:]}")
        time.sleep(0.2)


def os_error(fn: Callable[[], object]) -> int:
    """The errno ``fn`` fails with (it must fail)."""
    with pytest.raises(OSError) as exc:
        fn()
    assert exc.value.errno is not None
    return exc.value.errno


def fault(d: Device, *args: str) -> None:
    ublkml("fault", *args, "-n", str(d.dev_id))


# ---- injected backing errors ------------------------------------------------------


@pytest.fixture
def loop_dev(tmp_path: Path) -> Iterator[Device]:
    backing = make_file(tmp_path / "b.img", 16 * MIB)
    with device("-t", "loop", "-f", str(backing)) as d:
        yield d


def test_injected_read_errors_are_eio_and_reported(loop_dev: Device) -> None:
    d = loop_dev
    data = b"".join(pattern(b) for b in range(16))
    write_direct(d.bdev, 0, data)
    fault(d, "set", "errors=1,ops=read")
    assert os_error(lambda: read_direct(d.bdev, 0, BLOCK)) == errno.EIO
    assert os_error(lambda: read_direct(d.bdev, 8 * BLOCK, 64 * 1024)) == errno.EIO
    write_direct(d.bdev, 16 * BLOCK, pattern(16))  # writes are not hit (ops=read)
    q = queue0(d)
    assert q["errors"] >= 2
    assert q["last_error"]["errno"] == "EIO" and q["last_error"]["op"] == "READ"
    assert status(d)["faults"]["0"]["error_ppm"] == 1_000_000
    wait_log(d, "EIO on READ")
    assert_up(d)
    fault(d, "clear")
    assert read_direct(d.bdev, 0, 16 * BLOCK) == data  # nothing was damaged


def test_injected_write_and_flush_errors_carry_their_errno(loop_dev: Device) -> None:
    d = loop_dev
    write_direct(d.bdev, 0, pattern(0))
    fault(d, "set", "errors=1,ops=write,errno=ENOSPC")
    # The block layer passes ENOSPC through (BLK_STS_NOSPC); accept EIO too.
    assert os_error(lambda: write_direct(d.bdev, 0, pattern(0, 1))) in (errno.ENOSPC,
                                                                       errno.EIO)
    assert read_direct(d.bdev, 0, BLOCK) == pattern(0)  # the failed write did nothing
    fault(d, "set", "errors=1,ops=flush")
    fd = os.open(d.bdev, os.O_WRONLY)
    try:
        os.write(fd, pattern(1))
        assert os_error(lambda: os.fsync(fd)) == errno.EIO
    finally:
        fault(d, "clear")
        os.close(fd)
    assert queue0(d)["last_error"]["op"] in ("FLUSH", "WRITE")
    wait_log(d, "on FLUSH")
    assert_up(d)
    write_direct(d.bdev, 0, pattern(0, 2))
    assert read_direct(d.bdev, 0, BLOCK) == pattern(0, 2)


def test_random_errors_never_return_wrong_data(tmp_path: Path) -> None:
    """30 % of reads, then of writes, fail: every read that succeeds returns the
    block's data; every write that succeeded is there, every one that failed
    left the old data (on the device and in the backing file)."""
    backing = make_file(tmp_path / "b.img", 16 * MIB)
    n = 256
    with device("-t", "loop", "-f", str(backing)) as d:
        write_direct(d.bdev, 0, b"".join(pattern(b) for b in range(n)))
        fault(d, "set", "errors=0.3,ops=read,seed=7")
        rnd = random.Random(7)
        outcomes = {"ok": 0, "eio": 0}
        for _ in range(300):
            b = rnd.randrange(n)
            try:
                got = read_direct(d.bdev, b * BLOCK, BLOCK)
            except OSError as e:
                assert e.errno == errno.EIO
                outcomes["eio"] += 1
                continue
            assert got == pattern(b), f"block {b}: wrong data"
            outcomes["ok"] += 1
        assert outcomes["ok"] > 100 and outcomes["eio"] > 30, outcomes
        fault(d, "set", "errors=0.3,ops=write,seed=8")
        written = set()
        for b in range(n):
            try:
                write_direct(d.bdev, b * BLOCK, pattern(b, 1))
                written.add(b)
            except OSError as e:
                assert e.errno == errno.EIO
        assert 100 < len(written) < n - 30
        fault(d, "clear")
        now = read_direct(d.bdev, 0, n * BLOCK)
        for b in range(n):
            want = pattern(b, 1) if b in written else pattern(b)
            assert now[b * BLOCK:(b + 1) * BLOCK] == want, f"block {b}"
        assert_up(d)
    with open(backing, "rb") as f:
        assert f.read(n * BLOCK) == now


def test_mirror_fails_over_then_reports_eio_when_no_leg_is_left(tmp_path: Path) -> None:
    legs = [make_file(tmp_path / f"leg{i}.img", 8 * MIB) for i in range(2)]
    with device("-t", "mirror", "--leg", str(legs[0]), "--leg", str(legs[1])) as d:
        data = b"".join(pattern(b) for b in range(64))
        write_direct(d.bdev, 0, data)
        fault(d, "set", "--path", "1", "errors=1,ops=read")
        for b in range(0, 64, 4):  # round robin would send half of these to leg 1
            assert read_direct(d.bdev, b * BLOCK, 4 * BLOCK) == data[b * BLOCK:(b + 4) * BLOCK]
        st = status(d)
        assert [leg["state"] for leg in st["legs"]] == ["active", "failed"]
        assert st["legs"][1]["errors"] >= 1
        fault(d, "set", "--path", "0", "errors=1,ops=read")
        assert os_error(lambda: read_direct(d.bdev, 0, BLOCK)) == errno.EIO
        assert queue0(d)["last_error"]["errno"] == "EIO"
        wait_log(d, "EIO on READ")
        assert_up(d)
        fault(d, "clear")
        assert read_direct(d.bdev, 0, 64 * BLOCK) == data


# ---- a full backing store ------------------------------------------------------------


def test_backing_store_full_is_enospc_and_in_space_io_goes_on(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt))
    try:
        backing = make_file(mnt / "b.img", 32 * MIB)  # sparse: 32 MiB on 8 MiB of room
        with device("-t", "loop", "-f", str(backing)) as d:
            chunk = MIB
            full_at = None
            for i in range(16):
                data = bytes([i + 1]) * chunk
                try:
                    write_direct(d.bdev, i * chunk, data)
                except OSError as e:
                    assert e.errno in (errno.ENOSPC, errno.EIO), e
                    full_at = i
                    break
            assert full_at is not None and 4 <= full_at <= 8, full_at
            q = queue0(d)
            assert q["last_error"]["errno"] == "ENOSPC" and q["last_error"]["op"] == "WRITE"
            wait_log(d, "ENOSPC on WRITE")
            assert_up(d)
            # In-space I/O goes on: what was written reads back, can be rewritten.
            assert read_direct(d.bdev, 0, chunk) == bytes([1]) * chunk
            write_direct(d.bdev, 0, b"\x77" * chunk)
            assert read_direct(d.bdev, 0, chunk) == b"\x77" * chunk
            # Discarding punches holes in the file: room again for the write that failed.
            sh("blkdiscard", "-o", str(chunk), "-l", str(3 * chunk), d.bdev)
            write_direct(d.bdev, full_at * chunk, b"\x88" * chunk)
            assert read_direct(d.bdev, full_at * chunk, chunk) == b"\x88" * chunk
            assert read_direct(d.bdev, chunk, chunk) == bytes(chunk)
    finally:
        sh("umount", str(mnt), check=False)


# ---- the backing file unlinked or truncated under the device --------------------------


def test_unlinked_backing_file_keeps_serving_its_open_inode(tmp_path: Path) -> None:
    backing = make_file(tmp_path / "b.img", 16 * MIB)
    with device("-t", "loop", "-f", str(backing)) as d:
        write_direct(d.bdev, 0, pattern(0))
        backing.unlink()
        write_direct(d.bdev, MIB, pattern(256))
        assert read_direct(d.bdev, 0, BLOCK) == pattern(0)
        assert read_direct(d.bdev, MIB, BLOCK) == pattern(256)
        assert queue0(d)["errors"] == 0  # nothing failed: there is no fault to report
        assert_up(d)
    assert not backing.exists()


def test_truncated_backing_file_reads_past_its_end_fail(tmp_path: Path) -> None:
    backing = make_file(tmp_path / "b.img", 16 * MIB)
    with device("-t", "loop", "-f", str(backing)) as d:
        for off in (0, 6 * MIB, 8 * MIB):
            write_direct(d.bdev, off, pattern(off // BLOCK))
        os.truncate(backing, 4 * MIB)
        assert read_direct(d.bdev, 0, BLOCK) == pattern(0)  # below the new end: intact
        # Past the new end, and across it: an I/O error, never stale data.
        assert os_error(lambda: read_direct(d.bdev, 8 * MIB, BLOCK)) == errno.EIO
        assert os_error(lambda: read_direct(d.bdev, 4 * MIB - BLOCK, 2 * BLOCK)) == errno.EIO
        q = queue0(d)
        assert q["last_error"] == {"errno": "EIO", "op": "READ", "offset": 4 * MIB - BLOCK}
        wait_log(d, "EIO on READ")
        assert_up(d)
        # A write past the end extends the file again (a hole up to it).
        write_direct(d.bdev, 8 * MIB, pattern(9999))
        assert read_direct(d.bdev, 8 * MIB, BLOCK) == pattern(9999)
        assert os.path.getsize(backing) == 8 * MIB + BLOCK
        # The hole reads as zeros: the data truncated away is gone, not resurrected.
        assert read_direct(d.bdev, 6 * MIB, BLOCK) == bytes(BLOCK)
        assert_up(d)
