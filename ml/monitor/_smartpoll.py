"""SMART in the loop: ``smartctl --json -a`` of each drive, on a schedule and on demand.

smartctl can take seconds (a drive busy with a self-test, a sleeping disk), so
it runs in its own thread at normal priority, one drive at a time; the tick
only posts requests and collects results.  A drive is read when it is first
seen, every ``interval_s`` after that, and soon after I/O errors show up on it
(``urgent``: at most once per ``min_gap_s``).  A drive that has no SMART at all
(a loop device, a dm device named by the user) is still retried at the normal
interval, never faster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ml.model import Model
from ml.smart import SmartAssessment, SmartError, SmartReading, assess, read_smart

log = logging.getLogger("ublkml.ml.monitor")

Reader = Callable[[str], SmartReading]


@dataclass(frozen=True)
class SmartResult:
    drive: str
    checked_at: float                 # Unix time
    reading: SmartReading | None
    assessment: SmartAssessment | None
    error: str | None
    trigger: str                      # "schedule", "start" or "errors"


class SmartPoller:
    def __init__(self, model: Model | None, interval_s: float = 60.0,
                 reader: Reader | None = None, min_gap_s: float = 5.0,
                 timeout_s: float = 30.0) -> None:
        self.model = model
        self.interval_s = interval_s
        self.min_gap_s = min_gap_s
        self.reader: Reader = reader or (lambda dev: read_smart(dev, timeout=timeout_s))
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._due: dict[str, tuple[float, str, str]] = {}   # drive -> (when, path, why)
        self._last: dict[str, float] = {}
        self._results: list[SmartResult] = []
        self._thread: threading.Thread | None = None
        self.checks = 0

    def track(self, drive: str, path: str) -> None:
        """Read ``drive`` (at ``path``, e.g. /dev/nvme0n1) now and on the schedule."""
        with self._lock:
            if drive not in self._due:
                self._due[drive] = (time.monotonic(), path, "start")
        self._wake.set()

    def forget(self, drive: str) -> None:
        with self._lock:
            self._due.pop(drive, None)
            self._last.pop(drive, None)

    def urgent(self, drive: str, why: str = "errors") -> None:
        """Read ``drive`` soon (I/O errors rose), unless it was read moments ago."""
        with self._lock:
            cur = self._due.get(drive)
            if cur is None:
                return
            when = max(time.monotonic(), self._last.get(drive, float("-inf")) + self.min_gap_s)
            if when < cur[0]:
                self._due[drive] = (when, cur[1], why)
        self._wake.set()

    def results(self) -> list[SmartResult]:
        with self._lock:
            out, self._results = self._results, []
        return out

    def check_now(self, drive: str, path: str, trigger: str = "schedule") -> SmartResult:
        """Read and assess one drive in the calling thread."""
        now = time.time()
        try:
            reading = self.reader(path)
            assessment = assess(reading, self.model)
            result = SmartResult(drive, now, reading, assessment, None, trigger)
        except SmartError as e:
            result = SmartResult(drive, now, None, None, str(e), trigger)
        except Exception as e:   # a broken model or reader must not stop the loop
            result = SmartResult(drive, now, None, None, f"{type(e).__name__}: {e}", trigger)
        self.checks += 1
        return result

    def _next(self) -> tuple[str, str, str] | None:
        now = time.monotonic()
        with self._lock:
            due = [(w, d) for d, (w, _, _) in self._due.items() if w <= now]
            if not due:
                return None
            _, drive = min(due)
            _, path, why = self._due[drive]
            self._due[drive] = (now + self.interval_s, path, "schedule")
            self._last[drive] = now
            return drive, path, why

    def _wait(self) -> float:
        with self._lock:
            if not self._due:
                return 1.0
            return max(0.0, min(w for w, _, _ in self._due.values()) - time.monotonic())

    def _run(self) -> None:
        # smartctl and its children at normal priority: the monitor's raised
        # priority is for its tick, not for reading SMART.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 0)
        while not self._stop.is_set():
            job = self._next()
            if job is None:
                self._wake.wait(min(self._wait(), 1.0))
                self._wake.clear()
                continue
            drive, path, why = job
            result = self.check_now(drive, path, why)
            with self._lock:
                if drive in self._due:     # not forgotten meanwhile
                    self._results.append(result)
                    del self._results[:-256]

    def start(self) -> SmartPoller:
        self._thread = threading.Thread(target=self._run, name="ublkml-monitor-smart",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
