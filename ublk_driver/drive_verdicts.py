"""Verdicts on drives that a watcher publishes for everyone to read.

``$UBLKML_STATE_DIR/drive-verdicts.json`` holds what a drive watcher (the host
monitor, ``ublkml monitor run``) last concluded about each drive it watches::

    {"by": "monitor", "pid": 1234, "updated": 1796669414.8,
     "drives": {"nvme0n1": {"state": "SLOW", "score": 0.97, "reason": "..."}}}

``state`` is one of :data:`STATES`.  The driver owns the format, so that
``ublkml status`` shows the verdicts beside the drives under a device's paths
without importing the watcher (which sits in a layer above the driver); the
watcher writes the file whole, atomically, through :func:`write_verdicts`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from ublk_driver.admin.paths import default_state_dir
from ublk_driver.core.process import pid_alive

__all__ = ["STATES", "VERDICTS_FILE", "DriveVerdict", "Verdicts", "read_verdicts",
           "verdicts_path", "write_verdicts"]

VERDICTS_FILE = "drive-verdicts.json"
#: ok; SLOW (fail-slow); FAILING (a failure predicted); CRITICAL (the drive's own
#: SMART says so); unjudged (not enough I/O, still learning, no model)
STATES = ("ok", "SLOW", "FAILING", "CRITICAL", "unjudged")


@dataclass(frozen=True)
class DriveVerdict:
    """One drive's latest verdict."""

    state: str
    reason: str = ""
    score: float | None = None

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"drive verdict state must be one of {', '.join(STATES)}, "
                             f"got {self.state!r}")


@dataclass(frozen=True)
class Verdicts:
    """The file: who wrote it, when, and the verdicts per drive name."""

    by: str
    pid: int
    updated: float
    drives: dict[str, DriveVerdict]

    def writer_alive(self) -> bool:
        """The process that wrote the file still runs (else its verdicts are stale)."""
        return pid_alive(self.pid)


def verdicts_path(state_dir: str | None = None) -> str:
    return os.path.join(state_dir or default_state_dir(), VERDICTS_FILE)


def write_verdicts(by: str, drives: Mapping[str, DriveVerdict],
                   state_dir: str | None = None) -> None:
    """Replace the file with these verdicts, atomically."""
    path = verdicts_path(state_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    doc = {"by": by, "pid": os.getpid(), "updated": time.time(),
           "drives": {name: {"state": v.state, "reason": v.reason, "score": v.score}
                      for name, v in sorted(drives.items())}}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def read_verdicts(state_dir: str | None = None) -> Verdicts | None:
    """The file, or None when there is none or it is not in this format (a reader
    of a watcher's opinion never fails for it)."""
    try:
        with open(verdicts_path(state_dir)) as f:
            doc = json.load(f)
        drives = {str(name): DriveVerdict(str(d["state"]), str(d.get("reason") or ""),
                                          None if d.get("score") is None else float(d["score"]))
                  for name, d in doc["drives"].items()}
        return Verdicts(str(doc["by"]), int(doc["pid"]), float(doc["updated"]), drives)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
