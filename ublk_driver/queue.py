"""Queue workers: one thread and one io_uring per ublk queue.

The thread that submits a queue's FETCH commands is the only one the driver
lets issue that queue's later commands, so the worker sets up its queue, sends
the FETCHes and serves, all on its own thread.  The C calls release the GIL:
native queues run in parallel; plug-in queues take the GIL only for the
plug-in's own methods.

A plug-in with a timeout (the default) is served through the relay: this
thread keeps the ring in C and never runs plug-in code; two worker threads
(one serving, one spare) call the plug-in, and a worker whose call hangs is
given up after the timeout (see ``targets/plugin.py``).

Plug-in queues share one GIL when they are threads: two queues of a Python
plug-in run no faster than one.  :class:`QueueProcess` serves a queue from a
child process instead (``ublkml add --queue-processes``), for plug-ins whose
state survives a fork (``Target.fork_safe``).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import signal
import struct
import sys
import threading
import time
from typing import Any

from ublk_driver import _bindings
from ublk_driver.core.errors import ConfigError, UblkError
from ublk_driver.targets.base import Backend
from ublk_driver.targets.plugin import MAX_STUCK, PluginBackend
from ublk_driver.uapi import Op


def default_ring_flags() -> int:
    """Ring set-up flags of queue rings (``UBLKML_RING_FLAGS`` overrides, for tuning)."""
    env = os.environ.get("UBLKML_RING_FLAGS")
    if env is not None:
        return int(env, 0)
    # Task work (the driver's completions of our FETCH/COMMIT commands) runs
    # only when this thread asks for completions: one wake-up per batch
    # instead of one per request. Measured: ~2x IOPS for the null target.
    return _bindings.RING_SINGLE_ISSUER | _bindings.RING_DEFER_TASKRUN


#: the longest hybrid-polling budget a queue accepts (``--poll-us``)
MAX_POLL_US = 10000


def check_poll_us(usec: int) -> int:
    """A hybrid-polling budget in microseconds, 0 (off) to :data:`MAX_POLL_US`."""
    if isinstance(usec, bool) or not isinstance(usec, int) or not 0 <= usec <= MAX_POLL_US:
        raise ConfigError(f"poll time must be 0..{MAX_POLL_US} us, got {usec!r}")
    return usec


def default_spin_usec() -> int:
    """Hybrid-polling budget of queue threads when ``--poll-us`` is not given:
    ``UBLKML_POLL_US``, else 0 (off)."""
    env = os.environ.get("UBLKML_POLL_US", "0")
    try:
        return check_poll_us(int(env))
    except (ValueError, ConfigError):
        raise ConfigError(f"UBLKML_POLL_US={env!r}: give microseconds, 0..{MAX_POLL_US}"
                          ) from None


class QueueWorker(threading.Thread):
    def __init__(self, backend: Backend, ctarget: _bindings.CTarget, cdev_fd: int, q_id: int,
                 depth: int, buf_size: int, ioctl_encode: bool,
                 cpus: set[int] | None = None, record_capacity: int = 0,
                 summaries: bool = False, poll_us: int = 0,
                 descriptors: _bindings.Descriptors | None = None) -> None:
        super().__init__(name=f"ublk-q{q_id}", daemon=True)
        self.descriptors = descriptors
        self.poll_us = poll_us
        self.backend = backend
        self.ctarget = ctarget
        self.cdev_fd = cdev_fd
        self.q_id = q_id
        self.depth = depth
        self.buf_size = buf_size
        self.ioctl_encode = ioctl_encode
        self.cpus = cpus
        self.record_capacity = record_capacity
        self.summaries = summaries
        # The queue outlives the thread: the server frees it after join, so
        # that a record reader never races with the free.
        self.queue: _bindings.Queue | None = None
        self.fetched = threading.Event()
        self.error: BaseException | None = None
        self.final_stats: _bindings.QueueStats | None = None
        self.done = threading.Event()
        self._free_lock = threading.Lock()  # stats readers vs free()

    def run(self) -> None:
        watch: ErrorWatch | None = None
        try:
            _bindings.set_thread_name(f"ublk-q{self.q_id}")
            if self.cpus:
                # Run where blk-mq maps this queue's submitters: completions
                # stay on the CPUs that issued the I/O.
                os.sched_setaffinity(0, self.cpus)
            queue = _bindings.Queue(self.ctarget, self.cdev_fd, self.q_id, self.depth,
                                    self.buf_size, self.ioctl_encode, default_ring_flags(),
                                    self.descriptors)
            self.queue = queue
            queue.set_spin(self.poll_us)
            if self.record_capacity:
                queue.enable_records(self.record_capacity)
            if self.summaries:
                queue.enable_summaries()
            plugin = self.backend if isinstance(self.backend, PluginBackend) else None
            if plugin is not None and plugin.timeout > 0:
                queue.relay_init(plugin.timeout, MAX_STUCK)
            queue.submit_fetches()
            self.fetched.set()
            watch = ErrorWatch(self)
            watch.start()
            if plugin is not None and plugin.timeout > 0:
                self._serve_relayed(queue, plugin)
            elif plugin is not None:
                queue.serve_events(plugin.handler())
            else:
                queue.run()
        except BaseException as e:  # reported by the server, never lost
            self.error = e
        finally:
            self.fetched.set()
            if self.queue is not None:
                self.final_stats = self.queue.stats()
            self.done.set()
            if watch is not None:
                watch.join(5)  # its last line written: this queue leaves no thread

    def _serve_relayed(self, queue: _bindings.Queue, backend: PluginBackend) -> None:
        pool = RelayPool(queue, backend, self.q_id)
        pool.run()
        if pool.error is not None and self.error is None:
            self.error = pool.error

    def report_hangs(self) -> None:
        """Log plug-in calls that hung and that no worker reported yet."""
        if not isinstance(self.backend, PluginBackend):
            return
        with self._free_lock:
            note = self.queue.relay_report() if self.queue is not None else None
        if note is not None:
            self.backend.relay_note(self.q_id, note)

    def stats(self) -> _bindings.QueueStats | None:
        """The queue's counters: live while it serves, final afterwards."""
        with self._free_lock:
            if self.final_stats is not None:
                return self.final_stats
            q = self.queue
            return q.stats() if q is not None else None

    def stats_dict(self) -> dict[str, Any] | None:
        """``stats()`` for ``ublkml status`` (JSON), with the plug-in timeouts."""
        st = self.stats()
        if st is None:
            return None
        out: dict[str, Any] = {"q_id": self.q_id, "ops": st.ops, "errors": st.errors,
                               "batches": st.batches}
        if st.last_error:
            errno_name = _errno_name(-st.last_error)
            out["last_error"] = {"errno": errno_name, "op": _op_name(st.last_error_op),
                                 "offset": st.last_error_offset}
        with self._free_lock:
            q = self.queue
            relay = q.relay_stats() if q is not None else None
        if relay is not None:
            out["plugin"] = {"timeouts": relay.timeouts, "late": relay.late,
                             "unserved": relay.unserved, "stuck": relay.stuck}
        return out

    def free(self) -> None:
        """Release the queue (after the thread ended)."""
        with self._free_lock:
            if self.queue is not None:
                self.queue.free()
                self.queue = None


