"""The only module that touches cffi's ``ffi`` and ``lib``.

It keeps the C names (``ctrl_cmd``, ``queue_submit_fetches``, ...), checks
arguments, turns negative errno returns into ``OSError`` and owns every C
pointer's lifetime.  Everything above it speaks bytes, ints and memoryviews.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ublk_driver._ublkml_cffi import ffi, lib

# Kinds of native target (csrc/ublkml.h).
TGT_NULL: int = lib.UBLKML_TGT_NULL
TGT_MEM: int = lib.UBLKML_TGT_MEM
TGT_LOOP: int = lib.UBLKML_TGT_LOOP
TGT_EVENTS: int = lib.UBLKML_TGT_EVENTS
TGT_MIRROR: int = lib.UBLKML_TGT_MIRROR
MAX_LEGS: int = lib.UBLKML_MAX_LEGS
PROBE_TAG: int = lib.UBLKML_PROBE_TAG
REC_PROBED: int = lib.UBLKML_REC_PROBED

# Fault schedules and leg states (csrc/ublkml.h).
FAULT_CONST: int = lib.UBLKML_FAULT_CONST
FAULT_BURST: int = lib.UBLKML_FAULT_BURST
FAULT_RAMP: int = lib.UBLKML_FAULT_RAMP
LEG_ACTIVE: int = lib.UBLKML_LEG_ACTIVE
LEG_DEMOTED: int = lib.UBLKML_LEG_DEMOTED
LEG_FAILED: int = lib.UBLKML_LEG_FAILED

#: the fields of ``struct ublkml_fault`` (padding left out)
FAULT_FIELDS: tuple[str, ...] = ("delay_us", "slow_x1000", "mode", "burst_period_ms",
                                 "burst_on_ms", "ramp_ms", "err_ppm", "err_ops", "err_errno",
                                 "seed")


class EventHandler(Protocol):
    def __call__(self, tag: int, op: int, op_flags: int, offset: int, length: int,
                 buf: memoryview) -> int: ...


#: op of an event a stuck relay worker must skip, and the answer it gives
OP_CANCELLED: int = lib.UBLKML_OP_CANCELLED
RELAY_CANCELLED: int = lib.UBLKML_RELAY_CANCELLED
_RELAY_NOTE: int = lib.UBLKML_RELAY_NOTE

RING_COOP_TASKRUN: int = lib.IORING_SETUP_COOP_TASKRUN
RING_TASKRUN_FLAG: int = lib.IORING_SETUP_TASKRUN_FLAG
RING_SINGLE_ISSUER: int = lib.IORING_SETUP_SINGLE_ISSUER
RING_DEFER_TASKRUN: int = lib.IORING_SETUP_DEFER_TASKRUN


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def sizeof(ctype: str) -> int:
    """Size of a C type of the extension (for the layout tests)."""
    return int(ffi.sizeof(ctype))


def offsetof(ctype: str, fieldname: str) -> int:
    return int(ffi.offsetof(ctype, fieldname))


def c_constant(name: str) -> int:
    return int(getattr(lib, name))


class CtrlRing:
    """An SQE128 io_uring bound to ``/dev/ublk-control``."""

    def __init__(self, path: str = "/dev/ublk-control") -> None:
        out = ffi.new("struct ublkml_ctrl **")
        _check(lib.ublkml_ctrl_open(out, path.encode()), f"open {path}")
        self._c: Any = out[0]

    def close(self) -> None:
        if self._c is not None:
            lib.ublkml_ctrl_close(self._c)
            self._c = None

    def cmd(self, cmd_op: int, dev_id: int, queue_id: int, buf: bytearray | None,
            data0: int = 0) -> int:
        """Send one command; ``buf`` (if any) is passed by address and updated in place.

        Returns the CQE result: negative errno on failure (not raised, so the
        caller can map errnos to its own exceptions).
        """
        if self._c is None:
            raise ValueError("control ring is closed")
        if buf is None:
            return int(lib.ublkml_ctrl_cmd(self._c, cmd_op, dev_id, queue_id, ffi.NULL, 0,
                                           data0))
        cbuf = ffi.from_buffer(buf)
        return int(lib.ublkml_ctrl_cmd(self._c, cmd_op, dev_id, queue_id, cbuf, len(buf),
                                       data0))


@dataclass(frozen=True)
class LegStats:
    """``struct ublkml_leg_info`` of one mirror leg."""

    state: int
    dirty_regions: int
    total_regions: int
    reads: int
    writes: int
    errors: int
    probes: int


class CTarget:
    """A C target object; queues of one device share it.

    Control calls (faults, leg states, resync) may come from any thread
    while the queues serve; ``free`` waits until none is running, so a
    control thread never touches a freed target.
    """

    def __init__(self, kind: int, size: int, fd: int = -1, is_bdev: bool = False,
                 legs: Sequence[tuple[int, bool]] = (), region_shift: int = 20,
                 journal_fd: int = -1) -> None:
        out = ffi.new("struct ublkml_target **")
        if kind == TGT_NULL:
            ret = lib.ublkml_target_new_null(out, size)
        elif kind == TGT_MEM:
            ret = lib.ublkml_target_new_mem(out, size)
        elif kind == TGT_LOOP:
            ret = lib.ublkml_target_new_loop(out, fd, int(is_bdev), size)
        elif kind == TGT_EVENTS:
            ret = lib.ublkml_target_new_events(out, size)
        elif kind == TGT_MIRROR:
            fds = ffi.new("int[]", [leg_fd for leg_fd, _ in legs])
            bdevs = ffi.new("int[]", [int(b) for _, b in legs])
            ret = lib.ublkml_target_new_mirror(out, fds, bdevs, len(legs), size, region_shift,
                                               journal_fd)
        else:
            raise ValueError(f"unknown native target kind {kind}")
        _check(ret, "create target")
        self._t: Any = out[0]
        self.kind = kind
        self.size = size
        self._users = 0
        self._cond = threading.Condition()

    @property
    def handle(self) -> Any:
        return self._t

    @contextlib.contextmanager
    def _use(self) -> Iterator[Any]:
        with self._cond:
            if self._t is None:
                raise ValueError("the target is closed (the device has stopped)")
            self._users += 1
            t = self._t
        try:
            yield t
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    def free(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._users == 0)
            if self._t is not None:
                lib.ublkml_target_free(self._t)
                self._t = None

    @property
    def n_paths(self) -> int:
        """Completion paths: mirror legs, 1 for null/mem/loop, 0 for event targets."""
        with self._use() as t:
            return int(lib.ublkml_target_n_paths(t))

    def set_fault(self, path: int, fields: Mapping[str, int] | None) -> None:
        """Set (``fields``: names of :data:`FAULT_FIELDS`) or clear (None) a path's fault."""
        with self._use() as t:
            if fields is None:
                _check(lib.ublkml_target_set_fault(t, path, ffi.NULL), f"clear fault {path}")
                return
            unknown = set(fields) - set(FAULT_FIELDS)
            if unknown:
                raise ValueError(f"unknown fault fields {sorted(unknown)}")
            f = ffi.new("struct ublkml_fault *")
            for name, value in fields.items():
                setattr(f, name, value)
            _check(lib.ublkml_target_set_fault(t, path, f), f"set fault on path {path}")

    def get_fault(self, path: int) -> dict[str, int] | None:
        with self._use() as t:
            f = ffi.new("struct ublkml_fault *")
            if not _check(lib.ublkml_target_get_fault(t, path, f), f"get fault {path}"):
                return None
            return {name: int(getattr(f, name)) for name in FAULT_FIELDS}

    def set_leg_state(self, leg: int, state: int) -> None:
        """Raises OSError: EBUSY (last ACTIVE leg), EAGAIN (dirty regions left)."""
        with self._use() as t:
            _check(lib.ublkml_mirror_set_leg_state(t, leg, state), f"leg {leg}")

    def leg_info(self, leg: int) -> LegStats:
        with self._use() as t:
            info = ffi.new("struct ublkml_leg_info *")
            _check(lib.ublkml_mirror_leg_info(t, leg, info), f"leg {leg}")
            return LegStats(int(info.state), int(info.dirty_regions), int(info.total_regions),
                            int(info.reads), int(info.writes), int(info.errors),
                            int(info.probes))

    def set_probe_every(self, n: int) -> None:
        if not 0 <= n < 1 << 32:
            raise ValueError(f"probe interval must be 0..2^32-1 reads, got {n}")
        with self._use() as t:
            _check(lib.ublkml_mirror_set_probe_every(t, n), "probe interval")

    def resync(self, leg: int, max_regions: int) -> int:
        """Copy up to ``max_regions`` dirty regions (blocking, GIL released); regions left."""
        if not 0 <= max_regions < 1 << 31:
            raise ValueError(f"max_regions must be 0..2^31-1, got {max_regions}")
        with self._use() as t:
            return _check(lib.ublkml_mirror_resync(t, leg, max_regions), f"resync leg {leg}")


