"""Device lifecycle through the real driver: signals, deletion, bad ids, failing plug-ins."""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ublk_driver.ublk_helpers import (
    device,
    next_dev_id,
    read_direct,
    ublkml,
    wait_gone,
    write_direct,
)
from ublk_driver.admin.paths import default_state_dir
from ublk_driver.blockdev import parse_schedulers
from ublk_driver.cli import _wait_pid_exit
from ublk_driver.control import Control

pytestmark = pytest.mark.ublk


def test_features_and_list_json() -> None:
    feats = json.loads(ublkml("features", "--json").stdout)
    assert "CMD_IOCTL_ENCODE" in feats["names"]
    with device("-t", "mem", "--size", "16M", "-q", "2", "-d", "64") as d:
        listed = {r["dev_id"]: r for r in json.loads(ublkml("list", "--json").stdout)}
        rec = listed[d.dev_id]
        assert rec["state"] == "LIVE" and rec["queues"] == 2 and rec["depth"] == 64
        assert rec["size"] == 16 << 20 and rec["target"] == "mem"
    listed = {r["dev_id"] for r in json.loads(ublkml("list", "--json").stdout)}
    assert d.dev_id not in listed


def test_unknown_and_double_delete_are_clear_errors() -> None:
    dev_id = next_dev_id()
    proc = ublkml("del", "-n", str(dev_id), check=False)
    assert proc.returncode == 1
    assert f"no ublk device with id {dev_id}" in proc.stderr
    with device("-t", "null") as d:
        pass
    proc = ublkml("del", "-n", str(d.dev_id), check=False)
    assert proc.returncode == 1 and "no ublk device" in proc.stderr


def test_del_names_who_holds_the_device_open_instead_of_hanging() -> None:
    """The kernel frees a deleted device only once every opener of
    /dev/ublkbN has closed it.  `del` does not wait for that forever: after
    --timeout it says who holds it, in one line; the server flushes and exits
    anyway, and the id is free again once the holder closes the device."""
    dev_id = next_dev_id()
    info = json.loads(ublkml("add", "-n", str(dev_id), "-t", "null", "--json").stdout)
    with open(info["bdev"], "rb") as bdev:
        holder = subprocess.Popen(["sleep", "600"], stdin=bdev)
    try:
        t0 = time.monotonic()
        proc = ublkml("del", "-n", str(dev_id), "--timeout", "3", check=False, timeout=60)
        took = time.monotonic() - t0
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        assert f"/dev/ublkb{dev_id} is still open by pid {holder.pid} (sleep)" in proc.stderr
        assert took < 30, took  # 3 s, plus two Python start-ups under TCG
        assert not os.path.exists(info["bdev"])
        assert _wait_pid_exit(info["pid"], 30), "the server waits for the holder"
    finally:
        holder.kill()
        holder.wait()
    with Control() as ctrl:
        assert ctrl.wait_freed(dev_id, 10)
    with device("-t", "null"):  # and the driver is fine
        pass


def test_duplicate_id_is_refused_and_leaves_the_first_alone() -> None:
    with device("-t", "mem", "--size", "4M") as d:
        proc = ublkml("add", "-t", "null", "-n", str(d.dev_id), check=False)
        assert proc.returncode == 1 and "already in use" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        write_direct(d.bdev, 0, b"\x11" * 4096)
        assert read_direct(d.bdev, 0, 4096) == b"\x11" * 4096


def _schedulers(dev_id: int) -> tuple[list[str], str | None]:
    return parse_schedulers(Path(f"/sys/block/ublkb{dev_id}/queue/scheduler").read_text())


def test_io_scheduler_is_none_unless_asked_otherwise() -> None:
    with device("-t", "null") as d:
        assert d.info["scheduler"] == "none" and _schedulers(d.dev_id)[1] == "none"
    # One queue: left alone, the kernel gives the disk mq-deadline (the
    # slower choice that --scheduler none replaces).
    with device("-t", "null", "--scheduler", "keep") as d:
        names, active = _schedulers(d.dev_id)
        assert active == d.info["scheduler"] == "mq-deadline", names
    with device("-t", "null", "-q", "2", "--scheduler", "mq-deadline") as d:
        assert d.info["scheduler"] == "mq-deadline" == _schedulers(d.dev_id)[1]


