"""Scheduling priority for the threads that must stay timely on a busy host.

The scorer, the agent's loop and the admin socket decide and carry out a leg's
demotion; none of them runs long, but each must run *soon* when a CPU-bound
process at normal priority keeps every CPU busy.  Linux's ``setpriority`` on a
thread id changes only that thread's nice value (threads it starts inherit
it), so the data path's queue threads keep the default.
"""

from __future__ import annotations

import os
import threading

#: nice value of the threads that decide and apply recommendations: weight
#: about 9.3 times a nice-0 process under CFS/EEVDF, so a CPU hog per CPU
#: delays them by a fraction of a scheduling slice, not by its share of the CPU.
TIMELY_NICE = -10


def raise_thread_priority(nice: int = TIMELY_NICE) -> str | None:
    """Lower the calling thread's nice value to ``nice`` (never raise it).

    Returns None when the thread runs at ``nice`` or better, else why not
    (for a log line: without CAP_SYS_NICE the thread keeps its priority).
    """
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) <= nice:
            return None
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except PermissionError:
        return f"cannot set nice {nice} without CAP_SYS_NICE (run as root): normal priority"
    except OSError as e:
        return f"cannot set nice {nice}: {e.strerror}: normal priority"
    return None
