"""Test doubles for the admin socket: :class:`FakeServer` and :func:`serve`.

:func:`serve` runs a real :class:`~ublk_driver.admin.AdminServer` (socket,
threads, SO_PEERCRED) in front of :class:`FakeServer`, a stand-in for
:class:`ublk_driver.server.Server` with the methods the socket calls
(``set_fault``, ``set_leg_state``, ``leg_info``, ``promote_leg``,
``completion_paths``).  The kernel agent's and the leg policy's tests use it too.
Its completion paths are fixed data (:data:`FAKE_PATHS`), not read from sysfs:
test_drives.py tests the resolution.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from ublk_driver.admin import AdminClient, AdminServer, socket_path
from ublk_driver.drives import Drive
from ublk_driver.targets import CompletionPath
from ublk_driver.uapi import DevInfo

#: the two legs' paths: one on a drive, one on a file system without one
FAKE_PATHS = (
    CompletionPath(0, "leg0", "/data/leg0.img", (Drive("sda", 8, 0),), None),
    CompletionPath(1, "leg1", "/dev/shm/leg1.img", (),
                   "/dev/shm/leg1.img is on tmpfs (device 0:27), a file system with no "
                   "block device of its own"),
)


@dataclass
class FakeLeg:
    leg: int
    state: str = "active"
    dirty_regions: int = 0
    reads: int = 0
    writes: int = 0
    errors: int = 0
    probes: int = 0


class _Backend:
    def describe(self) -> dict[str, object]:
        return {"target": "mirror", "size": 64 << 20}


@dataclass
class FakeServer:
    """What the channel needs of a Server; records what it was asked to do."""

    dev_id: int = 7
    info: DevInfo | None = field(default_factory=lambda: DevInfo(nr_hw_queues=2,
                                                                 queue_depth=64, dev_id=7))
    backend: _Backend = field(default_factory=_Backend)
    legs: list[FakeLeg] = field(default_factory=lambda: [FakeLeg(0), FakeLeg(1)])
    calls: list[tuple[str, object, object]] = field(default_factory=list)
    promote_gate: threading.Event = field(default_factory=threading.Event)
    promote_error: str | None = None
    paths: list[Any] | Exception = field(default_factory=lambda: list(FAKE_PATHS))

    def __post_init__(self) -> None:
        self.promote_gate.set()

    def stats(self) -> dict[str, Any]:
        return {"queues": [{"q_id": 0, "ops": [3, 4, 0, 0, 0], "errors": 0, "batches": 5},
                           {"q_id": 1, "ops": [0, 2, 0, 0, 0], "errors": 2, "batches": 1,
                            "last_error": {"errno": "ETIMEDOUT", "op": "WRITE",
                                           "offset": 4096},
                            "plugin": {"timeouts": 1, "late": 0, "unserved": 0,
                                       "stuck": 1}}]}

    def _check_leg(self, leg: int) -> None:
        if leg >= len(self.legs):
            raise ValueError(f"no leg {leg}: the mirror has legs 0..{len(self.legs) - 1}")

    def set_fault(self, path: int, spec: Any) -> None:
        self._check_leg(path)
        self.calls.append(("set_fault", path, spec))

    def set_leg_state(self, leg: int, state: str) -> None:
        self._check_leg(leg)
        self.calls.append(("set_leg_state", leg, state))
        self.legs[leg] = replace(self.legs[leg], state=state)

    def leg_info(self) -> list[FakeLeg]:
        return list(self.legs)

    def completion_paths(self) -> list[Any]:
        if isinstance(self.paths, Exception):
            raise self.paths
        return list(self.paths)

    def promote_leg(self, leg: int) -> None:
        self._check_leg(leg)
        self.calls.append(("promote_leg", leg, None))
        self.promote_gate.wait(30)
        if self.promote_error:
            raise OSError(self.promote_error)
        self.legs[leg] = replace(self.legs[leg], state="active")


@dataclass
class Served:
    fake: FakeServer
    ctl: AdminServer
    state_dir: str
    log: list[str]

    @property
    def path(self) -> str:
        return self.ctl.path

    def client(self, timeout: float = 5.0) -> AdminClient:
        return AdminClient(self.fake.dev_id, timeout, self.state_dir)


@contextlib.contextmanager
def serve(fake: FakeServer | None = None, **kw: Any) -> Iterator[Served]:
    """A AdminServer for ``fake`` in a short temporary state dir (sun_path is 108 bytes)."""
    fake = fake or FakeServer()
    d = tempfile.mkdtemp(prefix="ctl", dir="/tmp")
    log: list[str] = []
    ctl = AdminServer(fake, socket_path(fake.dev_id, d), log=log.append, **kw).start()
    try:
        yield Served(fake, ctl, d, log)
    finally:
        ctl.close()
        shutil.rmtree(d, ignore_errors=True)