def test_unknown_io_scheduler_is_one_line_and_leaves_no_device() -> None:
    dev_id = next_dev_id()
    proc = ublkml("add", "-n", str(dev_id), "-t", "null", "--scheduler", "nosuchsched",
                  check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no I/O scheduler 'nosuchsched'" in proc.stderr and "none" in proc.stderr
    assert wait_gone(f"/dev/ublkb{dev_id}")
    listed = {r["dev_id"] for r in json.loads(ublkml("list", "--json").stdout)}
    assert dev_id not in listed


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_and_flushes(sig: signal.Signals, tmp_path: Path) -> None:
    backing = tmp_path / "b.img"
    with open(backing, "wb") as f:
        f.truncate(8 << 20)
    dev_id = next_dev_id()
    with subprocess.Popen([sys.executable, "-m", "ublk_driver", "add", "-t", "loop", "-f",
                           str(backing), "-n", str(dev_id), "--foreground", "--json"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            ready = json.loads(proc.stdout.readline())
            bdev = ready["bdev"]
            write_direct(bdev, 1 << 20, b"\xc3" * (1 << 20))
            proc.send_signal(sig)
            assert proc.wait(60) == 0, proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert wait_gone(f"/dev/ublkb{dev_id}") and wait_gone(f"/dev/ublkc{dev_id}")
    assert backing.read_bytes()[1 << 20: 2 << 20] == b"\xc3" * (1 << 20)


def test_failing_plugin_fails_the_io_not_the_device() -> None:
    plugin = ["-t", "python", "--plugin", "tests.ublk_driver.targets.doubles:Faulty",
              "--plugin-arg", "size=8M",
              "--plugin-arg", "raise_from=1M", "--plugin-arg", "raise_to=2M",
              "--plugin-arg", "short_from=3M", "--plugin-arg", "short_to=4M",
              "--plugin-arg", "eio_from=5M", "--plugin-arg", "eio_to=6M"]
    with device(*plugin) as d:
        for off in (1 << 20, 3 << 20):
            with pytest.raises(OSError) as exc:
                read_direct(d.bdev, off, 4096)
            assert exc.value.errno == 5  # EIO reaches the reader
        with pytest.raises(OSError) as exc:
            write_direct(d.bdev, 5 << 20, b"x" * 4096)
        assert exc.value.errno in (5, 28)  # the block layer may map ENOSPC to EIO
        # The device and the server are still up and serve good ranges.
        write_direct(d.bdev, 0, b"\x42" * 4096)
        assert read_direct(d.bdev, 0, 4096) == b"\x42" * 4096
        listed = {r["dev_id"]: r for r in json.loads(ublkml("list", "--json").stdout)}
        assert listed[d.dev_id]["state"] == "LIVE"
        assert os.path.exists(f"/proc/{d.info['pid']}")


# ---- SIGTERM with I/O in flight -------------------------------------------------------

WRITERS = 16
WRITER_BLOCKS = 4096          # 16 MiB at the start of the device, 4 KiB blocks


def _server_args(kind: str, tmp_path: Path) -> tuple[list[str], list[Path]]:
    if kind == "python":
        return ["-t", "python", "--plugin", "examples.ramdisk:RamDisk",
                "--size", "64M"], []
    files = []
    for i in range(1 if kind == "loop" else 2):
        f = tmp_path / f"b{i}.img"
        with open(f, "wb") as fh:
            fh.truncate(64 << 20)
        files.append(f)
    if kind == "loop":
        return ["-t", "loop", "-f", str(files[0])], files
    return ["-t", "mirror", "--leg", str(files[0]), "--leg", str(files[1])], files


def _block(b: int, version: int) -> bytes:
    head = f"block {b:06d} version {version:06d} ".encode()
    return (head * (4096 // len(head) + 1))[:4096]


class _Writers:
    """Threads writing 4 KiB blocks with O_DIRECT, each to its own blocks (so
    that a block has at most one write in flight), recording what the device
    acknowledged: for every block the last acknowledged version, and the
    version in flight when the device went away."""

    def __init__(self, bdev: str) -> None:
        self.bdev = bdev
        self.acked: dict[int, int] = {}
        self.inflight: dict[int, int] = {}
        self.errors: list[int] = []
        self.writes = 0
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True)
                        for t in range(WRITERS)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _run(self, t: int) -> None:
        import mmap
        import random

        rnd = random.Random(t)
        buf = mmap.mmap(-1, 4096)
        fd = os.open(self.bdev, os.O_WRONLY | os.O_DIRECT)
        try:
            for version in itertools.count(1):
                b = t + WRITERS * rnd.randrange(WRITER_BLOCKS // WRITERS)
                buf[:] = _block(b, version)
                self.inflight[b] = version
                try:
                    os.pwritev(fd, [buf], b * 4096)
                except OSError as e:
                    self.errors.append(e.errno or 0)
                    return
                self.acked[b] = version
                del self.inflight[b]
                self.writes += 1
        finally:
            os.close(fd)

    def check(self, path: Path) -> int:
        """Every acknowledged write is in ``path``; returns the blocks checked."""
        with open(path, "rb") as f:
            data = f.read(WRITER_BLOCKS * 4096)
        for b in range(WRITER_BLOCKS):
            got = data[b * 4096:(b + 1) * 4096]
            ok = {_block(b, self.acked[b])} if b in self.acked else {bytes(4096)}
            if b in self.inflight:  # not acknowledged: either outcome is allowed
                ok.add(_block(b, self.inflight[b]))
            assert got in ok, (f"{path.name} block {b}: acknowledged version "
                               f"{self.acked.get(b)}, in flight {self.inflight.get(b)}, "
                               f"found {got[:32]!r}")
        return len(self.acked)


@pytest.mark.parametrize("kind", ["loop", "mirror", "python"])
def test_sigterm_with_io_in_flight_stops_cleanly(kind: str, tmp_path: Path,
                                                 figures: dict[str, Any]) -> None:
    """SIGTERM while 16 writer threads (4 KiB, O_DIRECT) and fio (random
    writes, depth 32) keep the device busy: the server exits 0 and the device
    goes away; the writers and fio get errors, nothing hangs; every write the
    device acknowledged is in the backing file(s), on every mirror leg.

    fio's verify state (verify_state_save) is not used for that: it records
    how far the write phase got, not which writes the device acknowledged:
    replayed on the backing file after a SIGTERM it reported never-written
    blocks (zeros) as bad."""
    args, files = _server_args(kind, tmp_path)
    dev_id = next_dev_id()
    with subprocess.Popen([sys.executable, "-m", "ublk_driver", "add", *args, "-n",
                           str(dev_id), "--foreground", "--json"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            bdev = json.loads(proc.stdout.readline())["bdev"]
            writers = _Writers(bdev)
            with subprocess.Popen(["fio", "--name=w", f"--filename={bdev}",
                                   "--ioengine=io_uring", "--direct=1", "--rw=randwrite",
                                   "--bs=4k", "--iodepth=32", "--offset=32M", "--size=32M",
                                   "--time_based", "--runtime=300", "--output-format=json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) as fio_proc:
                writers.start()
                time.sleep(4)
                assert fio_proc.poll() is None, "fio ended before the signal"
                assert writers.writes > 100 and not writers.errors
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(90) == 0, proc.stderr.read()
                stop_s = time.monotonic() - t0
                fio_out, _ = fio_proc.communicate(timeout=90)
                for t in writers.threads:
                    t.join(90)
                    assert not t.is_alive(), "a writer hangs"
            assert fio_proc.returncode != 0, "fio should have seen the device go away"
            fio_job = json.loads(fio_out[fio_out.find("{"):])["jobs"][0]
            assert fio_job["error"] != 0
            assert len(writers.errors) == WRITERS  # each one stopped on an error
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert wait_gone(f"/dev/ublkb{dev_id}") and wait_gone(f"/dev/ublkc{dev_id}")
    assert dev_id not in {r["dev_id"] for r in json.loads(ublkml("list", "--json").stdout)}
    checked = [writers.check(f) for f in files]
    fig = {"stop_seconds": round(stop_s, 2), "acknowledged_writes": writers.writes,
           "blocks_checked_per_file": checked, "in_flight_at_stop": len(writers.inflight),
           "writer_errnos": sorted({errno.errorcode.get(e, str(e)) for e in writers.errors}),
           "fio_error": fio_job["error"], "fio_writes": int(fio_job["write"]["total_ios"])}
    figures[f"sigterm_{kind}"] = fig
    print(f"{kind}: {json.dumps(fig)}")


# ---- queue processes (--queue-processes) come and go with their server -------------


def _process_gone(pid: int, timeout: float) -> bool:
    """True once ``pid`` has exited (a zombie counts: its parent may not reap it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def _queue_pids(dev_id: int) -> list[int]:
    doc = json.loads(ublkml("status", "-n", str(dev_id), "--json").stdout)
    return [int(q["pid"]) for q in doc["stats"]["queues"]]


def test_queue_processes_go_with_their_server() -> None:
    """`del` leaves no queue process behind; a SIGKILLed server's queue
    processes exit by themselves (within the half-second watch), so that the
    kernel sees the server gone and the device can be deleted."""
    args = ["-t", "python", "--plugin", "examples.ramdisk:RamDisk", "--size", "64M",
            "-q", "2", "--queue-processes"]
    with device(*args) as d:
        write_direct(d.bdev, 0, b"q" * 4096)
        assert read_direct(d.bdev, 0, 4096) == b"q" * 4096
        pids = _queue_pids(d.dev_id)
        assert len(set(pids)) == 2 and d.info["pid"] not in pids
    assert all(_process_gone(p, 10) for p in pids), pids

    dev_id = next_dev_id()
    info = json.loads(ublkml("add", "-n", str(dev_id), "--json", *args).stdout)
    try:
        pids = _queue_pids(dev_id)
        os.kill(int(info["pid"]), signal.SIGKILL)
        assert all(_process_gone(p, 5) for p in pids), pids
    finally:
        ublkml("del", "-n", str(dev_id))
    assert wait_gone(f"/dev/ublkb{dev_id}") and wait_gone(f"/dev/ublkc{dev_id}")


# ---- add/delete cycles: no fd, memory, thread or device left behind -----------------

# Cycles (make test, make soak) after a warm-up of WARMUP; seconds a cycle under TCG:
# 0.6 in-process, 5.9 through the CLI (two interpreter start-ups).
CYCLES_IN_PROCESS = (20, 100)
CYCLES_CLI = (4, 100)
WARMUP = 5


def memory_bound_kib(cycles: int) -> int:
    """Memory growth (KiB) allowed over ``cycles``: 2 MiB of noise (the
    mirror's RSS moves by about that much over 100 cycles) plus 60 KiB a
    cycle, less than the 128 KiB of I/O buffers one cycle touches: 7.9 MiB
    over 100 cycles, 3.2 MiB over 20, 2.2 MiB over 4."""
    return (2 << 10) + 60 * cycles


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Measured figures, merged into ``reliability-figures.json``: next to the
    junit XML (in the test bed that is the share the host keeps), else in /tmp."""
    out: dict[str, Any] = {}
    yield out
    if not out:
        return
    xml = getattr(request.config.option, "xmlpath", None)
    path = (Path(xml).parent if xml else Path("/tmp")) / "reliability-figures.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.update(out)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(f"figures written to {path}")


def _proc_status(pid: int | str = "self") -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmData", "Threads"):
                out[key] = int(value.split()[0])  # kB, or a count
    return out


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("MemAvailable", "Slab", "SUnreclaim"):
                out[key] = int(value.split()[0])
    return out


def _leftovers(ids: set[int]) -> dict[str, list[str]]:
    """Anything of these devices still around, by where it was found."""
    state_dir = default_state_dir()
    found: dict[str, list[str]] = {"sysfs": [], "dev": [], "list": [], "state": []}
    for i in ids:
        if os.path.exists(f"/sys/class/ublk-char/ublkc{i}"):
            found["sysfs"].append(f"ublkc{i}")
        found["dev"] += [p for p in (f"/dev/ublkb{i}", f"/dev/ublkc{i}") if os.path.exists(p)]
        for d in (state_dir, state_dir + "-ctl"):
            found["state"] += [os.path.join(d, f"{i}{ext}") for ext in (".json", ".sock")
                               if os.path.exists(os.path.join(d, f"{i}{ext}"))]
    listed = {r["dev_id"] for r in json.loads(ublkml("list", "--json").stdout)}
    found["list"] = [str(i) for i in sorted(ids & listed)]
    return {k: v for k, v in found.items() if v}


def _backing(kind: str, tmp_path: Path) -> list[str]:
    files = []
    for i in range(1 if kind == "loop" else 2):
        f = tmp_path / f"{kind}{i}.img"
        with open(f, "wb") as fh:
            fh.truncate(16 << 20)
        files.append(str(f))
    return files


def _fixed_malloc_thresholds() -> None:
    """Fix glibc's mmap and trim thresholds at 128 KiB for this process.

    By default glibc raises its mmap threshold to the size of a freed mmap'ed
    block (up to 32 MiB) and its trim threshold to twice that: after one 16 MiB
    RamDisk or queue buffer is freed, the next ones come from the heap, and up
    to 32 MiB of freed heap is kept mapped. A soak of 100 cycles measured VmData
    +32 MiB (python) and RSS +16 MiB (loop) that way, with the same fds,
    threads and Python objects. Fixed thresholds return every large freed block
    to the kernel, so what VmData and RSS still gain was not freed.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    m_trim_threshold, m_mmap_threshold = -1, -3   # <malloc.h>
    for param in (m_mmap_threshold, m_trim_threshold):
        assert libc.mallopt(param, 128 << 10) == 1, "mallopt failed"


@pytest.mark.parametrize("kind", ["loop", "mirror", "python"])
def test_add_delete_cycles_in_process_leak_nothing(
        kind: str, tmp_path: Path, figures: dict[str, Any],
        soak_count: Callable[[int, int], int]) -> None:
    """Server API, this process: add, start, I/O, shutdown, 20 times (100 with
    --soak).

    Bounds, over the cycles after a warm-up of 5: the same number of open fds
    and threads; RSS + ``memory_bound_kib(cycles)`` at most (the I/O buffers a
    cycle touches alone are 128 KiB, a queue's descriptors and rings more);
    VmData +16 MiB at most (one queue's buffers are 16 MiB: a set leaked each
    cycle would be 16 MiB a cycle); at most 30 more Python objects a cycle.
    """
    import gc

    from examples.ramdisk import RamDisk
    from ublk_driver.server import Server, ServerConfig
    from ublk_driver.targets import LoopTarget, MirrorTarget, PluginBackend

    files = _backing(kind, tmp_path) if kind != "python" else []
    ids: set[int] = set()
    data = os.urandom(64 << 10)

    def cycle() -> None:
        backend: Any
        if kind == "loop":
            backend = LoopTarget(files[0])
        elif kind == "mirror":
            backend = MirrorTarget(files)
        else:
            backend = PluginBackend(RamDisk(16 << 20), timeout=5.0)
        dev_id = next_dev_id()
        ids.add(dev_id)
        server = Server(backend, ServerConfig(dev_id=dev_id, depth=32))
        server.start()
        try:
            write_direct(server.bdev, 1 << 20, data)
            assert read_direct(server.bdev, 1 << 20, len(data)) == data
        finally:
            assert server.shutdown() == []

    cycles = soak_count(*CYCLES_IN_PROCESS)
    _fixed_malloc_thresholds()
    for _ in range(WARMUP):
        cycle()
    gc.collect()
    fds0 = len(os.listdir("/proc/self/fd"))
    st0, objs0 = _proc_status(), len(gc.get_objects())
    t0 = time.monotonic()
    for _ in range(cycles):
        cycle()
    per_cycle = (time.monotonic() - t0) / cycles
    gc.collect()
    fds1 = len(os.listdir("/proc/self/fd"))
    st1, objs1 = _proc_status(), len(gc.get_objects())
    fig = {"cycles": cycles, "warmup": WARMUP, "seconds_per_cycle": round(per_cycle, 3),
           "fds": [fds0, fds1], "threads": [st0["Threads"], st1["Threads"]],
           "rss_kib": [st0["VmRSS"], st1["VmRSS"]], "vmdata_kib": [st0["VmData"],
                                                                  st1["VmData"]],
           "python_objects": [objs0, objs1]}
    figures[f"cycles_in_process_{kind}"] = fig
    print(f"in-process {kind}: {json.dumps(fig)}")
    assert _leftovers(ids) == {}
    assert fds1 == fds0
    assert st1["Threads"] == st0["Threads"]
    assert st1["VmRSS"] - st0["VmRSS"] <= memory_bound_kib(cycles)
    assert st1["VmData"] - st0["VmData"] <= 16 << 10
    assert objs1 - objs0 <= 30 * cycles


# Through the CLI a cycle is two interpreter start-ups: loop only; the mirror's
# cycles run in-process above, and the daemon code is the same for every target.
@pytest.mark.parametrize("kind", ["loop"])
def test_add_delete_cycles_through_the_cli_leak_nothing(
        kind: str, tmp_path: Path, figures: dict[str, Any],
        soak_count: Callable[[int, int], int]) -> None:
    """`ublkml add` (a daemon per device) then `ublkml del`, 4 times (100 with
    --soak): every server process exits, no device, state file or socket is
    left, this (long-lived) process holds no more fds; the kernel's
    unreclaimable memory grows by ``memory_bound_kib(cycles)`` at most."""
    state_dir = default_state_dir()
    files = _backing(kind, tmp_path)
    args = ["-t", "loop", "-f", files[0]] if kind == "loop" else [
        "-t", "mirror", "--leg", files[0], "--leg", files[1]]
    ids: set[int] = set()
    pids: list[int] = []

    def cycle() -> None:
        dev_id = next_dev_id()
        ids.add(dev_id)
        info = json.loads(ublkml("add", "-n", str(dev_id), "--json", *args).stdout)
        pids.append(int(info["pid"]))
        write_direct(info["bdev"], 0, b"\x5c" * 4096)
        ublkml("del", "-n", str(dev_id))

    cycles = soak_count(*CYCLES_CLI)
    for _ in range(WARMUP):
        cycle()
    logs0 = len(list(Path(state_dir).glob("server-*.log")))
    fds0, mem0 = len(os.listdir("/proc/self/fd")), _meminfo()
    t0 = time.monotonic()
    for _ in range(cycles):
        cycle()
    per_cycle = (time.monotonic() - t0) / cycles
    fds1, mem1 = len(os.listdir("/proc/self/fd")), _meminfo()
    alive = [p for p in pids if os.path.exists(f"/proc/{p}")]
    fig = {"cycles": cycles, "warmup": WARMUP, "seconds_per_cycle": round(per_cycle, 3),
           "test_process_fds": [fds0, fds1], "servers_alive_after": len(alive),
           "kernel_kib": {k: [mem0[k], mem1[k]] for k in mem0},
           "server_logs_added": len(list(Path(state_dir).glob("server-*.log"))) - logs0}
    figures[f"cycles_cli_{kind}"] = fig
    print(f"cli {kind}: {json.dumps(fig)}")
    assert alive == []
    assert _leftovers(ids) == {}
    assert fds1 == fds0
    # Unreclaimable kernel memory: a device's tag set, queues and gendisk left
    # behind per cycle, even one no longer listed.
    assert mem1["SUnreclaim"] - mem0["SUnreclaim"] <= memory_bound_kib(cycles)
