"""A ublk device and the server behind it.

Lifecycle (the kernel's order): ADD_DEV, SET_PARAMS, open ``/dev/ublkcN``,
queue threads submit their FETCHes, START_DEV (from this thread: it blocks
until every tag has a FETCH outstanding), serve, then STOP_DEV, join the
queues, close the char device, delete the device (DEL_DEV_ASYNC; DEL_DEV on
kernels without it), close the target so its data reaches stable storage,
and wait a bounded time for the kernel to free the device: it does once the
char device and every opener of ``/dev/ublkbN`` have closed it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from ublk_driver import _bindings
from ublk_driver.admin import AdminServer, socket_path
from ublk_driver.admin.paths import default_state_dir
from ublk_driver.blockdev import check_scheduler, read_scheduler, set_scheduler
from ublk_driver.control import Control, bdev_path, cdev_path, still_open_message
from ublk_driver.core.errors import ConfigError, ControlError, DeviceNotFoundError, UblkError
from ublk_driver.core.process import pid_alive
from ublk_driver.queue import QueueProcess, QueueWorker, check_poll_us, default_spin_usec
from ublk_driver.targets.base import Backend, CompletionPath
from ublk_driver.targets.plugin import PluginBackend, check_fork_safe
from ublk_driver.uapi import (
    DEV_ID_AUTO,
    MAX_QUEUE_DEPTH,
    Attr,
    DevInfo,
    DevState,
    Feature,
    ParamBasic,
    ParamDiscard,
    Params,
    ParamType,
)

if TYPE_CHECKING:
    import numpy as np

    from ublk_driver.faults import FaultSpec
    from ublk_driver.targets.mirror import LegInfo, MirrorTarget

DEFAULT_DEPTH = 128
DEFAULT_QUEUES = 1
DEFAULT_MAX_IO = 512 * 1024
#: how long shutdown waits for the kernel to free the deleted device (for a
#: process still holding /dev/ublkbN open) before it reports that and returns
DELETE_WAIT = 5.0


RECOVERY_FLAGS = {"off": 0, "reissue": int(Feature.USER_RECOVERY | Feature.USER_RECOVERY_REISSUE),
                  "fail": int(Feature.USER_RECOVERY)}


def possible_cpus() -> int:
    """nr_cpu_ids, the kernel's cap on the number of queues."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
        return max(int(part.split("-")[-1]) for part in text.split(",")) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ServerConfig:
    queues: int = DEFAULT_QUEUES
    depth: int = DEFAULT_DEPTH
    dev_id: int = DEV_ID_AUTO
    max_io_bytes: int = DEFAULT_MAX_IO
    #: completion records kept per queue for the ML scorer (0: off)
    record_capacity: int = 0
    #: per-path summaries counted by the queue threads (the scorer's input
    #: without per-I/O work in Python: Server.read_summaries)
    summaries: bool = False
    #: what the kernel does when the server dies: "off" (the device is
    #: removed), "reissue" (it waits for `ublkml recover`; I/O that the dead
    #: server had taken is sent again to the new one) or "fail" (it waits;
    #: I/O the dead server had taken fails)
    recovery: str = "off"
    #: hybrid polling: microseconds a queue thread keeps asking for
    #: completions before it sleeps (0: sleep at once; None: UBLKML_POLL_US
    #: or 0). Saves a sleep and a wake-up per batch on a busy device, at the
    #: price of a CPU kept busy while it spins (docs/benchmarks.md).
    poll_us: int | None = None
    #: serve each queue from a child process instead of a thread (plug-ins
    #: whose state survives a fork, ``Target.fork_safe``): plug-in code of
    #: different queues then runs in parallel instead of under one GIL.
    #: None (the default) decides per server: see :func:`use_queue_processes`.
    queue_processes: bool | None = None
    #: the block device's I/O scheduler, set once the device is started:
    #: "none" (the default) hands requests straight to the queues, as the
    #: kernel's loop and null_blk do; None keeps the kernel's choice
    #: (mq-deadline for one queue). See ublk_driver/blockdev.py for why.
    scheduler: str | None = "none"

    def spin_usec(self) -> int:
        """The queue threads' hybrid-polling budget: ``poll_us`` or its default."""
        return default_spin_usec() if self.poll_us is None else check_poll_us(self.poll_us)

    def validate(self) -> None:
        cpus = possible_cpus()
        if not 1 <= self.queues <= cpus:
            raise ConfigError(f"queue count must be 1..{cpus} (one per CPU at most), "
                              f"got {self.queues}")
        if not 1 <= self.depth <= MAX_QUEUE_DEPTH:
            raise ConfigError(f"queue depth must be 1..{MAX_QUEUE_DEPTH}, got {self.depth}")
        if self.dev_id != DEV_ID_AUTO and not 0 <= self.dev_id < 1 << 20:
            raise ConfigError(f"device id must be 0..{(1 << 20) - 1}, got {self.dev_id}")
        cap = self.record_capacity
        if cap and (cap & (cap - 1) or cap > 1 << 24):
            raise ConfigError(f"record capacity must be a power of two up to 2^24, got {cap}")
        check_scheduler(self.scheduler)
        self.spin_usec()  # a bad value or UBLKML_POLL_US fails here, before the device exists
        if self.recovery not in RECOVERY_FLAGS:
            raise ConfigError(f"recovery must be one of {', '.join(RECOVERY_FLAGS)}, "
                              f"got {self.recovery!r}")
        if self.queue_processes is True and (self.record_capacity or self.summaries):
            raise ConfigError("queue processes keep their completion records to themselves: "
                              "scoring (--score) needs queue threads (drop --queue-processes)")
        if self.max_io_bytes < 4096 or self.max_io_bytes % 4096 or self.max_io_bytes > 1 << 24:
            raise ConfigError("max I/O size must be a multiple of 4096 between 4K and 16M, "
                              f"got {self.max_io_bytes}")