class QueueProcess:
    """A queue served from a child process, with the interface of a thread.

    Why: a plug-in's Python code holds the GIL, so plug-in queues that are
    threads of one process take turns; in processes they run in parallel.
    How: the driver lets one mm map the descriptors, so the server maps every
    queue's (:class:`_bindings.Descriptors`), then forks one child per queue
    *before* it starts any thread of its own (:meth:`fork`); the child runs
    an ordinary :class:`QueueWorker` on its main thread with the inherited
    mapping, char device and plug-in object.  The driver only asks that one
    task issue all of a queue's commands, which the child does.

    The child tells the parent through a pipe that its FETCHes are out (or
    why it failed), and publishes its counters (``stats_dict``) as JSON in a
    shared page twice a second.  It ignores SIGINT/SIGTERM (the server stops
    the device, which aborts the queue, and the child then exits) and exits
    by itself within half a second if the server dies, so that the kernel
    sees the queue's server gone (device removed, or kept for `recover`).

    Every child gets a *copy* of the plug-in object: its state must live in
    shared memory or files (``Target.fork_safe``), completion records and
    summaries (the scorer's input) stay in the child and are refused.
    """

    _SLOT = 1 << 16   # shared counters: generation, then two halves of (length, JSON)
    _HALF = (_SLOT - 8) // 2

    def __init__(self, worker: QueueWorker) -> None:
        self.worker = worker
        self.q_id = worker.q_id
        self.pid = 0
        self.fetched = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.queue: _bindings.Queue | None = None   # the queue is in the child
        self.final_stats: _bindings.QueueStats | None = None
        self._slot = mmap.mmap(-1, self._SLOT)      # MAP_SHARED | MAP_ANONYMOUS
        self._pipe = -1
        self._reader: threading.Thread | None = None

    # ---- parent -------------------------------------------------------------

    def fork(self) -> None:
        """Start the child (call for every queue before :meth:`start`)."""
        r, w = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child never returns from here
            code = 1
            try:
                os.close(r)
                code = self._child(w, parent)
            except BaseException as e:
                self._tell(w, f"E{type(e).__name__}: {e}")
            finally:
                os._exit(code)
        os.close(w)
        self.pid = pid
        self._pipe = r

    def start(self) -> None:
        """Follow the child's reports (a thread: after every fork is done)."""
        if not self.pid:
            self.fork()
        self._reader = threading.Thread(target=self._read_reports,
                                        name=f"ublk-q{self.q_id}-proc", daemon=True)
        self._reader.start()

    def _read_reports(self) -> None:
        buf = b""
        with os.fdopen(self._pipe, "rb", buffering=0) as pipe:
            while chunk := pipe.read(4096):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    text = line.decode(errors="replace")
                    if text == "F":
                        self.fetched.set()
                    elif text.startswith("E") and self.error is None:
                        self.error = UblkError(f"queue process {self.pid}: {text[1:]}")
        self.final_stats = self.stats()
        _, status = os.waitpid(self.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and self.error is None:
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            self.error = UblkError(f"queue process {self.pid} ended with {how}")
        self.fetched.set()
        self.done.set()

    def is_alive(self) -> bool:
        return bool(self.pid) and not self.done.is_set()

    def join(self, timeout: float | None = None) -> None:
        self.done.wait(timeout)

    def kill(self) -> None:
        """Last resort when a child did not stop: it holds the char device."""
        if self.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def stats(self) -> _bindings.QueueStats | None:
        st = self.stats_dict()
        if st is None:
            return None
        return _bindings.QueueStats(ops=tuple(st["ops"]), bytes=(), errors=st["errors"],
                                    batches=st["batches"])

    def stats_dict(self) -> dict[str, Any] | None:
        """The child's counters as of its last publication (<= 0.5 s old)."""
        # Two halves, written in turn; the header names the complete one,
        # which the child leaves alone for the next half second.
        gen = struct.unpack_from("Q", self._slot, 0)[0]
        if gen == 0:
            return None
        base = 8 + (gen % 2) * self._HALF
        n = struct.unpack_from("I", self._slot, base)[0]
        try:
            out: dict[str, Any] = json.loads(self._slot[base + 4:base + 4 + n])
        except ValueError:  # read across a publication: the next read has it
            return None
        out["pid"] = self.pid
        return out

    def report_hangs(self) -> None:
        """The child's own ErrorWatch logs its hung plug-in calls."""

    def free(self) -> None:
        if not self.is_alive():
            self._slot.close()

    # ---- child --------------------------------------------------------------

    @staticmethod
    def _tell(fd: int, line: str) -> None:
        with contextlib.suppress(OSError):
            os.write(fd, (line.replace("\n", " ") + "\n").encode())

    def _child(self, report: int, parent: int) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        worker = self.worker
        worker.fetched = threading.Event()  # events of the parent's threading are not ours
        worker.done = threading.Event()
        stop = threading.Event()

        def publish() -> None:
            told = False
            while not stop.wait(0.5 if told else 0.01):
                if not told and worker.fetched.is_set():
                    self._tell(report, "F" if worker.error is None else
                               f"E{worker.error}")
                    told = True
                if os.getppid() != parent:  # the server died: so do we
                    os._exit(1)
                self._publish(worker.stats_dict())

        t = threading.Thread(target=publish, name=f"ublk-q{self.q_id}-pub", daemon=True)
        t.start()
        worker.run()  # on this thread: the one that FETCHes serves the queue
        stop.set()
        t.join()
        self._publish(worker.stats_dict())
        if worker.error is not None:
            self._tell(report, f"E{worker.error}")
            return 1
        return 0

    def _publish(self, st: dict[str, Any] | None) -> None:
        if st is None:
            return
        data = json.dumps(st).encode()
        if len(data) > self._HALF - 4:
            return
        gen = struct.unpack_from("Q", self._slot, 0)[0] + 1
        base = 8 + (gen % 2) * self._HALF
        struct.pack_into("I", self._slot, base, len(data))
        self._slot[base + 4:base + 4 + len(data)] = data
        struct.pack_into("Q", self._slot, 0, gen)


def _errno_name(value: int) -> str:
    import errno

    return errno.errorcode.get(value, str(value))


def _op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return str(op)


def _pin(cpus: set[int]) -> bool:
    """Pin the calling thread to ``cpus``; False if that failed (a CPU gone
    offline, a cpuset changed meanwhile): pinning the relay is a speed-up
    only, not worth failing a queue for."""
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:
        return False
    return True


class RelayPool:
    """The plug-in workers of one relayed queue (``relay_init`` done).

    :meth:`run` is the queue's ring thread: it starts two workers (one
    serves, one waits as the spare), serves until the queue is done (the
    harness: until every injected request is answered), then lets the idle
    workers go.  A worker whose plug-in call hung is given up by the C side;
    the note that reports it asks for a new spare, started here.
    """

    def __init__(self, queue: _bindings.Queue, backend: PluginBackend, q_id: int) -> None:
        self.queue = queue
        self.backend = backend
        self.q_id = q_id
        self.error: BaseException | None = None
        self.stuck_at_exit = 0
        self.cpu: int | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._seq = 0

    def _pick_cpu(self) -> int | None:
        """One CPU for the ring thread and its workers (``UBLKML_RELAY_PIN=0``: none).

        A hand-over between threads on one CPU is a context switch; between
        CPUs it is a wake-up of another (often idle) CPU, an IPI, which is
        what made the relay costly where it was measured (docs/architecture.md).
        """
        if os.environ.get("UBLKML_RELAY_PIN", "1") == "0":
            return None
        cpus = sorted(os.sched_getaffinity(0))
        return cpus[self.q_id % len(cpus)] if cpus else None

    def run(self, leave_wait: float = 2.0) -> None:
        self.cpu = self._pick_cpu()
        # The caller's own CPUs, given back at the end: a harness runs the
        # relay on a thread that goes on (pytest's main thread, which would
        # otherwise stay on one CPU for the rest of the session, and so would
        # every thread it starts later).
        before = os.sched_getaffinity(0)
        if self.cpu is not None and not _pin({self.cpu}):  # this thread keeps the ring
            self.cpu = None
        for _ in range(2):
            self.start_worker()
        try:
            self.queue.relay()
        finally:
            if self.cpu is not None:
                _pin(before)
            self.report_hangs()
            # Idle workers leave at once; one still inside a hung call stays
            # (a daemon thread): the queue's memory waits for it.
            deadline = time.monotonic() + leave_wait
            with self._lock:
                threads = list(self._threads)
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            self.stuck_at_exit = sum(t.is_alive() for t in threads)
            if self.stuck_at_exit:
                print(f"ublkml: queue {self.q_id}: {self.stuck_at_exit} plug-in call(s) "
                      "still stuck at shutdown, left running", file=sys.stderr, flush=True)

    def report_hangs(self) -> None:
        """Log hung calls no worker's note reported (every worker stuck)."""
        note = self.queue.relay_report()
        if note is not None:
            self.backend.relay_note(self.q_id, note)

    def start_worker(self) -> None:
        worker = self.queue.relay_worker()  # joined now: counted before it runs
        handler = self.backend.handler()
        q_id = self.q_id

        def on_note(note: _bindings.RelayNote) -> None:
            self.backend.relay_note(q_id, note)
            if note.spawn:
                try:
                    self.start_worker()
                except (OSError, ValueError, RuntimeError) as e:
                    print(f"ublkml: queue {q_id}: cannot start a spare plug-in worker: {e}",
                          file=sys.stderr, flush=True)

        def serve() -> None:
            try:
                _bindings.set_thread_name(f"ublk-q{q_id}-py")
                if self.cpu is not None:
                    _pin({self.cpu})
                worker.serve(handler, on_note)
            except BaseException as e:  # never silent
                print(f"ublkml: queue {q_id}: plug-in worker failed: {e!r}",
                      file=sys.stderr, flush=True)
                if self.error is None:
                    self.error = e

        with self._lock:
            self._seq += 1
            t = threading.Thread(target=serve, name=f"ublk-q{q_id}-py{self._seq}",
                                 daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()


class ErrorWatch(threading.Thread):
    """Logs a queue's I/O errors (at most one line per ``interval``) while it serves.

    The engine answers a failed request without any Python; this thread
    reads its counters, so backing-store errors (a failing disk, a full file
    system, an injected fault) show up in the server's log, as well as in
    ``ublkml status``.
    """

    def __init__(self, worker: QueueWorker, interval: float = 1.0) -> None:
        super().__init__(name=f"ublk-q{worker.q_id}-err", daemon=True)
        self.worker = worker
        self.interval = interval

    def run(self) -> None:
        seen = 0
        last = time.monotonic()
        while True:
            finished = self.worker.done.wait(self.interval)
            self.worker.report_hangs()
            st = self.worker.stats()
            now = time.monotonic()
            if st is not None and st.errors > seen:
                op = _op_name(st.last_error_op)
                print(f"ublkml: queue {self.worker.q_id}: {st.errors - seen} I/O error(s) in "
                      f"the last {now - last:.1f} s ({st.errors} in all); last: "
                      f"{_errno_name(-st.last_error)} on {op} at offset "
                      f"{st.last_error_offset}", file=sys.stderr, flush=True)
                seen = st.errors
            last = now
            if finished:
                return