def set_thread_name(name: str) -> None:
    """Name the calling OS thread (at most 15 bytes are kept), for top/perf."""
    lib.ublkml_set_thread_name(name.encode()[:15])


def dio_alignment(fd: int, is_bdev: bool) -> int:
    return int(lib.ublkml_dio_alignment(fd, int(is_bdev)))


@dataclass(frozen=True)
class QueueStats:
    ops: tuple[int, ...]
    bytes: tuple[int, ...]
    errors: int
    batches: int
    #: the last request answered with an error: negative errno (0: none), op, offset
    last_error: int = 0
    last_error_op: int = 0
    last_error_offset: int = 0


@dataclass(frozen=True)
class RelayStats:
    """Plug-in calls of one relayed queue (``struct ublkml_relay_stats``)."""

    timeouts: int   # I/Os failed because their plug-in call hung
    late: int       # hung calls that returned later
    unserved: int   # I/Os failed because no worker took them in time
    stuck: int      # calls running past the timeout now
    workers: int


@dataclass(frozen=True)
class RelayNote:
    """News for a relay worker (``struct ublkml_relay_note``)."""

    stuck: int            # calls running past the timeout now
    timeouts: int         # I/Os failed by the timeout, ever
    late: int             # given-up calls that returned later, ever
    spawn: bool           # start one more worker (a spare)
    came_back: bool       # this worker's previous call had been given up ...
    late_s: float         # ... and returned this long after it was handed out
    new_timeouts: int     # I/Os failed by the timeout since the last such note; the last:
    op: int
    op_flags: int
    offset: int
    length: int
    stuck_s: float        # how long that call had run