def use_queue_processes(backend: Backend, config: ServerConfig) -> bool:
    """Whether a server serves its queues from processes (True) or threads.

    An explicit ``config.queue_processes`` decides (True is checked:
    :func:`check_fork_safe`).  Unset, processes serve a Python plug-in that
    declares ``fork_safe`` when there are several queues and no scoring: with
    threads, the queues' plug-in code takes turns on one GIL (two queues served
    by processes gave 1.5x the IOPS of two queue threads in the test bed,
    docs/architecture.md); one queue gains nothing from a process, and scoring
    reads the queue threads' in-process records.
    """
    if config.queue_processes is not None:
        if config.queue_processes:
            check_fork_safe(backend)
        return config.queue_processes
    return (isinstance(backend, PluginBackend) and backend.plugin.fork_safe
            and config.queues > 1 and not (config.record_capacity or config.summaries))


def build_params(backend: Backend, max_io_bytes: int) -> Params:
    caps = backend.capabilities
    bs = backend.block_size
    bs_shift = bs.bit_length() - 1
    attrs = 0
    if caps.read_only:
        attrs |= Attr.READ_ONLY
    if caps.rotational:
        attrs |= Attr.ROTATIONAL
    if caps.flush:
        attrs |= Attr.VOLATILE_CACHE
    if caps.fua:
        attrs |= Attr.FUA
    basic = ParamBasic(attrs=attrs, logical_bs_shift=bs_shift,
                       physical_bs_shift=max(bs_shift, 12), io_opt_shift=max(bs_shift, 12),
                       io_min_shift=bs_shift, max_sectors=max_io_bytes >> 9,
                       dev_sectors=backend.size >> 9)
    types = ParamType.BASIC
    discard = ParamDiscard()
    if caps.discard or caps.write_zeroes:
        types |= ParamType.DISCARD
        discard = ParamDiscard(
            discard_granularity=max(bs, 4096),
            max_discard_sectors=(1 << 30 >> 9) if caps.discard else 0,
            max_write_zeroes_sectors=(1 << 30 >> 9) if caps.write_zeroes else 0,
            max_discard_segments=1,
        )
    return Params(types=types, basic=basic, discard=discard)


