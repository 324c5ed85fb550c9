"""What the agent may change, and how: the allow-list of actions.

Every action has an :class:`ActionSpec`: how to parse and bound its value and
an *applier* that reads the current value, writes a new one and can write the
old one back (rollback).  Nothing outside this table can be changed through a
recommendation.

* Block queue knobs, ``/sys/block/<dev>/queue/<knob>``: ``read_ahead_kb``,
  ``nr_requests``, ``wbt_lat_usec`` (integers within bounds) and
  ``scheduler`` (one of an allowed set *and* offered by the device).
* I/O throttling through the cgroup interface the machine offers
  (:func:`detect_throttle`): cgroup v2 ``io.max`` where the ``io`` controller
  is on the unified hierarchy, else v1 ``blkio.throttle.*_device``.  The
  limit applies to the configured cgroup (default: the root group of v1, i.e.
  every process not in a child group); ``0`` removes it.
* Driver actions (``demote_leg``, ``promote_leg``; the value is the leg)
  go to the server of the device through a :class:`ControlChannel`.  By
  default a ublk device ``ublkbN`` is reached through its server's admin
  socket (:class:`UblkControlChannel`, :mod:`ublk_driver.admin`); any other
  device, or a ublk device whose server has no socket, has no channel and the
  recommendation is rejected with "unsupported: no admin socket".
  ``promote_leg`` is applied once the resync has *started*: the agent's one
  thread must not wait minutes for it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Protocol

from kernel_agent.accounting import BlockDevice
from ublk_driver.blockdev import parse_schedulers


class ActionError(Exception):
    """An allowed action could not be applied here (message: the reason)."""


class Applier(Protocol):
    def available(self, bd: BlockDevice) -> str | None:
        """None if the action can work on ``bd``, else why not."""

    def read(self, bd: BlockDevice) -> str: ...

    def write(self, bd: BlockDevice, value: str) -> None: ...


class QueueKnob:
    """A file under /sys/block/<dev>/queue/."""

    def __init__(self, knob: str, sysfs_root: str = "/sys/block") -> None:
        self.knob = knob
        self.root = Path(sysfs_root)

    def _path(self, bd: BlockDevice) -> Path:
        return self.root / bd.name / "queue" / self.knob

    def available(self, bd: BlockDevice) -> str | None:
        p = self._path(bd)
        if not p.exists():
            return f"{bd.name} has no queue/{self.knob}"
        if not os.access(p, os.W_OK):
            return f"queue/{self.knob} of {bd.name} is not writable"
        return None

    def read(self, bd: BlockDevice) -> str:
        text = self._path(bd).read_text().strip()
        if self.knob == "scheduler":  # "none [mq-deadline] kyber": the active one
            return parse_schedulers(text)[1] or text
        return text

    def choices(self, bd: BlockDevice) -> list[str]:
        return parse_schedulers(self._path(bd).read_text())[0]

    def write(self, bd: BlockDevice, value: str) -> None:
        try:
            self._path(bd).write_text(value)
        except OSError as e:
            raise ActionError(f"writing {value!r} to queue/{self.knob} of {bd.name}: "
                              f"{e.strerror}") from None


@dataclass(frozen=True)
class ThrottleInterface:
    """Where throttle limits are written on this machine."""

    version: int          # 1 or 2
    cgroup_dir: Path      # the group the limits apply to


def detect_throttle(cgroup_root: str = "/sys/fs/cgroup", group: str = "") -> \
        ThrottleInterface | None:
    """cgroup v2 ``io.max`` if usable, else v1 blkio throttling, else None."""
    root = Path(cgroup_root)
    # v2: io.max exists only in non-root groups whose parent enables "io".
    for base in (root, root / "unified"):
        ctrl = base / "cgroup.controllers"
        if ctrl.exists() and "io" in ctrl.read_text().split():
            target = base / group if group else base
            if (target / "io.max").exists():
                return ThrottleInterface(2, target)
    v1 = root / "blkio" / group if group else root / "blkio"
    if (v1 / "blkio.throttle.read_bps_device").exists():
        return ThrottleInterface(1, v1)
    return None


class Throttle:
    """One throttle limit (``rbps``, ``wbps``, ``riops``, ``wiops``) for a device."""

    _V1: ClassVar[dict[str, str]] = {
        "rbps": "blkio.throttle.read_bps_device", "wbps": "blkio.throttle.write_bps_device",
        "riops": "blkio.throttle.read_iops_device", "wiops": "blkio.throttle.write_iops_device"}

    def __init__(self, key: str, iface: ThrottleInterface | None) -> None:
        self.key = key
        self.iface = iface

    def available(self, bd: BlockDevice) -> str | None:
        if self.iface is None:
            return "no cgroup I/O throttling interface on this machine (neither io.max " \
                   "nor blkio.throttle)"
        return None

    def read(self, bd: BlockDevice) -> str:
        assert self.iface is not None
        if self.iface.version == 1:
            for line in (self.iface.cgroup_dir / self._V1[self.key]).read_text().splitlines():
                majmin, _, value = line.partition(" ")
                if majmin == bd.majmin:
                    return value.strip()
            return "0"
        for line in (self.iface.cgroup_dir / "io.max").read_text().splitlines():
            words = line.split()
            if words and words[0] == bd.majmin:
                for w in words[1:]:
                    k, _, v = w.partition("=")
                    if k == self.key:
                        return "0" if v == "max" else v
        return "0"

    def write(self, bd: BlockDevice, value: str) -> None:
        assert self.iface is not None
        try:
            if self.iface.version == 1:
                (self.iface.cgroup_dir / self._V1[self.key]).write_text(f"{bd.majmin} {value}")
            else:
                v = "max" if value == "0" else value
                (self.iface.cgroup_dir / "io.max").write_text(f"{bd.majmin} {self.key}={v}")
        except OSError as e:
            raise ActionError(f"setting {self.key} of {bd.name} to {value}: {e.strerror}"
                              ) from None


class ControlChannel(Protocol):
    """The way to a ublk server (a ublkml server's admin socket): performs a driver
    action."""

    def perform(self, bd: BlockDevice, action: str, value: str) -> str:
        """Do it; return the previous value (for rollback) or raise ActionError."""


class UblkControlChannel:
    """The admin socket of a ublkml server (``ublk_driver.admin``)."""

    LEG_STATES: ClassVar[dict[str, str]] = {"demote_leg": "demoted", "promote_leg": "active"}

    def __init__(self, dev_id: int, timeout: float = 2.0, state_dir: str | None = None) -> None:
        self.dev_id = dev_id
        self.timeout = timeout   # short: the agent has one thread
        self.state_dir = state_dir

    def perform(self, bd: BlockDevice, action: str, value: str) -> str:
        """Set the leg named by ``value``; the leg's previous state ("" if unknown)."""
        # Imported here: ublk_driver loads its compiled engine on import.
        from ublk_driver.admin import AdminClient
        from ublk_driver.core.errors import UblkError

        state = self.LEG_STATES.get(action)
        if state is None:
            raise ActionError(f"unsupported: the ublk server has no action {action!r}")
        try:
            leg = int(value)
            out = AdminClient(self.dev_id, self.timeout, self.state_dir).call(
                "leg_set", leg=leg, state=state)
        except ValueError:
            raise ActionError(f"{action} needs a leg number, got {value!r}") from None
        except UblkError as e:
            raise ActionError(f"{action} {value} on {bd.name}: {e}") from None
        return str(out.get("previous") or "")


def ublk_channel_for(bd: BlockDevice, state_dir: str | None = None) -> ControlChannel | None:
    """The admin socket of ``/dev/ublkbN``'s server, if it has one."""
    m = re.fullmatch(r"ublkb(\d+)", bd.name)
    if m is None:
        return None
    from ublk_driver.admin import fallback_path, socket_path

    dev_id = int(m.group(1))
    path = socket_path(dev_id, state_dir)
    if not (os.path.exists(path) or os.path.exists(fallback_path(path))):
        return None
    return UblkControlChannel(dev_id, state_dir=state_dir)


class DriverAction:
    """An action forwarded to the server that serves the device."""

    def __init__(self, action: str, channel_for: Callable[[BlockDevice], ControlChannel | None]
                 ) -> None:
        self.action = action
        self.channel_for = channel_for

    def available(self, bd: BlockDevice) -> str | None:
        if self.channel_for(bd) is None:
            return f"unsupported: no admin socket to the server of {bd.name}"
        return None

    def read(self, bd: BlockDevice) -> str:
        return ""

    def write(self, bd: BlockDevice, value: str) -> None:
        ch = self.channel_for(bd)
        if ch is None:
            raise ActionError(f"unsupported: no admin socket to the server of {bd.name}")
        ch.perform(bd, self.action, value)


@dataclass(frozen=True)
class ActionSpec:
    """One allowed action: value bounds (integers) or choices, and its applier."""

    name: str
    applier: Applier
    lo: int | None = None
    hi: int | None = None
    choices: frozenset[str] | None = None
    check_effect: bool = True   # measure latency before/after and roll back on regression
    reversible: bool = True

    def parse(self, value: str) -> str | None:
        """The canonical value, or None (then :meth:`why_invalid` explains)."""
        return None if self.why_invalid(value) else self.canonical(value)

    def canonical(self, value: str) -> str:
        return str(int(value.strip())) if self.choices is None else value.strip()

    def why_invalid(self, value: str) -> str | None:
        v = value.strip()
        if self.choices is not None:
            if v not in self.choices:
                return f"{self.name}={v!r} is not one of {sorted(self.choices)}"
            return None
        if not (v.isascii() and v.lstrip("-").isdigit()) or len(v) > 20:
            return f"{self.name} needs an integer, got {value!r}"
        n = int(v)
        if (self.lo is not None and n < self.lo) or (self.hi is not None and n > self.hi):
            return f"{self.name}={n} out of bounds [{self.lo}, {self.hi}]"
        return None


def no_channel(_bd: BlockDevice) -> ControlChannel | None:
    return None


def default_actions(throttle: ThrottleInterface | Literal["detect"] | None = "detect",
                    channel_for: Callable[[BlockDevice], ControlChannel | None] =
                    ublk_channel_for) -> dict[str, ActionSpec]:
    """The allow-list; bounds are conservative rather than the kernel's own limits.

    ``throttle``: where limits go; ``"detect"`` asks :func:`detect_throttle`,
    None disables the throttle actions.  ``channel_for``: how driver actions
    reach a device's server (:func:`no_channel` turns them off).
    """
    if throttle == "detect":
        throttle = detect_throttle()
    specs = [
        ActionSpec("read_ahead_kb", QueueKnob("read_ahead_kb"), 0, 16384),
        ActionSpec("nr_requests", QueueKnob("nr_requests"), 4, 4096),
        ActionSpec("wbt_lat_usec", QueueKnob("wbt_lat_usec"), 0, 1_000_000),
        ActionSpec("scheduler", QueueKnob("scheduler"),
                   choices=frozenset({"none", "mq-deadline", "kyber", "bfq"})),
        # Throttling lowers throughput on purpose: a latency check would judge
        # it by the wrong yardstick, so it is applied without one.
        ActionSpec("throttle_read_bps", Throttle("rbps", throttle), 0, 1 << 40,
                   check_effect=False),
        ActionSpec("throttle_write_bps", Throttle("wbps", throttle), 0, 1 << 40,
                   check_effect=False),
        ActionSpec("throttle_read_iops", Throttle("riops", throttle), 0, 10_000_000,
                   check_effect=False),
        ActionSpec("throttle_write_iops", Throttle("wiops", throttle), 0, 10_000_000,
                   check_effect=False),
        # A leg change moves reads between legs: the device's mean latency is
        # the wrong yardstick for it, and a rollback must not undo a demotion.
        ActionSpec("demote_leg", DriverAction("demote_leg", channel_for), 0, 15,
                   check_effect=False, reversible=False),
        ActionSpec("promote_leg", DriverAction("promote_leg", channel_for), 0, 15,
                   check_effect=False, reversible=False),
    ]
    return {s.name: s for s in specs}
