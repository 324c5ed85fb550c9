"""Crash recovery: SIGKILL the server under fio write+verify, `ublkml recover`.

Marked ``ublk`` (native, or in the test bed).  Devices are added with
``--recovery reissue``: I/O the dead server had taken is sent again to the
new one, so fio sees no error at all, only a pause.  Each fio run writes with
its own seed and reads everything back (crc32c); after the last kill the
device is deleted and the last run's data is verified once more directly on
the backing file(s): every acknowledged write reached the backing store.

SIGKILLs per target: 3 (loop) and 7 (mirror) in ``make test``, 10 each with
``--soak`` (``make soak``).  The figures (kills, recovery times, bytes
verified) go to $UBLKML_RELIABILITY_OUT, or recovery.json in the test bed's
share directory (its path is in the test bed's summary line), for
docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.ublk_driver.ublk_helpers import fio, next_dev_id, sparse_files, ublkml, wait_gone

pytestmark = pytest.mark.ublk

SIZE = 32 << 20
# SIGKILLs (make test, make soak); one takes about 5.7 s under TCG: a random
# 0.2-2.5 s wait, then `ublkml recover` (4.2-4.4 s median).
KILLS_LOOP = (3, 10)
KILLS_MIRROR = (7, 10)  # the leg changes happen after kills 3, 4 and 6: at least 7
JOB = ["--rw=randwrite", "--bsrange=4k-64k", "--iodepth=16", "--size=24M",
       "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--fdatasync=16"]


def server_pid(dev_id: int) -> int:
    for rec in json.loads(ublkml("list", "--json").stdout):
        if rec["dev_id"] == dev_id:
            return int(rec["pid"])
    raise AssertionError(f"device {dev_id} is gone")


def make_files(tmp_path: Path, n: int) -> list[str]:
    return sparse_files(tmp_path, n, SIZE, "back")


class FioLoop(threading.Thread):
    """fio write+verify runs, one after another, each with its own seed."""

    def __init__(self, bdev: str) -> None:
        super().__init__(daemon=True)
        self.bdev = bdev
        self.stop = threading.Event()
        self.runs: list[dict[str, Any]] = []
        self.seeds: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        seed = 1
        try:
            while not self.stop.is_set():
                doc = fio(self.bdev, *JOB, f"--randseed={seed}", timeout=600)
                self.runs.append(doc)
                self.seeds.append(seed)
                seed += 1
        except BaseException as e:
            self.error = e


def crash_and_recover(dev_id: int, kills: int, rnd: random.Random,
                      between: Callable[[int, int], None] | None = None) -> list[float]:
    """SIGKILL the server at random moments, recover each time; seconds per recovery."""
    times = []
    for k in range(kills):
        time.sleep(rnd.uniform(0.2, 2.5))
        pid = server_pid(dev_id)
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        info = json.loads(ublkml("recover", "-n", str(dev_id), "--json", timeout=120).stdout)
        times.append(time.monotonic() - t0)
        assert info["dev_id"] == dev_id and info["pid"] != pid
        if between is not None:
            between(dev_id, k)
    return times


def run_kills(target_args: list[str], backing: list[str], kills: int,
              between: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    dev_id = next_dev_id()
    info = json.loads(ublkml("add", "-n", str(dev_id), "--json", "--recovery", "reissue",
                             *target_args).stdout)
    bdev = info["bdev"]
    loop = FioLoop(bdev)
    loop.start()
    try:
        times = crash_and_recover(dev_id, kills, random.Random(dev_id), between)
        # One whole write+verify run after the last recovery, then stop.
        n = len(loop.runs)
        deadline = time.monotonic() + 600
        while len(loop.runs) < n + 2 and loop.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        loop.stop.set()
        loop.join(600)
        ublkml("del", "-n", str(dev_id))
    assert wait_gone(bdev)
    assert loop.error is None, loop.error
    assert len(loop.runs) >= 2
    errors = sum(int(j["error"]) for doc in loop.runs for j in doc["jobs"])
    assert errors == 0
    verified = sum(int(j["read"]["io_bytes"]) for doc in loop.runs for j in doc["jobs"])
    written = sum(int(j["write"]["io_bytes"]) for doc in loop.runs for j in doc["jobs"])
    # The last run's data, read from the backing store itself (the device is gone).
    last = loop.seeds[-1]
    for path in backing:
        doc = fio(path, *JOB, f"--randseed={last}", "--verify_only=1", timeout=600)
        assert sum(int(j["error"]) for j in doc["jobs"]) == 0
        verified += sum(int(j["read"]["io_bytes"]) for j in doc["jobs"])
    return {"kills": len(times), "recover_s": times, "fio_runs": len(loop.runs),
            "bytes_written": written, "bytes_verified": verified}


def report(name: str, figures: dict[str, Any]) -> None:
    times = sorted(figures["recover_s"])
    print(f"\n{name}: {figures['kills']} SIGKILLs survived, {figures['fio_runs']} fio runs, "
          f"{figures['bytes_written'] >> 20} MiB written, {figures['bytes_verified'] >> 20} MiB "
          f"verified, recovery median {times[len(times) // 2]:.2f} s, max {times[-1]:.2f} s")
    share = os.environ.get("UBLKML_TESTBED_SHARE")
    out = os.environ.get("UBLKML_RELIABILITY_OUT") or (
        os.path.join(share, "recovery.json") if share else None)
    if out:
        doc = json.loads(Path(out).read_text()) if os.path.exists(out) else {}
        doc[name] = figures
        Path(out).write_text(json.dumps(doc, indent=2))


def test_sigkill_loop_server_under_fio_verify(
        tmp_path: Path, soak_count: Callable[[int, int], int]) -> None:
    (back,) = make_files(tmp_path, 1)
    report("loop", run_kills(["-t", "loop", "-f", back], [back], soak_count(*KILLS_LOOP)))


def leg_states(dev_id: int) -> list[str]:
    out = ublkml("leg", "list", "-n", str(dev_id), "--json").stdout
    return [leg["state"] for leg in json.loads(out)["legs"]]


def test_sigkill_mirror_server_under_fio_verify(
        tmp_path: Path, soak_count: Callable[[int, int], int]) -> None:
    """Also across leg changes: leg 1, demoted after kill 3, is still demoted
    after kill 4 (the journal), and promoted (resync under load) after kill 6;
    kill 7 and later hit the mirror with both legs active after the resync."""
    legs = make_files(tmp_path, 2)
    kills = soak_count(*KILLS_MIRROR)
    assert kills >= 7

    def between(dev_id: int, k: int) -> None:
        if k == 2:
            ublkml("leg", "demote", "1", "-n", str(dev_id))
        elif k == 3:
            assert leg_states(dev_id) == ["active", "demoted"]
        elif k == 5:
            ublkml("leg", "promote", "1", "-n", str(dev_id), timeout=300)
            assert leg_states(dev_id) == ["active", "active"]

    figures = run_kills(["-t", "mirror", "--leg", legs[0], "--leg", legs[1]], legs, kills,
                        between)
    assert Path(legs[0]).read_bytes() == Path(legs[1]).read_bytes()
    report("mirror", figures)


def test_recover_a_device_served_by_queue_processes() -> None:
    """--queue-processes with --recovery: after the server's SIGKILL its queue
    processes exit, `ublkml recover` forks new ones and the device serves
    again (RamDisk is memory: what it held died with the server)."""
    dev_id = next_dev_id()
    info = json.loads(ublkml("add", "-n", str(dev_id), "--json", "--recovery", "reissue",
                             "-t", "python", "--plugin", "examples.ramdisk:RamDisk",
                             "--size", "64M", "-q", "2", "--queue-processes").stdout)
    try:
        doc = fio(info["bdev"], "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=8M",
                  "--verify=crc32c", "--verify_fatal=1", "--do_verify=1")
        assert doc["jobs"][0]["error"] == 0
        os.kill(int(info["pid"]), signal.SIGKILL)
        again = json.loads(ublkml("recover", "-n", str(dev_id), "--json", timeout=120).stdout)
        assert again["pid"] != info["pid"]
        status = json.loads(ublkml("status", "-n", str(dev_id), "--json").stdout)
        pids = {q["pid"] for q in status["stats"]["queues"]}
        assert len(pids) == 2 and again["pid"] not in pids
        doc = fio(info["bdev"], "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=8M",
                  "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--numjobs=2",
                  "--cpus_allowed=0-1", "--cpus_allowed_policy=split",
                  "--offset_increment=16M")
        assert all(job["error"] == 0 for job in doc["jobs"])
    finally:
        ublkml("del", "-n", str(dev_id))
    assert wait_gone(f"/dev/ublkb{dev_id}")