class Server:
    """Serves one target as one ublk device, from this process."""

    def __init__(self, backend: Backend, config: ServerConfig | None = None,
                 control: Control | None = None) -> None:
        self.backend = backend
        self.config = config or ServerConfig()
        self.config.validate()
        #: queues served by child processes instead of threads
        self.queue_processes = use_queue_processes(backend, self.config)
        #: the block device's I/O scheduler once started (None: unknown)
        self.scheduler: str | None = None
        self._own_control = control is None
        self.control = control or Control()
        self.info: DevInfo | None = None
        self._cdev_fd = -1
        self._ctarget: _bindings.CTarget | None = None
        self._workers: list[QueueWorker | QueueProcess] = []
        self._descriptors: list[_bindings.Descriptors] = []
        self._stop_requested = threading.Event()
        self._queues_lock = threading.Lock()
        self._stopped_by_us = False
        self._shut_down = False
        self._ctl: AdminServer | None = None
        self._paths: list[CompletionPath] | None = None
        #: more keys for the state file (the CLI keeps its `add` arguments
        #: there, so that `ublkml recover` can build the same target)
        self.state_extra: dict[str, Any] = {}

    @property
    def dev_id(self) -> int:
        if self.info is None:
            raise UblkError("device not added yet")
        return self.info.dev_id

    @property
    def bdev(self) -> str:
        return bdev_path(self.dev_id)

    # ---- lifecycle ----------------------------------------------------------

    def add(self) -> DevInfo:
        cfg = self.config
        recovery = RECOVERY_FLAGS[cfg.recovery]
        if recovery & ~self.control.features:
            raise ConfigError(f"this kernel's ublk driver cannot recover devices "
                              f"(--recovery {cfg.recovery}): see `ublkml features`")
        want = DevInfo(nr_hw_queues=cfg.queues, queue_depth=cfg.depth,
                       max_io_buf_bytes=cfg.max_io_bytes, dev_id=cfg.dev_id,
                       ublksrv_pid=os.getpid(),
                       flags=int(Feature.CMD_IOCTL_ENCODE & self.control.features) | recovery)
        info = self.control.add(want)
        self.info = info
        try:
            if info.nr_hw_queues != cfg.queues or info.queue_depth != cfg.depth:
                raise ConfigError(
                    f"the kernel granted {info.nr_hw_queues} queue(s) of depth "
                    f"{info.queue_depth}, not {cfg.queues} of {cfg.depth}")
            self.control.set_params(info.dev_id, build_params(self.backend,
                                                              info.max_io_buf_bytes))
        except BaseException:
            self._delete_quietly()
            raise
        return info

    def start(self) -> None:
        """Open the char device, start the queue threads, then START_DEV."""
        info = self.info
        if info is None:
            info = self.add()
        try:
            self.backend.bind(info.dev_id, recovering=False)
            self._start_queues(info)
            self.control.start(info.dev_id, os.getpid())
            self._apply_scheduler()
            self._write_state()
            self._start_control_channel()
        except BaseException:
            self.shutdown()
            raise

    def _apply_scheduler(self, *, recovering: bool = False) -> None:
        # After START_DEV: the disk, and its sysfs queue, exist only now. A
        # recovered device kept its disk, and the scheduler it was given.
        disk = os.path.basename(self.bdev)
        if self.config.scheduler is not None and not recovering:
            self.scheduler = set_scheduler(disk, self.config.scheduler)
        else:
            with contextlib.suppress(UblkError, OSError):  # only informative here
                self.scheduler = read_scheduler(disk)[1]

    def _start_queues(self, info: DevInfo) -> None:
        self._cdev_fd = self._open_cdev(info.dev_id)
        self._ctarget = self.backend.attach()
        encode = bool(info.flags & Feature.CMD_IOCTL_ENCODE)
        pin = os.environ.get("UBLKML_PIN_QUEUES", "1") != "0"
        spin = self.config.spin_usec()
        procs = self.queue_processes
        for q in range(info.nr_hw_queues):
            cpus = self.control.get_queue_affinity(info.dev_id, q) if pin else None
            if procs:
                self._descriptors.append(_bindings.Descriptors(self._cdev_fd, q,
                                                               info.queue_depth))
            thread = QueueWorker(self.backend, self._ctarget, self._cdev_fd, q,
                                 info.queue_depth, info.max_io_buf_bytes, encode, cpus,
                                 self.config.record_capacity, self.config.summaries, spin,
                                 self._descriptors[q] if procs else None)
            self._workers.append(QueueProcess(thread) if procs else thread)
        for worker in self._workers:  # every child forked before we start a thread for them
            if isinstance(worker, QueueProcess):
                worker.fork()
        for worker in self._workers:
            worker.start()
        for worker in self._workers:
            worker.fetched.wait()
            if worker.error is not None:
                raise UblkError(f"queue {worker.q_id} failed to start: {worker.error}")

    def recover(self, dev_id: int, timeout: float = 30.0) -> None:
        """Take over device ``dev_id`` whose server died (UBLK_F_USER_RECOVERY).

        Waits (up to ``timeout`` s) until the kernel has quiesced the device,
        then START_USER_RECOVERY, queues with their FETCHes, END_USER_RECOVERY:
        I/O that waited meanwhile flows to this server.  The target must be
        the one the device was added with (``ublkml recover`` reads it from
        the state file).  On failure before the queues run, the device is left
        as it was, for another try; after that, only this process's exit
        releases it (the kernel then quiesces it again).
        """
        if self.info is not None:
            raise UblkError("this server already serves a device")
        info = self._wait_quiesced(dev_id, timeout)
        params = self.control.get_params(dev_id)
        if params.size_bytes != self.backend.size:
            raise ConfigError(f"device {dev_id} has {params.size_bytes} bytes, the target "
                              f"{self.backend.size}: recover needs the device's own target")
        if params.logical_block_size != self.backend.block_size:
            raise ConfigError(f"device {dev_id} has {params.logical_block_size}-byte blocks, "
                              f"the target {self.backend.block_size}")
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.control.start_recovery(dev_id)
                break
            except ControlError as e:  # the old char device is not released yet
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.info = info
        self.backend.bind(dev_id, recovering=True)
        try:
            self._start_queues(info)
        except BaseException:
            self._release_without_stop()
            raise
        self.control.end_recovery(dev_id, os.getpid())
        self._apply_scheduler(recovering=True)
        self._write_state()
        self._start_control_channel()

    def _wait_quiesced(self, dev_id: int, timeout: float) -> DevInfo:
        deadline = time.monotonic() + timeout
        while True:
            info = self.control.get_info(dev_id)
            if not info.flags & Feature.USER_RECOVERY:
                raise ConfigError(f"device {dev_id} was added without recovery: only devices "
                                  "added with --recovery reissue|fail can be recovered")
            if info.state == DevState.QUIESCED:
                return info
            if info.state == DevState.LIVE and pid_alive(info.ublksrv_pid):
                raise ConfigError(f"device {dev_id} is live, served by pid "
                                  f"{info.ublksrv_pid}: nothing to recover")
            if time.monotonic() > deadline:
                raise UblkError(f"device {dev_id} is {info.state_name}, not QUIESCED, after "
                                f"{timeout:g} s: the kernel has not released it for recovery")
            time.sleep(0.05)

    def _release_without_stop(self) -> None:
        """Undo a recovery attempt whose queues could not all start: the device
        must stay (quiesced) for another try, so no STOP_DEV and no DEL_DEV."""
        for w in self._workers:
            if w.is_alive():  # a queue that started holds its FETCHes: keep it all
                return
        for w in self._workers:
            w.free()
        self._workers.clear()
        self._unmap_descriptors()
        if self._cdev_fd >= 0:
            os.close(self._cdev_fd)
            self._cdev_fd = -1
        if self._ctarget is not None:
            self._ctarget.free()
            self._ctarget = None
        self.info = None

    def _unmap_descriptors(self) -> None:
        for d in self._descriptors:
            d.unmap()
        self._descriptors.clear()

    def _start_control_channel(self) -> None:
        """The socket of `ublkml status/fault/leg` (ublk_driver/admin/)."""
        try:  # the drives, while the backing files are open (status shows them)
            self.completion_paths()
        except Exception as e:  # a plug-in's bug must not stop a device that serves
            print(f"ublkml: device {self.dev_id}: cannot tell its drives: {e}",
                  file=sys.stderr, flush=True)
        try:
            self._ctl = AdminServer(self, socket_path(self.dev_id)).start()
        except OSError as e:  # the device serves without it; the log says why it is missing
            print(f"ublkml: device {self.dev_id} has no admin socket: {e}",
                  file=sys.stderr, flush=True)

    @staticmethod
    def _open_cdev(dev_id: int) -> int:
        path = cdev_path(dev_id)
        # devtmpfs creates the node asynchronously after ADD_DEV.
        deadline = time.monotonic() + 5
        while True:
            try:
                return os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def request_stop(self) -> None:
        """Ask the device to stop (safe from a signal handler)."""
        self._stop_requested.set()

    def wait(self, poll: float = 0.2) -> None:
        """Serve until a stop is requested or the device is stopped from outside."""
        while True:
            if self._stop_requested.is_set():
                self._stop_device()
                break
            alive = [w for w in self._workers if w.is_alive()]
            if not alive:
                break
            alive[0].join(poll)

    def _stop_device(self) -> None:
        if self.info is None or self._stopped_by_us:
            return
        self._stopped_by_us = True
        with contextlib.suppress(DeviceNotFoundError):
            self.control.stop(self.info.dev_id)

    def shutdown(self) -> list[str]:
        """Stop, join the queues, close everything, delete the device.

        Returns problems met on the way (queue errors) so the caller can report
        them after the device is gone; never leaves a device behind.  A second
        call does nothing (start() shuts down on its own failure, and then
        serve_forever's cleanup must not hide that failure behind its own).
        """
        if self._shut_down:
            return []
        self._shut_down = True
        problems: list[str] = []
        if self._ctl is not None:  # first: no request may reach a half torn-down server
            self._ctl.close()
            self._ctl = None
        if self.info is not None and any(w.is_alive() for w in self._workers):
            self._stop_device()
        for w in self._workers:
            w.join(30)
            if w.is_alive():
                problems.append(f"queue {w.q_id} did not stop within 30 s")
                if isinstance(w, QueueProcess):  # it holds the char device: DEL_DEV would hang
                    w.kill()
                    w.join(5)
            elif w.error is not None:
                problems.append(f"queue {w.q_id}: {w.error}")
        with self._queues_lock:
            for w in self._workers:
                if not w.is_alive():
                    w.free()
        self._unmap_descriptors()
        if self._cdev_fd >= 0:
            os.close(self._cdev_fd)
            self._cdev_fd = -1
        deleted = self._delete_quietly()
        if self._ctarget is not None and not any(w.is_alive() for w in self._workers):
            self._ctarget.free()
            self._ctarget = None
        try:
            self.backend.close()
        except OSError as e:
            problems.append(f"closing the target: {e}")
        self._wait_freed(deleted)
        self._remove_state()
        if self._own_control:
            self.control.close()
        return problems

    def _delete_quietly(self) -> int | None:
        """Delete the device without waiting for the kernel to free it (DEL_DEV
        would wait for every process holding /dev/ublkbN open, however long);
        the id to wait for (:meth:`_wait_freed`), if any."""
        if self.info is None:
            return None
        dev_id = self.info.dev_id
        try:
            if self.control.delete_async(dev_id):
                return dev_id
            self.control.delete(dev_id)  # an older kernel: it waits itself
        except DeviceNotFoundError:
            pass  # someone (`ublkml del`) deleted it already
        except ControlError as e:
            if e.errno != errno.ENODEV:
                raise
        return None

    def _wait_freed(self, dev_id: int | None) -> None:
        """Until the kernel frees the deleted device, for a while: so that its
        id can be used again once we return.  Not a failure of the server if
        it does not (its data is flushed): an opener of /dev/ublkbN that has
        not closed it yet, which is said on stderr."""
        if dev_id is None or self.control.wait_freed(dev_id, DELETE_WAIT):
            return
        print(f"ublkml: {still_open_message(dev_id)}", file=sys.stderr, flush=True)

    def read_completions(self, max_per_queue: int = 65536) -> np.ndarray:
        """Drain the completion records of every queue (``records.COMPLETION_DTYPE``).

        Call from one reader thread; empty when records are off.
        """
        # numpy is imported here, not at the top: it is most of the CLI's
        # start-up time (0.3 s natively, seconds under TCG) and only the
        # scorer's readers need it, not `ublkml add/del/list`.
        import numpy as np

        from ublk_driver.records import COMPLETION_DTYPE

        parts = []
        with self._queues_lock:
            for w in self._workers:
                q = w.queue
                if q is None:
                    continue
                buf = np.empty(max_per_queue, dtype=COMPLETION_DTYPE)
                n = q.read_records(buf)
                if n:
                    parts.append(buf[:n])
        if not parts:
            return np.empty(0, dtype=COMPLETION_DTYPE)
        return np.concatenate(parts)

    def read_summaries(self) -> np.ndarray | None:
        """Per-path cumulative summaries of every queue, added up
        (``records.SUMMARY_DTYPE``, one row per path); None when off."""
        if not self.config.summaries:
            return None
        import numpy as np

        from ublk_driver.records import SUMMARY_DTYPE

        total = np.zeros(_bindings.MAX_LEGS, dtype=SUMMARY_DTYPE)
        buf = np.zeros(_bindings.MAX_LEGS, dtype=SUMMARY_DTYPE)
        with self._queues_lock:
            for w in self._workers:
                if w.queue is None:
                    continue
                n = w.queue.read_summaries(buf)
                for name in ("n", "errors", "bytes", "lat_sum", "lat_sumsq", "hist"):
                    total[name][:n] += buf[name][:n]
        return total

    def records_dropped(self) -> int:
        with self._queues_lock:
            return sum(w.queue.records_dropped() for w in self._workers if w.queue is not None)

    # ---- faults and mirror legs (thin: the backend does the work) -------------

    def set_fault(self, path: int, spec: FaultSpec | None) -> None:
        """Inject a fault into completion path ``path`` (None clears it)."""
        self.backend.set_fault(path, spec)

    def faults(self) -> dict[int, FaultSpec]:
        return self.backend.faults()

    def _mirror(self) -> MirrorTarget:
        from ublk_driver.targets.mirror import MirrorTarget

        if not isinstance(self.backend, MirrorTarget):
            raise ConfigError(f"target {self.backend.name} has no legs: leg commands need a "
                              "mirror (ublkml add -t mirror --leg FILE --leg FILE)")
        return self.backend

    def set_leg_state(self, leg: int, state: str) -> None:
        self._mirror().set_leg_state(leg, state)

    def leg_info(self) -> list[LegInfo]:
        return self._mirror().leg_info()

    def promote_leg(self, leg: int) -> None:
        """Resync ``leg`` and make it active (blocking: call it from a thread)."""
        self._mirror().promote(leg)

    def completion_paths(self) -> list[CompletionPath]:
        """Per completion path (the ``path`` of completion records, summaries and
        faults: a mirror's leg, else 0): its name, backing file and drives.

        Read from sysfs once (when the device starts, or at the first call) and
        kept: a stack of block devices rarely changes under a running device.
        """
        paths = self._paths
        if paths is None:
            paths = self._paths = self.backend.completion_paths()
        return list(paths)

    def stats(self) -> dict[str, Any]:
        """Per queue: ops, errors (and the last one), batches; live while serving."""
        out: dict[str, Any] = {"queues": []}
        for w in self._workers:
            st = w.stats_dict()
            if st is not None:
                out["queues"].append(st)
        return out

    def serve_forever(self, on_ready: Any = None, recover: int | None = None) -> list[str]:
        """add + start (or :meth:`recover` device ``recover``), then serve until
        SIGINT/SIGTERM or an outside stop."""
        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.request_stop()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if recover is not None:
                self.recover(recover)
            else:
                if self.info is None:
                    self.add()
                self.start()
            if on_ready is not None:
                on_ready(self)
            self.wait()
        finally:
            problems = self.shutdown()
            for s, h in old.items():
                signal.signal(s, h)
            if os.environ.get("UBLKML_STATS"):
                for w in self._workers:
                    st = w.final_stats
                    if st is not None:
                        n = sum(st.ops)
                        print(f"ublkml: queue {w.q_id}: {n} I/Os in {st.batches} batches "
                              f"({n / max(st.batches, 1):.1f} per batch), {st.errors} errors",
                              file=sys.stderr, flush=True)
        return problems

    # ---- state file for `ublkml list` ---------------------------------------

    def _state_path(self) -> str:
        return os.path.join(default_state_dir(), f"{self.dev_id}.json")

    def _write_state(self) -> None:
        assert self.info is not None
        state = {"dev_id": self.info.dev_id, "pid": os.getpid(),
                 "queues": self.info.nr_hw_queues, "depth": self.info.queue_depth,
                 "block_size": self.backend.block_size, **self.backend.describe(),
                 **self.state_extra}
        try:
            os.makedirs(default_state_dir(), exist_ok=True)
            tmp = self._state_path() + ".tmp"
            with open(tmp, "w") as f:
                json.dump(state, f)
            os.replace(tmp, self._state_path())
        except OSError:
            pass  # `list` then shows kernel facts only

    def _remove_state(self) -> None:
        """After DEL_DEV: nothing is left to recover."""
        if self.info is not None:
            for path in [self._state_path(), *self.backend.state_files()]:
                with contextlib.suppress(OSError):
                    os.unlink(path)


def read_state(dev_id: int) -> dict[str, Any] | None:
    try:
        with open(os.path.join(default_state_dir(), f"{dev_id}.json")) as f:
            data: dict[str, Any] = json.load(f)
            return data
    except (OSError, ValueError):
        return None
