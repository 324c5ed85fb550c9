"""Where a server spends its time: py-spy samples, summarised for the report.

``--profile`` already gives each server thread's CPU time (from /proc); this
adds *where* in the code: py-spy (a sampling profiler, extra ``bench``)
records the serving process's stacks during the measurement, Python and
native frames both (``--native``: the C engine's functions, the kernel
boundary), and :func:`summarize` turns its collapsed stacks into the shares
the report prints.  py-spy pauses the process for each native sample, so a
profiled run's IOPS are lower than an unprofiled one's: ratios come from
runs without ``--profile``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

#: samples per second; py-spy's default
RATE = 100

# Leaf frames where a thread waits rather than works: kept apart, so that
# "self" shares are of the time the thread was on a CPU.
_WAITING = re.compile(r"^((io_uring_enter|__io_uring_get_cqe|syscall|epoll_wait|poll|"
                      r"__poll|ppoll|select|clock_nanosleep|nanosleep|pthread_cond_wait|"
                      r"pthread_cond_timedwait|__futex_abstimed_wait_common|"
                      r"futex_wait|sem_wait|sem_clockwait|sem_timedwait|"
                      r"PyThread_acquire_lock_timed|read|__libc_read|accept|recv)\b)")
#: How far from the leaf a blocking call may be: stripped libraries (Debian's
#: libc and liburing) leave the innermost frames or two as bare addresses
#: (``[libc.so.6]``) under the named function that blocks.
_WAIT_DEPTH = 3
_LINE = re.compile(r" \(([^():]+):\d+\)$")
_ADDR = re.compile(r"^0x[0-9a-f]+ \((.+)\)$")


def find_py_spy() -> str | None:
    """The py-spy executable (next to this interpreter first), or None."""
    import sys

    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def frame_name(frame: str) -> str:
    """One frame without its line number; an unnamed native frame by its library."""
    m = _ADDR.match(frame)
    if m:
        return f"[{m.group(1)}]"
    return _LINE.sub(r" (\1)", frame)


def parse_collapsed(text: str) -> list[tuple[str, list[str], int]]:
    """py-spy's raw output: (thread name, frames root first, samples) per line.

    A line is ``thread (TID): NAME;frame;...;frame COUNT`` with ``--threads``,
    ``frame;...;frame COUNT`` without.  Malformed lines raise ValueError."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        stack, sep, count = line.rpartition(" ")
        if not sep or not count.isdigit():
            raise ValueError(f"py-spy output line {n}: no sample count: {line[:80]!r}")
        frames = stack.split(";")
        thread = "?"
        if frames[0].startswith("process ") and len(frames) > 1:
            frames = frames[1:]  # --subprocesses: 'process PID:"CMDLINE"' comes first
        if frames[0].startswith("thread (") and "): " in frames[0]:
            thread = frames[0].split("): ", 1)[1]
            frames = frames[1:]
        out.append((thread, frames, int(count)))
    return out


def _waiting(names: list[str]) -> bool:
    """Whether a stack (frame names, root first) is blocked in a call.

    A blocking function within the innermost ``_WAIT_DEPTH`` frames, or a bare
    address in liburing on top: the only liburing code that takes time is the
    io_uring_enter system call (the engine's inlined wait shows up that way)."""
    if not names:
        return False
    if names[-1].startswith("[liburing"):
        return True
    return any(_WAITING.match(n.lstrip("[")) for n in names[-_WAIT_DEPTH:])


def summarize(text: str, top: int = 8) -> dict[str, Any]:
    """Shares of the samples: per thread, waiting vs running, the leaf
    functions on a CPU ("self") and the Python functions on the stack
    ("inclusive": where the interpreter's time goes)."""
    stacks = parse_collapsed(text)
    total = sum(c for _, _, c in stacks)
    threads: Counter[str] = Counter()
    waiting = 0
    leaf: Counter[str] = Counter()
    python: Counter[str] = Counter()
    for thread, frames, count in stacks:
        threads[re.sub(r"\d+", "N", thread)] += count  # one row per kind: ublk-qN-py
        names = [frame_name(f) for f in frames]
        if _waiting(names):
            waiting += count
            continue
        if names:
            leaf[names[-1]] += count
        for name in set(names):
            if name.endswith(".py)"):
                python[name] += count

    def shares(c: Counter[str]) -> list[dict[str, Any]]:
        return [{"frame": k, "share": round(v / total, 4)} for k, v in c.most_common(top)]

    return {
        "samples": total,
        "rate_hz": RATE,
        "waiting_share": round(waiting / total, 4) if total else None,
        "threads": shares(threads),
        "self": shares(leaf),
        "python": shares(python),
    }


class Sampler:
    """py-spy on one process for ``duration`` seconds, starting after
    ``delay`` (the ramp), in the background; :meth:`result` the summary."""

    def __init__(self, exe: str, pid: int, out: Path, delay: float, duration: float) -> None:
        self.out = out
        self.error: str | None = None
        # --subprocesses: a --queue-processes server's queues are its children
        self._cmd = [exe, "record", "--native", "--threads", "--subprocesses", "--format", "raw",
                     "--rate", str(RATE), "--duration", str(max(1, int(duration))),
                     "--pid", str(pid), "--output", str(out)]
        self._delay = delay
        self._thread = threading.Thread(target=self._run, name="py-spy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        time.sleep(self._delay)
        try:
            proc = subprocess.run(self._cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.error = f"py-spy: {e}"
            return
        if proc.returncode != 0:
            last = (proc.stderr.strip() or proc.stdout.strip() or "(no output)").splitlines()
            self.error = f"py-spy exited {proc.returncode}: {last[-1]}"

    def result(self, timeout: float = 30.0) -> dict[str, Any]:
        """The summary, or ``{"error": ...}``: a failed profile never fails a measurement."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            return {"error": "py-spy did not finish"}
        if self.error:
            return {"error": self.error}
        try:
            return summarize(self.out.read_text())
        except (OSError, ValueError) as e:
            return {"error": f"py-spy output: {e}"}
