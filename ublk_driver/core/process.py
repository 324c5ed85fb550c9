"""What ``/proc/PID/stat`` says of a process: whether it still runs, its CPU time."""

from __future__ import annotations

import os


def stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (the state first), or
    None when the process is gone.  The name may hold spaces and ')': split after
    the last one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return fields or None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs: a zombie, not yet reaped, has stopped."""
    fields = stat_fields(pid) if pid > 0 else None
    return fields is not None and fields[0] not in ("Z", "X")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), or None if gone."""
    fields = stat_fields(pid)
    if fields is None or len(fields) < 13:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
