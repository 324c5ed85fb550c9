"""The relay: plug-in calls off the ring thread, and a call that hangs fails only its I/O.

A harness queue stands in for the kernel driver (requests are injected, the
answers harvested); the C relay, the worker threads, the plug-in handler and
the buffers are the real ones.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from examples.ramdisk import RamDisk
from ublk_driver import _bindings
from ublk_driver.queue import ErrorWatch, RelayPool, default_ring_flags
from ublk_driver.targets import PluginBackend
from ublk_driver.uapi import IoFlag, Op

DEPTH = 8
BUF = 64 << 10
SIZE = 1 << 20
HANG_AT = 64 << 10


class Hang(RamDisk):
    """A RAM disk whose calls at HANG_AT block until released, then scribble
    over the buffer they were given (as a late call might)."""

    def __init__(self, size: int = SIZE) -> None:
        super().__init__(size)
        self.release = threading.Event()
        self.entered = threading.Event()
        self.late_done = threading.Event()
        self.calls = 0

    def _hang(self, buf: memoryview) -> None:
        self.entered.set()
        self.release.wait()
        buf[:] = b"\xee" * len(buf)
        self.late_done.set()

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.calls += 1
        if offset == HANG_AT:
            self._hang(buf)
            return
        super().read_into(offset, buf)

    def write(self, offset: int, data: memoryview) -> None:
        self.calls += 1
        if offset == HANG_AT:
            self._hang(data)
            return
        super().write(offset, data)


@dataclass
class Relayed:
    queue: _bindings.Queue
    ctarget: _bindings.CTarget
    backend: PluginBackend
    pool: RelayPool

    def inject(self, tag: int, op: int, offset: int, length: int, flags: int = 0) -> None:
        self.queue.inject(tag, op | flags, offset >> 9, length >> 9)

    def run(self) -> dict[int, int]:
        """Serve what was injected; tag -> result."""
        self.pool.run(leave_wait=0.5)
        batch = _bindings.EventBatch(DEPTH)
        return dict(self.queue.harvest(batch))


def make(plugin: RamDisk, timeout: float, max_stuck: int = 8) -> Relayed:
    backend = PluginBackend(plugin, timeout=timeout)
    ct = backend.attach()
    q = _bindings.Queue(ct, -1, 0, DEPTH, BUF, False, default_ring_flags())
    q.relay_init(timeout, max_stuck)
    return Relayed(q, ct, backend, RelayPool(q, backend, 0))


@pytest.fixture
def relayed() -> Iterator[list[Relayed]]:
    made: list[Relayed] = []
    yield made
    for r in made:
        plugin = r.backend.plugin
        if isinstance(plugin, Hang):
            plugin.release.set()
        r.queue.free()
        r.ctarget.free()


def test_fast_path_answers_every_request_in_order_of_tags(relayed: list[Relayed]) -> None:
    r = make(RamDisk(SIZE), timeout=5.0)
    relayed.append(r)
    for tag in range(DEPTH):
        r.queue.buffer(tag)[:4096] = bytes([tag + 1]) * 4096
        r.inject(tag, Op.WRITE, tag * 4096, 4096, IoFlag.FUA if tag % 2 else 0)
    assert r.run() == {tag: 4096 for tag in range(DEPTH)}
    data = bytes(r.backend.plugin._data[: DEPTH * 4096])  # type: ignore[attr-defined]
    assert data == b"".join(bytes([t + 1]) * 4096 for t in range(DEPTH))
    st = r.queue.relay_stats()
    assert st is not None and st.timeouts == 0 and st.stuck == 0


def test_hung_call_fails_only_its_io_and_a_spare_serves_the_rest(
        relayed: list[Relayed], capsys: pytest.CaptureFixture[str]) -> None:
    plugin = Hang()
    plugin._data[:] = bytes(range(256)) * (SIZE // 256)
    r = make(plugin, timeout=0.3)
    relayed.append(r)
    # One batch: a read before the hang, the hung read, then a write and a
    # read that the stuck worker never reaches (they go to the spare).
    r.queue.buffer(2)[:4096] = b"\x5a" * 4096
    r.inject(0, Op.READ, 0, 4096)
    r.inject(1, Op.READ, HANG_AT, 4096)
    r.inject(2, Op.WRITE, 8192, 4096)
    r.inject(3, Op.READ, 8192, 4096)
    old_buf = r.queue.buffer(1)
    t0 = time.monotonic()
    results = r.run()
    took = time.monotonic() - t0
    assert results == {0: 4096, 1: -errno.ETIMEDOUT, 2: 4096, 3: 4096}
    assert 0.3 <= took < 3.0
    assert bytes(r.queue.buffer(0)[:4096]) == bytes(range(256)) * 16
    assert bytes(r.queue.buffer(3)[:4096]) == b"\x5a" * 4096
    err = capsys.readouterr().err
    assert "read_into() did not return within 0.3 s (READ at 65536+4096, queue 0" in err
    assert "the I/O failed with ETIMEDOUT" in err and "1 call(s) still stuck" in err
    st = r.queue.relay_stats()
    assert st is not None and (st.timeouts, st.stuck, st.unserved) == (1, 1, 0)
    # The tag of the hung I/O has a fresh buffer: the late call's scribbling
    # lands in the old one only.
    new_buf = r.queue.buffer(1)
    assert _bindings.ffi.from_buffer(new_buf) != _bindings.ffi.from_buffer(old_buf)
    new_buf[:16] = b"\x00" * 16
    plugin.release.set()
    assert plugin.late_done.wait(5)
    assert bytes(old_buf[:16]) == b"\xee" * 16
    assert bytes(new_buf[:16]) == b"\x00" * 16


def test_a_hung_write_is_failed_and_later_io_is_served(relayed: list[Relayed]) -> None:
    plugin = Hang()
    r = make(plugin, timeout=0.2)
    relayed.append(r)
    r.inject(5, Op.WRITE, HANG_AT, 4096)
    assert r.run() == {5: -errno.ETIMEDOUT}
    assert plugin.entered.is_set()


def test_when_every_worker_is_stuck_requests_fail_after_the_timeout(
        relayed: list[Relayed], capsys: pytest.CaptureFixture[str]) -> None:
    plugin = Hang()
    r = make(plugin, timeout=0.2, max_stuck=0)  # two workers, no spare beyond them
    relayed.append(r)
    # The first worker is given up on the hung read, the second takes what it
    # did not reach and hangs on the write: nobody is left for the last read,
    # which fails after waiting the timeout.
    r.inject(0, Op.READ, HANG_AT, 4096)
    r.inject(1, Op.WRITE, HANG_AT, 4096)
    r.inject(2, Op.READ, 0, 4096)
    results = r.run()
    assert results == {0: -errno.ETIMEDOUT, 1: -errno.ETIMEDOUT, 2: -errno.ETIMEDOUT}
    st = r.queue.relay_stats()
    assert st is not None and (st.timeouts, st.unserved, st.stuck, st.workers) == (2, 1, 2, 2)
    assert "write() did not return within 0.2 s (WRITE at 65536+4096" in capsys.readouterr().err


def test_a_spare_is_started_for_each_hung_call(relayed: list[Relayed]) -> None:
    plugin = Hang()
    r = make(plugin, timeout=0.2, max_stuck=8)
    relayed.append(r)
    r.inject(0, Op.READ, HANG_AT, 4096)
    r.inject(1, Op.WRITE, HANG_AT, 4096)
    r.inject(2, Op.READ, 0, 4096)
    assert r.run() == {0: -errno.ETIMEDOUT, 1: -errno.ETIMEDOUT, 2: 4096}
    st = r.queue.relay_stats()
    assert st is not None and (st.timeouts, st.unserved, st.stuck) == (2, 0, 2)


def test_queue_freed_while_a_call_is_stuck_is_freed_when_it_returns(
        relayed: list[Relayed]) -> None:
    plugin = Hang()
    r = make(plugin, timeout=0.2)
    r.inject(0, Op.READ, HANG_AT, 4096)
    assert r.run() == {0: -errno.ETIMEDOUT}
    assert r.pool.stuck_at_exit == 1
    r.queue.free()  # deferred in C: the stuck worker still holds its buffer
    r.ctarget.free()
    plugin.release.set()
    assert plugin.late_done.wait(5)
    deadline = time.monotonic() + 5
    while any(t.name.startswith("ublk-q0-py") and t.is_alive() for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the late worker did not leave"
        time.sleep(0.01)


class _FakeWorker:
    """What ErrorWatch reads of a QueueWorker."""

    def __init__(self, errors: list[int]) -> None:
        self.q_id = 2
        self.done = threading.Event()
        self._errors = errors

    def report_hangs(self) -> None:
        pass

    def stats(self) -> _bindings.QueueStats:
        n = self._errors.pop(0)
        if not self._errors:  # the last value: the queue has finished
            self._errors.append(n)
            self.done.set()
        return _bindings.QueueStats((0,) * 8, (0,) * 8, n, 1, -errno.ENOSPC, Op.WRITE, 8192)


def test_error_watch_logs_new_errors_once(capsys: pytest.CaptureFixture[str]) -> None:
    w = _FakeWorker([0, 3, 3, 5])
    watch = ErrorWatch(w, interval=0.01)  # type: ignore[arg-type]
    watch.start()
    watch.join(5)
    assert not watch.is_alive()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("ublkml: queue 2: 3 I/O error(s) in the last ")
    assert lines[0].endswith("(3 in all); last: ENOSPC on WRITE at offset 8192")
    assert "2 I/O error(s)" in lines[1] and "(5 in all)" in lines[1]


class Jittery(RamDisk):
    """A RAM disk whose calls sometimes take 0-40 ms (some past the relay's
    20 ms stall threshold: spares take over then), from several threads."""

    def __init__(self, size: int, seed: int) -> None:
        super().__init__(size)
        self._rnd = random.Random(seed)
        self._lock = threading.Lock()
        self.calls = 0
        self.active = self.max_active = 0

    def _jitter(self) -> None:
        with self._lock:
            self.calls += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            pause = self._rnd.random() * 0.04 if self._rnd.random() < 0.1 else 0.0
        if pause:
            time.sleep(pause)

    def _done(self) -> None:
        with self._lock:
            self.active -= 1

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._jitter()
        super().read_into(offset, buf)
        self._done()

    def write(self, offset: int, data: memoryview) -> None:
        self._jitter()
        super().write(offset, data)
        self._done()


@pytest.mark.parametrize("seed", [1, 2])
def test_requests_fed_while_calls_stall_are_each_answered_once(
        relayed: list[Relayed], seed: int) -> None:
    """1500 requests fed as answers come back (at most one per tag), calls
    sometimes slow: every request answered exactly once, none timed out, and
    every read returns what its tag last wrote (each tag owns its blocks)."""
    r = make(Jittery(SIZE, seed), timeout=5.0)
    relayed.append(r)
    q = r.queue
    q.relay_feed(-1, 0, 0, 0, more=True)
    problems: list[str] = []
    counts = {"answered": 0}

    def feeder() -> None:  # the ring's own thread (this one's caller) serves
        rnd = random.Random(seed)
        batch = _bindings.EventBatch(DEPTH)
        last: dict[int, bytes] = {}
        busy: dict[int, tuple[int, bytes | None]] = {}  # tag -> (op, data written)
        fed = 0
        deadline = time.monotonic() + 120
        try:
            while counts["answered"] < 1500 and not problems:
                for tag in range(DEPTH):
                    if tag in busy or fed >= 1500:
                        continue
                    sector = tag * 4096 >> 9
                    if tag in last and rnd.random() < 0.5:
                        busy[tag] = (Op.READ, None)
                        q.relay_feed(tag, Op.READ, sector, 8)
                    else:
                        data = rnd.randbytes(4096)
                        q.buffer(tag)[:4096] = data
                        busy[tag] = (Op.WRITE, data)
                        q.relay_feed(tag, Op.WRITE, sector, 8)
                    fed += 1
                for tag, res in q.relay_harvest(batch):
                    if tag not in busy:
                        problems.append(f"tag {tag} answered twice")
                        continue
                    op, written = busy.pop(tag)
                    if res != 4096:
                        problems.append(f"tag {tag} {Op(op).name}: result {res}")
                    elif op == Op.WRITE:
                        assert written is not None
                        last[tag] = written
                    elif bytes(q.buffer(tag)[:4096]) != last[tag]:
                        problems.append(f"tag {tag}: a read returned wrong data")
                    counts["answered"] += 1
                if time.monotonic() > deadline:
                    problems.append(f"stuck: {counts['answered']} answered, tags {sorted(busy)}"
                                    " still out")
                time.sleep(0.0005)
        finally:
            q.relay_feed(-1, 0, 0, 0, more=False)

    t = threading.Thread(target=feeder)
    t.start()
    cpus = os.sched_getaffinity(0)
    r.pool.run(leave_wait=1.0)
    assert os.sched_getaffinity(0) == cpus  # the pinned ring thread got its CPUs back
    t.join(30)
    assert problems == []
    assert counts["answered"] == 1500
    st = q.relay_stats()
    assert st is not None and st.timeouts == 0 and st.unserved == 0
    plugin = r.backend.plugin
    assert isinstance(plugin, Jittery)
    assert plugin.max_active >= 2  # slow calls did not hold up the others
    print(f"seed {seed}: {counts['answered']} answered, up to {plugin.max_active} calls at once")


def test_requests_that_come_while_every_holder_stalls_are_served_at_once(
        relayed: list[Relayed]) -> None:
    """A call hangs (its holder stalled past 20 ms): requests that come one
    at a time meanwhile are each served by a spare within a few ms, not at
    the ring thread's next poll (which is 20 ms apart here)."""
    r = make(Hang(), timeout=5.0)
    relayed.append(r)
    q = r.queue
    plugin = r.backend.plugin
    assert isinstance(plugin, Hang)
    q.relay_feed(-1, 0, 0, 0, more=True)
    delays: list[float] = []
    problems: list[str] = []

    def wait_for(tag: int, batch: _bindings.EventBatch) -> None:
        t0 = time.monotonic()
        got: list[tuple[int, int]] = []
        while not got and time.monotonic() - t0 < 3:
            got = q.relay_harvest(batch)
            time.sleep(0.0002)
        if got != [(tag, 4096)]:
            problems.append(f"tag {tag}: {got}")

    def feeder() -> None:
        batch = _bindings.EventBatch(DEPTH)
        try:
            q.relay_feed(0, Op.READ, HANG_AT >> 9, 8)
            if not plugin.entered.wait(5):
                problems.append("the hanging call never started")
                return
            time.sleep(0.1)  # its holder is stalled now
            for i in range(20):
                tag = 1 + i % (DEPTH - 1)
                t0 = time.monotonic()
                q.relay_feed(tag, Op.READ, 0, 8)
                wait_for(tag, batch)
                delays.append(time.monotonic() - t0)
            plugin.release.set()
            wait_for(0, batch)
        finally:
            q.relay_feed(-1, 0, 0, 0, more=False)

    t = threading.Thread(target=feeder)
    t.start()
    r.pool.run(leave_wait=1.0)
    t.join(10)
    assert problems == []
    assert len(delays) == 20
    delays.sort()
    assert delays[10] < 0.005, f"median {delays[10] * 1e3:.1f} ms: {delays}"
