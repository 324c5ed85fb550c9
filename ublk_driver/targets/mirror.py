"""The mirror target: RAID1 over 2..8 files or block devices, served in C.

Every leg is a completion path (path = leg index) that faults can be set on
and that the ML scorer sees in the completion records.  Legs are ACTIVE
(read and written), DEMOTED (written, not read: a slow leg routed around)
or FAILED (neither; writes mark its dirty regions).  A leg that missed
writes is resynchronised (dirty regions copied from an ACTIVE leg) before it
serves reads again: :meth:`MirrorTarget.promote`.  See docs/targets.md.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass

from ublk_driver import _bindings
from ublk_driver.core.errors import ConfigError, TargetError, UblkError
from ublk_driver.targets.base import Backend, Capabilities, CompletionPath
from ublk_driver.targets.native import Backing, _check_size, open_backing

LEG_STATES = {"active": _bindings.LEG_ACTIVE, "demoted": _bindings.LEG_DEMOTED,
              "failed": _bindings.LEG_FAILED}
_STATE_NAMES = {v: k for k, v in LEG_STATES.items()}
DEFAULT_PROBE_EVERY = 8


@dataclass(frozen=True)
class LegInfo:
    """One leg as ``leg_info()`` reports it (counters since the device started)."""

    leg: int
    path: str
    state: str              # active | demoted | failed
    dirty_regions: int      # regions it missed; resync copies them
    total_regions: int
    reads: int              # leg reads (retries included, probes not)
    writes: int             # leg writes, flushes, discards, write-zeroes
    errors: int             # failed leg I/O (probes and resync included)
    probes: int             # health-probe reads while demoted


class MirrorTarget(Backend):
    """RAID1 over ``legs`` (files or block devices), O_DIRECT like the loop target."""

    name = "mirror"

    def __init__(self, legs: list[str], size: int | None = None, direct: bool = True,
                 region_size: int = 1 << 20) -> None:
        super().__init__()
        if not 2 <= len(legs) <= _bindings.MAX_LEGS:
            raise ConfigError(f"a mirror needs 2..{_bindings.MAX_LEGS} legs, got {len(legs)} "
                              "(repeat --leg FILE)")
        if region_size & (region_size - 1) or not 1 << 12 <= region_size <= 1 << 30:
            raise ConfigError(f"region size must be a power of two from 4K to 1G, "
                              f"got {region_size}")
        self.legs = list(legs)
        self.region_size = region_size
        self._backings: list[Backing] = []
        try:
            seen: dict[tuple[int, int], str] = {}
            for path in legs:
                b = open_backing(path, direct)
                self._backings.append(b)
                if b.dev_ino in seen:
                    raise ConfigError(f"legs {seen[b.dev_ino]} and {path} are the same file: "
                                      "a mirror needs distinct legs")
                seen[b.dev_ino] = path
            self._block_size = max(b.block_size for b in self._backings)
            if region_size < self._block_size:
                raise ConfigError(f"region size {region_size} is smaller than the legs' "
                                  f"block size {self._block_size}")
            smallest = min(self._backings, key=lambda b: b.size)
            if size is None:
                size = smallest.size - smallest.size % self._block_size
            elif size > smallest.size:
                small_path = legs[self._backings.index(smallest)]
                raise ConfigError(f"--size {size} is larger than leg {small_path} "
                                  f"({smallest.size} bytes)")
            self._size = _check_size(size, self._block_size)
        except BaseException:
            self._close_fds()
            raise
        self.paths = len(legs)
        self.direct = all(b.direct for b in self._backings)
        self._probe_every = DEFAULT_PROBE_EVERY
        #: the crash journal (see bind); None: leg states live in memory only
        self.journal: str | None = None
        self._recovering = False

    @property
    def size(self) -> int:
        return self._size

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(flush=True, fua=True, discard=True, write_zeroes=True,
                            discard_zeroes=not any(b.is_bdev for b in self._backings))

    def bind(self, dev_id: int, recovering: bool) -> None:
        """Keep leg states, dirty regions and writes in flight in a journal
        (``<state dir>/<dev_id>.mirror``), so that a server started by
        ``ublkml recover`` after a crash knows which legs hold good data."""
        from ublk_driver.admin.paths import default_state_dir, local_path

        self.journal = local_path(os.path.join(default_state_dir(), f"{dev_id}.mirror"))
        self._recovering = recovering

    def attach(self) -> _bindings.CTarget:
        fd = -1
        if self.journal is not None:
            fd = self._open_journal(self.journal)
        try:
            ct = _bindings.CTarget(_bindings.TGT_MIRROR, self._size,
                                   legs=[(b.fd, b.is_bdev) for b in self._backings],
                                   region_shift=self.region_size.bit_length() - 1,
                                   journal_fd=fd)
        except OSError as e:
            if e.errno == errno.EBADMSG:
                raise TargetError(errno.EBADMSG, f"the journal {self.journal} does not "
                                  "describe this mirror (other legs, size or region size; "
                                  "recover with the device's own --leg/--size options)"
                                  ) from None
            raise TargetError(e.errno or errno.EIO,
                              f"cannot set up the mirror: {e.strerror}") from None
        finally:
            if fd >= 0:
                os.close(fd)  # the mapping stays
        ct.set_probe_every(self._probe_every)
        return self._attached(ct)

    def _open_journal(self, path: str) -> int:
        if self._recovering and not os.path.exists(path):
            raise TargetError(errno.ENOENT, f"no journal {path}: without it nobody knows "
                              "which legs were in sync when the server died; delete the "
                              "device (ublkml del) and add it again, then resync")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            trunc = 0 if self._recovering else os.O_TRUNC
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | trunc, 0o600)
        except OSError as e:
            raise TargetError(e.errno or errno.EIO,
                              f"cannot open the mirror journal {path}: {e.strerror}") from None

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"target": self.name, "size": self.size,
                                  "backing": ",".join(self.legs), "legs": self.legs,
                                  "direct_io": self.direct, "region_size": self.region_size}
        with contextlib.suppress(UblkError):
            out["leg_states"] = [leg.state for leg in self.leg_info()]
        return out

    def completion_paths(self) -> list[CompletionPath]:
        """One path per leg (path = leg index), named ``leg0``, ``leg1``...,
        with the drives under the leg's file or block device."""
        return [CompletionPath.resolved(i, f"leg{i}", leg, b.fd)
                for i, (leg, b) in enumerate(zip(self.legs, self._backings, strict=True))]

    def close(self) -> None:
        try:
            for b in self._backings:
                if b.fd >= 0:
                    os.fsync(b.fd)
        finally:
            self._close_fds()

    def state_files(self) -> list[str]:
        return [self.journal] if self.journal is not None else []

    def _close_fds(self) -> None:
        for b in self._backings:
            with contextlib.suppress(OSError):
                os.close(b.fd)
        self._backings = [Backing(-1, b.is_bdev, b.direct, b.block_size, b.size, b.dev_ino)
                          for b in self._backings]

    # ---- legs -------------------------------------------------------------------

    def _ct(self) -> _bindings.CTarget:
        ct = self._ctarget
        if ct is None:
            raise ConfigError("the mirror's device is not started: leg commands need a "
                              "running device")
        return ct

    def _check_leg(self, leg: int) -> None:
        if not 0 <= leg < len(self.legs):
            raise ConfigError(f"leg {leg} does not exist: this mirror has legs "
                              f"0..{len(self.legs) - 1}")

    def set_leg_state(self, leg: int, state: str) -> None:
        """Make ``leg`` 'active', 'demoted' or 'failed' (active: only without dirty regions)."""
        self._check_leg(leg)
        if state not in LEG_STATES:
            raise ConfigError(f"leg state must be one of {', '.join(LEG_STATES)}, "
                              f"got {state!r}")
        try:
            self._ct().set_leg_state(leg, LEG_STATES[state])
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise ConfigError(f"leg {leg} is the last active leg: activate another leg "
                                  f"before making it {state}") from None
            if e.errno == errno.EAGAIN:
                raise ConfigError(f"leg {leg} has {self._dirty(leg)} dirty region(s): resync "
                                  "it first (promote resyncs, then activates)") from None
            raise
        except ValueError as e:
            raise UblkError(f"leg {leg}: {e}") from None

    def _dirty(self, leg: int) -> int:
        return self._ct().leg_info(leg).dirty_regions

    def leg_info(self) -> list[LegInfo]:
        ct = self._ct()
        out = []
        try:
            for i, path in enumerate(self.legs):
                s = ct.leg_info(i)
                out.append(LegInfo(i, path, _STATE_NAMES.get(s.state, str(s.state)),
                                   s.dirty_regions, s.total_regions, s.reads, s.writes,
                                   s.errors, s.probes))
        except ValueError as e:
            raise UblkError(str(e)) from None
        return out

    def set_probe_every(self, n: int) -> None:
        """Send every ``n``-th user read to each demoted leg too (0: no probes)."""
        if not 0 <= n < 1 << 32:
            raise ConfigError(f"probe interval must be 0..2^32-1 reads, got {n}")
        self._probe_every = n
        if self._ctarget is not None:
            self._ctarget.set_probe_every(n)

    def resync(self, leg: int, max_regions: int = 64) -> int:
        """Copy up to ``max_regions`` dirty regions to ``leg`` from an active leg.

        Blocking (the GIL is released): call it from a thread.  A failed leg
        becomes demoted first, so that it receives every write from then on.
        Returns the dirty regions left.
        """
        self._check_leg(leg)
        if max_regions < 0:
            raise ConfigError(f"max_regions must be >= 0, got {max_regions}")
        try:
            return self._ct().resync(leg, max_regions)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise ConfigError(f"cannot resync leg {leg}: no other leg is active to copy "
                                  "from") from None
            raise TargetError(e.errno or errno.EIO,
                              f"resync of leg {leg} ({self.legs[leg]}) failed: "
                              f"{os.strerror(e.errno or errno.EIO)}") from None
        except ValueError as e:
            raise UblkError(f"leg {leg}: {e}") from None

    def promote(self, leg: int, timeout: float | None = None, batch: int = 64) -> None:
        """Resync ``leg`` until it has no dirty region, then make it active (blocking).

        Regions under write are skipped and retried, so this converges under
        load.  Raises TargetError if the leg fails again meanwhile, and
        UblkError after ``timeout`` seconds.
        """
        self._check_leg(leg)
        if self._ct().leg_info(leg).state == _bindings.LEG_ACTIVE:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = self.resync(leg, batch)
            if self._ct().leg_info(leg).state == _bindings.LEG_FAILED:
                raise TargetError(errno.EIO, f"leg {leg} ({self.legs[leg]}) failed again "
                                  "while being resynced")
            if left == 0:
                try:
                    self._ct().set_leg_state(leg, _bindings.LEG_ACTIVE)
                    return
                except OSError as e:
                    if e.errno != errno.EAGAIN:  # dirtied meanwhile: go round again
                        raise
            if deadline is not None and time.monotonic() > deadline:
                raise UblkError(f"leg {leg} still has {left} dirty region(s) after "
                                f"{timeout:g} s of resync; try again under less write load")
            if left:
                time.sleep(0.001)  # the regions left are being written: let them finish
