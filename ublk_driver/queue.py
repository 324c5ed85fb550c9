"""Queue workers: one thread and one io_uring per ublk queue.

The thread that submits a queue's FETCH commands is the only one the driver
lets issue that queue's later commands, so the worker sets up its queue, sends
the FETCHes and serves, all on its own thread.  The C calls release the GIL:
native queues run in parallel; plug-in queues take the GIL only for the
plug-in's own methods.
"""

from __future__ import annotations

import os
import threading

from ublk_driver import _bindings
from ublk_driver.targets.base import Backend
from ublk_driver.targets.plugin import PluginBackend


def default_ring_flags() -> int:
    """Ring set-up flags of queue rings (``UBLKML_RING_FLAGS`` overrides, for tuning)."""
    env = os.environ.get("UBLKML_RING_FLAGS")
    if env is not None:
        return int(env, 0)
    # Task work (the driver's completions of our FETCH/COMMIT commands) runs
    # only when this thread asks for completions: one wake-up per batch
    # instead of one per request. Measured: ~2x IOPS for the null target.
    return _bindings.RING_SINGLE_ISSUER | _bindings.RING_DEFER_TASKRUN


def default_spin_usec() -> int:
    """Hybrid-polling budget of queue threads (``UBLKML_POLL_US`` overrides)."""
    return int(os.environ.get("UBLKML_POLL_US", "0"))


class QueueWorker(threading.Thread):
    def __init__(self, backend: Backend, ctarget: _bindings.CTarget, cdev_fd: int, q_id: int,
                 depth: int, buf_size: int, ioctl_encode: bool,
                 cpus: set[int] | None = None, record_capacity: int = 0,
                 summaries: bool = False) -> None:
        super().__init__(name=f"ublk-q{q_id}", daemon=True)
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

    def run(self) -> None:
        try:
            _bindings.set_thread_name(f"ublk-q{self.q_id}")
            if self.cpus:
                # Run where blk-mq maps this queue's submitters: completions
                # stay on the CPUs that issued the I/O.
                os.sched_setaffinity(0, self.cpus)
            queue = _bindings.Queue(self.ctarget, self.cdev_fd, self.q_id, self.depth,
                                    self.buf_size, self.ioctl_encode, default_ring_flags())
            self.queue = queue
            queue.set_spin(default_spin_usec())
            if self.record_capacity:
                queue.enable_records(self.record_capacity)
            if self.summaries:
                queue.enable_summaries()
            queue.submit_fetches()
            self.fetched.set()
            if isinstance(self.backend, PluginBackend):
                queue.serve_events(self.backend.handler())
            else:
                queue.run()
        except BaseException as e:  # reported by the server, never lost
            self.error = e
        finally:
            self.fetched.set()
            if self.queue is not None:
                self.final_stats = self.queue.stats()

    def free(self) -> None:
        """Release the queue (after the thread ended)."""
        if self.queue is not None:
            self.queue.free()
            self.queue = None
