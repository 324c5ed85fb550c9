"""Every target served through the real ublk driver: fio verify, ext4, discard.

Marked ``ublk``: native where /dev/ublk-control exists, else in the test bed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.ublk_driver.ublk_helpers import (
    device,
    fio,
    job_totals,
    read_direct,
    sh,
    tree_digests,
    ublkml,
    write_direct,
    write_tree,
)

pytestmark = pytest.mark.ublk

SIZE = 64 << 20
PLUGIN = "examples.ramdisk:RamDisk"


def target_args(kind: str, tmp_path: Path) -> list[str]:
    if kind == "mem":
        return ["-t", "mem", "--size", str(SIZE)]
    if kind == "loop":
        backing = tmp_path / "backing.img"
        with open(backing, "wb") as f:
            f.truncate(SIZE)
        return ["-t", "loop", "-f", str(backing)]
    if kind == "python":
        return ["-t", "python", "--plugin", PLUGIN, "--size", str(SIZE)]
    if kind == "null":
        return ["-t", "null", "--size", str(SIZE)]
    raise ValueError(kind)


@pytest.mark.parametrize("queues", [1, 2])
@pytest.mark.parametrize("depth", [1, 32])
@pytest.mark.parametrize("kind", ["mem", "loop", "python"])
def test_fio_write_verify(kind: str, depth: int, queues: int, tmp_path: Path) -> None:
    """Random sizes 4 KiB-1 MiB, written and verified with crc32c."""
    with device(*target_args(kind, tmp_path), "-q", str(queues), "-d", str(max(depth, 32))) as d:
        jobs = ["--numjobs=2", "--cpus_allowed=0-1", "--cpus_allowed_policy=split",
                "--offset_increment=24M"] if queues == 2 else []
        doc = fio(d.bdev, "--rw=randwrite", "--bsrange=4k-1m", f"--iodepth={depth}",
                  "--size=24M", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
                  "--randrepeat=0", *jobs)
        tot = job_totals(doc)
        assert tot["errors"] == 0
        assert tot["write"] == 24 * queues << 20
        assert tot["read"] == tot["write"]  # every written byte was read back and verified


@pytest.mark.parametrize("depth", [1, 32])
@pytest.mark.parametrize("kind", ["loop", "python"])
def test_hybrid_polling_serves_and_verifies(kind: str, depth: int, tmp_path: Path) -> None:
    """--poll-us: queue threads that spin for completions before they sleep
    (the other process_batch branch in the engine) lose nothing, also with
    gaps longer than the spin (depth 1 with think time: the thread sleeps)."""
    with device(*target_args(kind, tmp_path), "-q", "2", "--poll-us", "100") as d:
        doc = fio(d.bdev, "--rw=randwrite", "--bsrange=4k-256k", f"--iodepth={depth}",
                  "--size=16M", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
                  "--randrepeat=0", "--thinktime=300", "--thinktime_blocks=16")
        tot = job_totals(doc)
        assert tot["errors"] == 0
        assert tot["write"] == 16 << 20 and tot["read"] == tot["write"]


def _queue_stats(dev_id: int) -> list[dict[str, Any]]:
    doc = json.loads(ublkml("status", "-n", str(dev_id), "--json").stdout)
    return sorted(doc["stats"]["queues"], key=lambda q: int(q["q_id"]))


def test_queue_processes_serve_one_disk(tmp_path: Path) -> None:
    """--queue-processes: each queue served by a process of its own.  Data
    written through queue 0 (fio on CPU 0) reads back verified through
    queue 1 (fio on CPU 1): the processes serve one disk, and a plug-in
    object copied by fork would fail this.  Then both at once, verified."""
    with device("-t", "python", "--plugin", PLUGIN, "--size", str(SIZE), "-q", "2",
                "--queue-processes") as d:
        same = ["--rw=randwrite", "--bsrange=4k-256k", "--iodepth=16", "--size=32M",
                "--verify=crc32c", "--verify_fatal=1"]  # fio's default seed: same offsets
        tot = job_totals(fio(d.bdev, *same, "--cpus_allowed=0", "--do_verify=0"))
        assert tot["errors"] == 0 and tot["write"] == 32 << 20
        before = _queue_stats(d.dev_id)
        tot = job_totals(fio(d.bdev, *same, "--cpus_allowed=1", "--verify_only"))
        assert tot["errors"] == 0 and tot["read"] == 32 << 20
        after = _queue_stats(d.dev_id)
        pids = {q["pid"] for q in after}
        assert len(pids) == 2 and d.info["pid"] not in pids, after
        # queue 0 took the writes, queue 1 the verifying reads (READ = 0, WRITE = 1)
        assert before[0]["ops"][1] > 0 and before[1]["ops"][1] == 0, before
        assert after[1]["ops"][0] > 0, after
        doc = fio(d.bdev, "--rw=randwrite", "--bsrange=4k-1m", "--iodepth=32",
                  "--size=24M", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
                  "--randrepeat=0", "--numjobs=2", "--cpus_allowed=0-1",
                  "--cpus_allowed_policy=split", "--offset_increment=24M")
        tot = job_totals(doc)
        assert tot["errors"] == 0 and tot["write"] == 48 << 20 and tot["read"] == 48 << 20


@pytest.mark.parametrize("flag", [None, "--queue-threads"])
def test_python_queue_model_default(flag: str | None) -> None:
    """A fork_safe plug-in with two queues gets queue processes unless asked
    for threads (--queue-threads); both serve verified I/O on both queues."""
    with device("-t", "python", "--plugin", PLUGIN, "--size", str(SIZE), "-q", "2",
                *([flag] if flag else [])) as d:
        assert d.info["queue_processes"] is (flag is None)
        doc = fio(d.bdev, "--rw=randwrite", "--bs=64k", "--iodepth=8", "--size=8M",
                  "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--numjobs=2",
                  "--cpus_allowed=0-1", "--cpus_allowed_policy=split",
                  "--offset_increment=8M")
        tot = job_totals(doc)
        assert tot["errors"] == 0 and tot["write"] == 16 << 20 and tot["read"] == 16 << 20
        pids = {q.get("pid") for q in _queue_stats(d.dev_id)}
        if flag is None:
            assert len(pids) == 2 and d.info["pid"] not in pids, pids
        else:
            assert pids <= {None, d.info["pid"]}, pids


@pytest.mark.parametrize("queues", [1, 2])
def test_null_target_serves_fio(queues: int, tmp_path: Path) -> None:
    with device(*target_args("null", tmp_path), "-q", str(queues)) as d:
        doc = fio(d.bdev, "--rw=randrw", "--bs=4k", "--iodepth=32", "--size=16M",
                  "--io_size=32M")
        tot = job_totals(doc)
        assert tot["errors"] == 0 and tot["read"] + tot["write"] == 32 << 20


@pytest.mark.parametrize("kind", ["mem", "loop", "python"])
def test_ext4_roundtrip(kind: str, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with device(*target_args(kind, tmp_path), "-q", "2") as d:
        sh("mkfs.ext4", "-q", "-F", d.bdev)
        sh("mount", "-t", "ext4", d.bdev, str(mnt))
        try:
            digests = write_tree(mnt, seed=len(kind))
        finally:
            sh("umount", str(mnt))
        sh("e2fsck", "-fn", d.bdev)
        sh("mount", "-t", "ext4", "-o", "ro", d.bdev, str(mnt))
        try:
            assert tree_digests(mnt, list(digests)) == digests
        finally:
            sh("umount", str(mnt))


def test_loop_data_survives_the_device(tmp_path: Path) -> None:
    """Files written through one device are there through the next one (flushed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = target_args("loop", tmp_path)
    with device(*args) as d:
        sh("mkfs.ext4", "-q", "-F", d.bdev)
        sh("mount", d.bdev, str(mnt))
        digests = write_tree(mnt, seed=7, count=6)
        sh("umount", str(mnt))
    with device(*args) as d:
        sh("e2fsck", "-fn", d.bdev)
        sh("mount", "-o", "ro", d.bdev, str(mnt))
        try:
            assert tree_digests(mnt, list(digests)) == digests
        finally:
            sh("umount", str(mnt))


@pytest.mark.parametrize("kind", ["mem", "loop", "python"])
def test_discard_and_write_zeroes_read_back_zeros(kind: str, tmp_path: Path) -> None:
    pattern = bytes(range(256)) * 4096  # 1 MiB
    with device(*target_args(kind, tmp_path)) as d:
        for off in (1 << 20, 3 << 20):
            write_direct(d.bdev, off, pattern)
        assert read_direct(d.bdev, 1 << 20, 1 << 20) == pattern
        sh("blkdiscard", "-o", str(1 << 20), "-l", str(1 << 20), d.bdev)
        sh("blkdiscard", "-z", "-o", str(3 << 20), "-l", str(1 << 20), d.bdev)
        assert read_direct(d.bdev, 1 << 20, 1 << 20) == bytes(1 << 20)
        assert read_direct(d.bdev, 3 << 20, 1 << 20) == bytes(1 << 20)
        # Neighbours untouched.
        write_direct(d.bdev, 5 << 20, pattern)
        assert read_direct(d.bdev, 5 << 20, 1 << 20) == pattern


def test_flush_and_fua_reach_the_backing_file(tmp_path: Path) -> None:
    args = target_args("loop", tmp_path)
    backing = Path(args[-1])
    with device(*args) as d:
        doc = fio(d.bdev, "--rw=write", "--bs=64k", "--size=4M", "--fsync=4", "--sync=dsync",
                  "--buffer_pattern=0x5a")
        assert job_totals(doc)["errors"] == 0
        # Visible in the file while the device is still up: nothing parked in our server.
        assert backing.read_bytes()[: 4 << 20] == b"\x5a" * (4 << 20)