class EventBatch:
    """A reusable array of ``struct ublkml_event`` for event-target queues."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.c: Any = ffi.new("struct ublkml_event[]", size)


class Descriptors:
    """One queue's I/O descriptors mapped from the char device.

    The driver lets a single process map descriptors (the first mapper's mm);
    a server whose queues run in child processes maps them all here, before
    it forks, and each child's :class:`Queue` borrows its inherited mapping.
    """

    def __init__(self, cdev_fd: int, q_id: int, depth: int) -> None:
        out = ffi.new("void **")
        _check(lib.ublkml_map_descriptors(cdev_fd, q_id, depth, out),
               f"map the descriptors of queue {q_id}")
        self._p: Any = out[0]
        self.depth = depth

    def unmap(self) -> None:
        if self._p is not None:
            lib.ublkml_unmap_descriptors(self._p, self.depth)
            self._p = None


class Queue:
    """One ublk queue: its ring, its descriptors, its buffers.

    ``cdev_fd < 0`` makes a harness queue without the driver (unit tests).
    ``descriptors``: mapped by the parent of this queue process (else mapped here).
    """

    def __init__(self, target: CTarget, cdev_fd: int, q_id: int, depth: int,
                 buf_size: int, ioctl_encode: bool, ring_flags: int = 0,
                 descriptors: Descriptors | None = None) -> None:
        out = ffi.new("struct ublkml_queue **")
        iods = ffi.NULL if descriptors is None else descriptors._p
        _check(lib.ublkml_queue_new(out, target.handle, cdev_fd, q_id, depth, buf_size,
                                    int(ioctl_encode), ring_flags, iods),
               f"set up queue {q_id}")
        self._q: Any = out[0]
        self._target = target  # keep alive as long as the queue
        self.q_id = q_id
        self.depth = depth
        self.buf_size = buf_size
        self._bufs: list[memoryview] | None = None
        self._relayed = False

    def free(self) -> None:
        if self._q is not None:
            self._bufs = None
            lib.ublkml_queue_free(self._q)
            self._q = None

    def set_spin(self, usec: int) -> None:
        """Poll up to ``usec`` microseconds for new I/O before sleeping (0: never poll)."""
        if not 0 <= usec <= 1_000_000:
            raise ValueError(f"spin time must be 0..1000000 us, got {usec}")
        lib.ublkml_queue_set_spin(self._q, usec)

    def submit_fetches(self) -> None:
        _check(lib.ublkml_queue_submit_fetches(self._q), f"queue {self.q_id}: FETCH_REQ")

    def run(self) -> None:
        """Serve a native target until the driver aborts the queue."""
        _check(lib.ublkml_queue_run(self._q), f"queue {self.q_id}")

    def commit_and_wait(self, batch: EventBatch, n_done: int) -> int:
        """Commit ``batch[0:n_done]`` and wait for new requests; -1 once stopped."""
        ret = int(lib.ublkml_queue_commit_and_wait(self._q, batch.c, n_done, batch.size))
        if ret == -errno.ENODEV:
            return -1
        return _check(ret, f"queue {self.q_id}")

    def buffer(self, tag: int) -> memoryview:
        """The I/O buffer of ``tag`` (``buf_size`` bytes), without copying.

        Relayed queues give a tag a fresh buffer when its plug-in call hangs:
        their buffers are looked up each time."""
        if self._relayed:
            return memoryview(ffi.buffer(lib.ublkml_queue_buf(self._q, tag), self.buf_size))
        if self._bufs is None:
            self._bufs = [
                memoryview(ffi.buffer(lib.ublkml_queue_buf(self._q, t), self.buf_size))
                for t in range(self.depth)
            ]
        return self._bufs[tag]

    def serve_events(self, handler: EventHandler, batch_size: int | None = None) -> None:
        """Serve an event target: ``handler`` answers each request with a result.

        ``handler(tag, op, op_flags, offset, length, buf)`` returns the bytes
        moved or a negative errno.  One C call per batch commits the previous
        answers and waits for the next requests.
        """
        batch = EventBatch(batch_size or self.depth)
        evs = batch.c
        self.buffer(0)
        bufs = self._bufs
        assert bufs is not None
        n = 0
        while True:
            n = self.commit_and_wait(batch, n)
            if n < 0:
                return
            for i in range(n):
                e = evs[i]
                tag = e.tag
                e.result = handler(tag, e.op, e.op_flags, e.start_sector << 9,
                                   e.nr_sectors << 9, bufs[tag])

    def enable_records(self, capacity: int) -> None:
        """Record every completion into a ring of ``capacity`` (a power of two) entries."""
        _check(lib.ublkml_queue_enable_records(self._q, capacity), "enable records")

    def read_records(self, out: Any) -> int:
        """Move up to ``len(out)`` records into ``out`` (a numpy array of
        ``records.COMPLETION_DTYPE``); returns how many."""
        if self._q is None:
            return 0
        ptr = ffi.cast("struct ublkml_completion *", ffi.from_buffer(out))
        return int(lib.ublkml_queue_read_records(self._q, ptr, len(out)))

    def records_dropped(self) -> int:
        return int(lib.ublkml_queue_records_dropped(self._q)) if self._q is not None else 0

    def enable_summaries(self) -> None:
        """Keep per-path cumulative summaries (``records.SUMMARY_DTYPE``)."""
        _check(lib.ublkml_queue_enable_summaries(self._q), "enable summaries")

    def read_summaries(self, out: Any) -> int:
        """Copy the summaries into ``out`` (``records.SUMMARY_DTYPE``, one row
        per path, at most MAX_LEGS); returns the rows written."""
        if self._q is None:
            return 0
        if out.dtype["hist"].shape[0] != lib.UBLKML_SUM_BINS:
            raise ValueError("summary dtype does not match the engine")
        ptr = ffi.cast("struct ublkml_path_summary *", ffi.from_buffer(out))
        return _check(lib.ublkml_queue_read_summaries(self._q, ptr, len(out)),
                      "read summaries")

    def stats(self) -> QueueStats:
        st = ffi.new("struct ublkml_queue_stats *")
        if self._q is not None:
            lib.ublkml_queue_get_stats(self._q, st)
        return QueueStats(tuple(st.ops), tuple(st.bytes), int(st.errors), int(st.batches),
                          int(st.last_error), int(st.last_error_op),
                          int(st.last_error_offset))

    # ---- the relay: plug-in calls off the ring thread, with a timeout ----------

    def relay_init(self, timeout: float, max_stuck: int) -> None:
        """Make this event queue relayed: a plug-in call that has not returned
        after ``timeout`` seconds fails its I/O with ETIMEDOUT.  At most
        2 + ``max_stuck`` workers.  Before serving."""
        if not 0 < timeout <= 86400:
            raise ValueError(f"relay timeout must be 0..86400 s, got {timeout}")
        if not 0 <= max_stuck <= 1024:
            raise ValueError(f"max_stuck must be 0..1024, got {max_stuck}")
        _check(lib.ublkml_queue_relay_init(self._q, round(timeout * 1e9), max_stuck),
               f"queue {self.q_id}: relay")
        self._bufs = None
        self._relayed = True

    def relay(self) -> None:
        """The ring thread of a relayed queue: serve until the driver aborts it
        (harness: until every injected request is answered); then every
        worker waiting for work returns."""
        _check(lib.ublkml_queue_relay(self._q), f"queue {self.q_id}")

    def relay_stats(self) -> RelayStats | None:
        if self._q is None:
            return None
        st = ffi.new("struct ublkml_relay_stats *")
        if lib.ublkml_queue_relay_stats(self._q, st) < 0:
            return None
        return RelayStats(int(st.timeouts), int(st.late), int(st.unserved), int(st.stuck),
                          int(st.workers))

    def relay_report(self) -> RelayNote | None:
        """Hung calls not reported yet by a worker's note (then they are)."""
        if self._q is None:
            return None
        c = ffi.new("struct ublkml_relay_note *")
        if lib.ublkml_queue_relay_report(self._q, c) <= 0:
            return None
        return _relay_note(c)

    def relay_worker(self) -> RelayWorker:
        """Join a worker (on any thread; serve it on its own thread)."""
        return RelayWorker(self)

    # ---- harness ------------------------------------------------------------

    def inject(self, tag: int, op_flags: int, start_sector: int, nr_sectors: int) -> None:
        _check(lib.ublkml_queue_inject(self._q, tag, op_flags, start_sector, nr_sectors),
               "inject")

    def relay_feed(self, tag: int, op_flags: int, start_sector: int, nr_sectors: int,
                   more: bool = True) -> None:
        """Harness: hand a request to the running relay (tag -1: none); ``more``
        False lets the relay finish once everything is answered."""
        _check(lib.ublkml_queue_relay_feed(self._q, tag, op_flags, start_sector, nr_sectors,
                                           int(more)), "relay feed")

    def relay_harvest(self, batch: EventBatch) -> list[tuple[int, int]]:
        """Harness: (tag, result) answered so far, while the relay runs."""
        n = _check(lib.ublkml_queue_relay_harvest(self._q, batch.c, batch.size),
                   "relay harvest")
        return [(int(batch.c[i].tag), int(batch.c[i].result)) for i in range(n)]

    def harvest(self, batch: EventBatch) -> list[tuple[int, int]]:
        """(tag, result) of the requests completed since the last harvest.

        Waits for target I/O (and injected delays) while nothing is ready."""
        n = _check(lib.ublkml_queue_harvest(self._q, batch.c, batch.size), "harvest")
        return [(int(batch.c[i].tag), int(batch.c[i].result)) for i in range(n)]


class RelayWorker:
    """A thread's seat at a relayed queue: it takes batches and answers them.

    Joined when created (so the queue counts it before it runs); the C side
    frees it when :meth:`serve` returns, and the queue's memory stays until
    the last worker has left, even when the queue was freed first (a plug-in
    call that never returns).
    """

    def __init__(self, queue: Queue) -> None:
        if queue._q is None:
            raise ValueError("the queue is freed")
        out = ffi.new("struct ublkml_relay_worker **")
        _check(lib.ublkml_relay_join(queue._q, out), f"queue {queue.q_id}: relay worker")
        self._w: Any = out[0]
        self._qptr: Any = queue._q
        self.q_id = queue.q_id
        self.depth = queue.depth
        self.buf_size = queue.buf_size

    def _views(self) -> list[memoryview]:
        return [memoryview(ffi.buffer(lib.ublkml_queue_buf(self._qptr, t), self.buf_size))
                for t in range(self.depth)]

    def serve(self, handler: EventHandler, on_note: Callable[[RelayNote], None]) -> None:
        """Answer batches with ``handler`` until the queue is done.

        ``on_note`` is called (on this thread, before the batch is served)
        when there is news: a call given up by the timeout, this worker's own
        stuck call having returned, a spare to start.
        """
        if self._w is None:
            raise ValueError("this worker has left")
        w = self._w
        batch = EventBatch(self.depth)
        evs = batch.c
        size = batch.size
        cnote = ffi.new("struct ublkml_relay_note *")
        nxt = lib.ublkml_relay_next
        NOTE = _RELAY_NOTE
        bufs = self._views()
        n = 0
        while True:
            ret = nxt(w, evs, n, size, cnote)
            if ret < 0:
                self._w = None
                if ret == -errno.ENODEV:
                    return
                _check(ret, f"queue {self.q_id}: relay worker")
            n = ret
            if ret & NOTE:
                n = ret & (NOTE - 1)
                bufs = self._views()    # a stuck call's tag got a fresh buffer
                on_note(_relay_note(cnote))
            for i in range(n):
                e = evs[i]
                tag = e.tag
                e.result = handler(tag, e.op, e.op_flags, e.start_sector << 9,
                                   e.nr_sectors << 9, bufs[tag])


def _relay_note(c: Any) -> RelayNote:
    return RelayNote(stuck=int(c.stuck), timeouts=int(c.timeouts), late=int(c.late),
                     spawn=bool(c.spawn), came_back=bool(c.came_back),
                     late_s=int(c.late_ns) / 1e9, new_timeouts=int(c.new_timeouts),
                     op=int(c.op), op_flags=int(c.op_flags), offset=int(c.start_sector) << 9,
                     length=int(c.nr_sectors) << 9, stuck_s=int(c.stuck_ns) / 1e9)
