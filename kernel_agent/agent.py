"""The agent: one process, one thread, one event loop.

Each turn of :meth:`Agent.step`:

1. re-reads the registry if its mtime changed (the CLI edits it) and brings
   the eBPF device map, the pidfds and the rings in line with it;
2. waits (``select``) on the extensions' pidfds and the eBPF ring buffer's
   epoll fd, up to one tick;
3. handles deaths: a pidfd becomes readable when its process exits, whatever
   the cause (SIGKILL included), and the class's policy is applied;
4. drains slow/error events into ``events.jsonl``;
5. reads each extension's submission ring (bounded per turn, so that one
   flooding extension cannot starve the others), validates every entry and
   answers it on the completion ring; every decision also goes to
   ``audit.jsonl``;
6. where the eBPF checker is loaded, runs ``rc_check`` on each extension's
   kernel queue (as many records per turn, at most) and acts on its verdicts;
7. advances the effect checks of applied changes.

Which checker judges recommendations: the eBPF program ``rc_check``
(:mod:`kernel_agent.recocheck`) when it loads (root, Linux >= 6.1, libbpf >=
1.1, the object): every registered extension then gets a queue pair, the
watched devices' modes and leases are mirrored into its maps, and extensions
that connect through :func:`kernel_agent.link.open_submitter` submit there.
Otherwise the Python :class:`~kernel_agent.validator.Validator`, and
:attr:`Agent.checker_reason` says why (``agent.json``, ``ublkml agent
status``, the audit's start entry).  While the eBPF checker is loaded no
recommendation is checked in Python: records that arrive on a ring file are
refused (REJECTED, reason ``RING_REFUSED``), since they would bypass the
kernel's checks, leases included; extensions submit through
:func:`kernel_agent.link.open_submitter`, which picks the kernel queue.

A device's lease may have several holders (its owner, and the drive monitor
where it claims the device): :func:`kernel_agent.registry.lease_holders`,
mirrored into ``rc_leases`` whenever the registry changes.

The agent wakes up at once when a submitter writes to its FIFO
(``<state dir>/wake``, :class:`kernel_agent.ring.Waker`), else every tick.

Effect check: a change is applied only after one *baseline* window of the
device's kernel-side mean latency (issue -> complete, from eBPF or sysfs), then
the same window is measured after it.  If both windows saw at least
``min_ios`` I/Os and the latency after exceeds ``(1 + tolerance)`` times the
one before, the old value is written back (ROLLED_BACK), else KEPT.  While a
device has a change under evaluation, other changes to it are rejected
("busy"), so that each measurement judges one change.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernel_agent.accounting import (
    BlockEvent,
    BpfAccounting,
    DeviceStats,
    resolve_device,
    sysfs_stats,
)
from kernel_agent.actions import ActionError, ActionSpec, default_actions
from kernel_agent.errors import AgentError, BpfUnavailableError, RingError, UnknownDeviceError
from kernel_agent.eventlog import JsonLinesLog
from kernel_agent.recocheck import OBJECT_PATH as RC_OBJECT_PATH
from kernel_agent.recocheck import RecoCheck, reason_text
from kernel_agent.recocheck_model import ACTION_IDS, SCHEDULERS, ExtPolicy, Reason
from kernel_agent.recocheck_model import Verdict as KernelVerdict
from kernel_agent.registry import (
    DeviceConfig,
    Extension,
    Limits,
    Registry,
    lease_holders,
    proc_starttime,
)
from kernel_agent.ring import (
    WAKE_NAME,
    Channel,
    Completion,
    MalformedRecord,
    Recommendation,
    Status,
    decode_submission,
)
from kernel_agent.validator import Mode, Policy, Validator, Verdict, WatchedDevice
from ublk_driver.core.priority import raise_thread_priority

PER_TURN = 32  # submissions read per extension per turn
#: The answer to a ring-file record while the eBPF checker is loaded.
#: (It fits a completion's 104-byte reason.)
RING_REFUSED = ("refused: checks run in eBPF; submit via the extension's eBPF queue "
                "(kernel_agent.link.open_submitter)")
ACTION_NAMES = {i: name for name, i in ACTION_IDS.items()}
log = logging.getLogger("ublkml.kernel_agent")


def remove_ublk_device(dev_id: int) -> None:
    """Delete a ublk device whose server died, without waiting for the kernel to
    free it: DEL_DEV would block the agent for as long as any process holds
    /dev/ublkbN open (DEL_DEV_ASYNC; DEL_DEV on kernels without it)."""
    from ublk_driver.control import Control

    with Control() as ctrl:
        if not ctrl.delete_async(dev_id):
            ctrl.delete(dev_id)


@dataclass
class Trial:
    """An applied change under evaluation."""

    ext_id: int
    rec: Recommendation
    spec: ActionSpec
    dev: WatchedDevice
    value: str
    phase: str            # "baseline" -> "applied"
    due: float
    snap: DeviceStats
    before_us: float | None = None
    old: str = ""
    audit: dict[str, Any] | None = None   # what every decision on it also logs


@dataclass
class _Live:
    ext: Extension
    pidfd: int
    channel: Channel | None
    queue: str | None = None              # the pinned eBPF submission queue
    policy: ExtPolicy | None = None       # what the kernel enforces for it
    kseq: int = 0                         # the last verdict's sequence number


def ext_policy(limits: Limits) -> ExtPolicy:
    """A class's recommendation policy as the eBPF checker takes it."""
    return ExtPolicy(limits.rate_per_s, limits.burst, limits.floor_permille,
                     limits.max_ttl_ms)


def mean_latency_us(a: DeviceStats, b: DeviceStats, min_ios: int) -> float | None:
    """Mean latency of the I/Os completed between two snapshots (None: too few)."""
    n = b.total_ios - a.total_ios
    if n < max(1, min_ios) or a.latency_sum_ns is None or b.latency_sum_ns is None:
        return None
    return (b.latency_sum_ns - a.latency_sum_ns) / n / 1000.0


def is_regression(before_us: float | None, after_us: float | None, tolerance: float) -> bool:
    """Measured on both sides and worse than ``(1 + tolerance)`` x before."""
    if before_us is None or after_us is None:
        return False
    return after_us > before_us * (1.0 + tolerance)


class Agent:
    def __init__(self, root: str | os.PathLike[str] | None = None, instance: str = "default",
                 use_bpf: bool = True, attach: str = "auto", policy: Policy | None = None,
                 actions: dict[str, ActionSpec] | None = None, window_s: float = 1.0,
                 tolerance: float = 0.25, min_ios: int = 20, tick_s: float = 0.05,
                 log_max_bytes: int = 4 << 20,
                 remove_device: Callable[[int], None] = remove_ublk_device,
                 check_in_kernel: bool = True, recocheck_object: Path = RC_OBJECT_PATH
                 ) -> None:
        self.registry = Registry(root)
        self.root = self.registry.root
        self.instance = instance
        self.window_s, self.tolerance, self.min_ios, self.tick_s = (
            window_s, tolerance, min_ios, tick_s)
        self.remove_device = remove_device
        self.validator = Validator(actions if actions is not None else default_actions(),
                                   policy or Policy())
        # An explicit policy holds for every extension (tests); else each class's.
        self._policy = policy
        self.acc: BpfAccounting | None = None
        self.fallback_reason = ""
        if use_bpf:
            try:
                self.acc = BpfAccounting(instance, attach)
            except BpfUnavailableError as e:
                self.fallback_reason = str(e)
        else:
            self.fallback_reason = "eBPF disabled (--no-bpf)"
        self.rc: RecoCheck | None = None
        self.checker_reason = ""
        if not use_bpf:
            self.checker_reason = "eBPF disabled (--no-bpf)"
        elif not check_in_kernel:
            self.checker_reason = "the eBPF checker is disabled (--no-bpf-checker)"
        else:
            try:
                self.rc = RecoCheck(instance, recocheck_object)
            except (AgentError, OSError) as e:
                self.checker_reason = str(e).splitlines()[0]
        if self.rc is None:  # `agent run` prints it too, into agent.log
            log.info("kernel agent: recommendations checked by the Python validator: %s",
                     self.checker_reason)
        self.root.mkdir(parents=True, exist_ok=True)
        self._wake_fd = self._open_wake()
        self._mirrored: dict[str, tuple[str, frozenset[int]]] = {}
        self._holders: dict[str, frozenset[int]] = {}   # watched device -> lease holders
        self._unwatched_claims: set[tuple[int, str]] = set()
        self.events = JsonLinesLog(self.root / "events.jsonl", log_max_bytes)
        self.audit = JsonLinesLog(self.root / "audit.jsonl", log_max_bytes)
        self._ring = self.acc.ring_buffer(self._on_event) if self.acc else None
        self._mtime = -1
        self.devices: dict[str, WatchedDevice] = {}
        self._slow: dict[str, int] = {}
        self._wanted: dict[str, DeviceConfig] = {}
        self._live: dict[int, _Live] = {}
        self.trials: dict[str, Trial] = {}
        self.counters = {"events": 0, "decisions": 0, "deaths": 0}
        self._stop = threading.Event()
        self.audit.write({"type": "agent", "what": "start", "pid": os.getpid(),
                          "source": self.source, "fallback": self.fallback_reason or None,
                          "checker": self.checker,
                          "checker_reason": self.checker_reason or None})
        self._write_state()

    def _open_wake(self) -> int:
        """The wake-up FIFO, held read-write so that it never reads end-of-file."""
        path = self.root / WAKE_NAME
        try:
            if not stat.S_ISFIFO(os.lstat(path).st_mode):
                os.unlink(path)
                raise FileNotFoundError
        except FileNotFoundError:
            os.mkfifo(path, 0o600)
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

    # -- state ----------------------------------------------------------------------

    @property
    def source(self) -> str:
        return "ebpf" if self.acc else "sysfs"

    @property
    def checker(self) -> str:
        """Who checks recommendations: ``ebpf`` (rc_check) or ``python`` (the validator)."""
        return "ebpf" if self.rc else "python"

    def _write_state(self) -> None:
        state = {"pid": os.getpid(), "instance": self.instance, "source": self.source,
                 "attach": self.acc.attach if self.acc else None,
                 "fallback_reason": self.fallback_reason or None,
                 "pin_dir": self.acc.pin_dir if self.acc else None,
                 "checker": self.checker, "checker_reason": self.checker_reason or None,
                 "queues": {str(i): lv.queue for i, lv in self._live.items()},
                 "devices": {n: {"dev": d.bd.majmin, "mode": d.mode.value,
                                 "owner": self._wanted[n].owner if n in self._wanted else None,
                                 "holders": sorted(self._holders.get(n, ()))}
                             for n, d in self.devices.items()},
                 "extensions": sorted(self._live), "counters": self.counters}
        tmp = self.root / f"agent.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.root / "agent.json")

    def stats(self, name: str) -> DeviceStats:
        dev = self.devices.get(name)
        if dev is None:
            raise UnknownDeviceError(f"{name} is not watched by the agent")
        if self.acc:
            return self.acc.stats(dev.bd)
        return sysfs_stats(dev.bd, f"eBPF unavailable ({self.fallback_reason}); "
                           "cumulative /sys/block counters")

    # -- sync with the registry -------------------------------------------------------

    def sync(self, force: bool = False) -> None:
        mtime = self.registry.mtime_ns()
        if mtime == self._mtime and not force:
            self._retry_devices()
            return
        self._mtime = mtime
        wanted = self.registry.devices()
        exts = {e.id: e for e in self.registry.extensions()}
        for name in list(self.devices):
            if name not in wanted:
                self._unwatch(name)
        self._wanted = wanted
        self._holders = lease_holders(wanted, list(exts.values()))
        self._audit_claims(exts)
        for ext_id in list(self._live):
            if ext_id not in exts or exts[ext_id].state != "live":
                self._drop(ext_id)
        for ext in exts.values():
            if ext.state == "live" and ext.id not in self._live:
                self._adopt(ext)
        # After adoption: a new extension's queue exists before its leases reach
        # the kernel, so it never sees an answer from a lease without its bit.
        self._retry_devices()
        self._write_state()

    def _audit_claims(self, exts: dict[int, Extension]) -> None:
        """Log, once each, claims on devices the agent does not watch (granted nothing)."""
        pending = {(e.id, n) for e in exts.values() if e.state == "live"
                   for n in e.claims if n not in self._wanted}
        for ext_id, name in sorted(pending - self._unwatched_claims):
            self.audit.write({"type": "lease", "what": "claim-not-granted", "ext": ext_id,
                              "device": name,
                              "reason": f"{name} is not watched by the agent"})
        self._unwatched_claims = pending

    def _retry_devices(self) -> None:
        """Watch wanted devices that exist (a ublk device may appear later)."""
        for name, cfg in self._wanted.items():
            cur = self.devices.get(name)
            if cur is not None:
                if cur.mode.value != cfg.mode:
                    self.devices[name] = WatchedDevice(cur.bd, Mode(cfg.mode))
                if self._slow.get(name) != cfg.slow_us and self.acc:
                    self.acc.set_slow_threshold(cur.bd, cfg.slow_us)
                    self._slow[name] = cfg.slow_us
                self._mirror(name, cfg)
                continue
            try:
                bd = resolve_device(name)
            except UnknownDeviceError:
                continue
            if self.acc:
                self.acc.watch(bd, cfg.slow_us)
            self._slow[name] = cfg.slow_us
            self.devices[name] = WatchedDevice(bd, Mode(cfg.mode))
            self._mirror(name, cfg)
            self.audit.write({"type": "device", "what": "watch", "device": name,
                              "dev": bd.majmin, "mode": cfg.mode, "slow_us": cfg.slow_us,
                              "owner": cfg.owner, "source": self.source})

    def _mirror(self, name: str, cfg: DeviceConfig) -> None:
        """The device's mode and lease holders into the checker's rc_modes / rc_leases."""
        holders = self._holders.get(name, frozenset())
        if self._mirrored.get(name) == (cfg.mode, holders):
            return
        before = self._mirrored.get(name)
        if self.rc is not None:
            dev = self.devices[name].bd.dev
            self.rc.set_mode(dev, Mode(cfg.mode))
            self.rc.set_lease(dev, holders)
        self._mirrored[name] = (cfg.mode, holders)
        if before is None or before[1] != holders:
            self.audit.write({"type": "lease", "what": "holders", "device": name,
                              "holders": sorted(holders), "owner": cfg.owner,
                              "checker": self.checker})

    def _unwatch(self, name: str) -> None:
        dev = self.devices.pop(name)
        self._slow.pop(name, None)
        self.trials.pop(name, None)
        if self._mirrored.pop(name, None) is not None and self.rc is not None:
            self.rc.set_mode(dev.bd.dev, None)
            self.rc.set_lease(dev.bd.dev, ())
        if self.acc:
            with contextlib.suppress(OSError):
                self.acc.unwatch(dev.bd)
        self.audit.write({"type": "device", "what": "unwatch", "device": name})

    def _adopt(self, ext: Extension) -> None:
        """Open a pidfd on a registered process (checking it is the same process)."""
        try:
            pidfd = os.pidfd_open(ext.pid)
        except ProcessLookupError:
            pidfd = -1
        if pidfd >= 0 and proc_starttime(ext.pid) != ext.starttime:
            os.close(pidfd)  # the pid was reused: the registered process is gone
            pidfd = -1
        channel = None
        try:
            channel = Channel.open(ext.ring) if ext.ring else None
        except RingError as e:
            self.audit.write({"type": "extension", "what": "ring-unusable", "id": ext.id,
                              "reason": str(e)})
        live = _Live(ext, pidfd, channel)
        self._live[ext.id] = live
        entry: dict[str, Any] = {"type": "extension", "what": "adopt", "id": ext.id,
                                 "cls": ext.cls, "pid": ext.pid, "checker": self.checker}
        if pidfd >= 0 and self.rc is not None:
            try:
                live.policy = ext_policy(self.registry.limits()[ext.cls])
                live.queue = self.rc.add_extension(ext.id, live.policy).submission
                entry["queue"] = live.queue
            except (AgentError, OSError) as e:
                entry["queue_problem"] = f"no eBPF queue, its ring is checked in Python: {e}"
        self.audit.write(entry)
        if pidfd < 0:
            self._on_death(live)

    def _drop(self, ext_id: int) -> None:
        live = self._live.pop(ext_id)
        if live.pidfd >= 0:
            os.close(live.pidfd)
        if live.channel:
            live.channel.close()
        if self.rc is not None and live.queue is not None:
            self.rc.remove_extension(ext_id)

    # -- the loop -------------------------------------------------------------------------

    def step(self, timeout: float | None = None) -> None:
        self.sync()
        fds = [lv.pidfd for lv in self._live.values() if lv.pidfd >= 0]
        if self._ring is not None:
            fds.append(self._ring.epoll_fd())
        fds.append(self._wake_fd)
        wait = self.tick_s if timeout is None else timeout
        try:
            ready = set(select.select(fds, [], [], wait)[0])
        except InterruptedError:
            ready = set()
        if self._wake_fd in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_fd, 4096):
                    pass
        for live in list(self._live.values()):
            if live.pidfd in ready:
                self._on_death(live)
        if self._ring is not None:
            self._ring.poll(0)
        for live in list(self._live.values()):
            self._serve_ring(live)
            self._serve_queue(live)
        self._advance_trials()

    def run(self) -> None:
        """Until SIGTERM/SIGINT (or :meth:`stop`)."""
        def on_signal(_sig: int, _frame: object) -> None:
            self._stop.set()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
        # The loop answers recommendations: a demotion must not wait behind
        # CPU-bound processes at normal priority.
        why = raise_thread_priority()
        if why is not None:
            self.events.write({"event": "priority", "note": why})
        self.sync(force=True)
        last_state = time.monotonic()
        while not self._stop.is_set():
            self.step()
            if time.monotonic() - last_state > 1.0:
                self._write_state()
                last_state = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        for ext_id in list(self._live):
            self._drop(ext_id)
        for trial in list(self.trials.values()):
            if trial.phase == "applied" and trial.spec.reversible:
                # An unfinished evaluation: leave the device as it was found.
                self._rollback(trial, "agent stopped before the effect check finished")
        self.trials.clear()
        if self._ring is not None:
            self._ring.free()
        if self.rc is not None:
            self.rc.close()
        if self.acc:
            self.acc.close()
        os.close(self._wake_fd)
        with contextlib.suppress(OSError):
            os.unlink(self.root / WAKE_NAME)
        self.audit.write({"type": "agent", "what": "stop", "pid": os.getpid()})
        self.events.close()
        self.audit.close()
        with contextlib.suppress(OSError):
            os.unlink(self.root / "agent.json")

    # -- events and deaths ------------------------------------------------------------------

    def _on_event(self, ev: BlockEvent) -> None:
        self.counters["events"] += 1
        rec = ev.to_json()
        for name, d in self.devices.items():
            if d.bd.dev == ev.dev:
                rec["device"] = name
        self.events.write(rec)

    def _on_death(self, live: _Live) -> None:
        ext = live.ext
        self.counters["deaths"] += 1
        self._drop(ext.id)
        action = "unregistered"
        if ext.cls == "ublk-server" and ext.dev_id is not None:
            if ext.policy == "remove":
                try:
                    self.remove_device(ext.dev_id)
                    action = f"device {ext.dev_id} removed"
                except Exception as e:  # the policy failed: say so, keep running
                    action = f"removing device {ext.dev_id} failed: {e}"
                self.registry.remove(ext.id)
            else:
                action = f"device {ext.dev_id} kept for recovery"
                self.registry.set_state(ext.id, "dead")
        else:
            self.registry.remove(ext.id)
        self._mtime = -1  # our own change: re-sync devices next turn
        self.audit.write({"type": "extension", "what": "died", "id": ext.id, "cls": ext.cls,
                          "pid": ext.pid, "policy": ext.policy, "action": action})

    # -- recommendations ----------------------------------------------------------------------

    def _decide(self, live: _Live, c: Completion, rec: Recommendation | None = None,
                extra: dict[str, Any] | None = None) -> None:
        self.counters["decisions"] += 1
        c = Completion(c.seq, c.ext_id, c.status, c.device, c.action, c.old, c.new,
                       c.reason, time.time_ns())
        posted = False
        if live.channel:
            try:
                posted = live.channel.complete(c)
            except RingError as e:
                self._ring_unusable(live, e)
        entry: dict[str, Any] = {"type": "decision", "ext": live.ext.id, "seq": c.seq,
                                 "status": c.status.name.lower(), "device": c.device,
                                 "action": c.action, "old": c.old, "new": c.new,
                                 "reason": c.reason, "posted": posted}
        if rec is not None:
            entry.update(value=rec.value, confidence=rec.confidence, model=rec.model)
        entry.update(extra or {"checker": "python"})
        self.audit.write(entry)

    def _serve_ring(self, live: _Live) -> None:
        if live.channel is None:
            return
        try:
            raws, problem = live.channel.take_submissions(PER_TURN)
        except RingError as e:
            self._ring_unusable(live, e)
            return
        if problem:
            self._decide(live, Completion(0, live.ext.id, Status.REJECTED, reason=problem))
        if self.rc is not None:
            self._refuse_ring(live, raws)
            return
        for raw in raws:
            try:
                rec = decode_submission(raw)
            except MalformedRecord as e:
                # Still costs a token: a flood of garbage is a flood.
                self.validator.check(Recommendation("", "", "", 0.0, "", 0, -1),
                                     live.ext.id, {}, self._class_policy(live))
                self._decide(live, Completion(0, live.ext.id, Status.REJECTED,
                                              reason=f"malformed: {e}"))
                continue
            try:
                self._handle(live, rec)
            except Exception as e:  # a bug must not take the agent down
                self._decide(live, Completion(rec.seq, live.ext.id, Status.FAILED, rec.device,
                                              rec.action, reason=f"internal error: {e!r}"),
                             rec)

    def _refuse_ring(self, live: _Live, raws: list[bytes]) -> None:
        """With the eBPF checker loaded, a ring record would bypass the kernel's
        checks (leases first): each is answered REJECTED, and says where to submit."""
        extra = {"checker": "ebpf", "reason_code": "RING"}
        for raw in raws:
            try:
                rec: Recommendation | None = decode_submission(raw)
            except MalformedRecord:
                rec = None
            c = Completion(rec.seq if rec else 0, live.ext.id, Status.REJECTED,
                           rec.device if rec else "", rec.action if rec else "",
                           reason=RING_REFUSED)
            self._decide(live, c, rec, extra)

    def _serve_queue(self, live: _Live) -> None:
        """Run rc_check on the extension's kernel queue and act on the verdicts."""
        if self.rc is None or live.queue is None:
            return
        try:
            self.rc.run(live.ext.id, PER_TURN)
            verdicts = self.rc.verdicts(live.ext.id)
        except (AgentError, OSError) as e:
            self.audit.write({"type": "extension", "what": "queue-unusable", "id": live.ext.id,
                              "reason": str(e)})
            return
        for v in verdicts:
            try:
                self._on_verdict(live, v)
            except Exception as e:  # a bug must not take the agent down
                self._decide(live, Completion(v.rec.seq, live.ext.id, Status.FAILED,
                                              reason=f"internal error: {e!r}"),
                             extra={"checker": "ebpf", "kseq": v.kseq})

    def _device_name(self, dev: int) -> str:
        for name, d in self.devices.items():
            if d.bd.dev == dev:
                return name
        return f"{dev >> 20}:{dev & 0xFFFFF}"

    def _on_verdict(self, live: _Live, v: KernelVerdict) -> None:
        if live.kseq and v.kseq != live.kseq + 1:
            self.audit.write({"type": "extension", "what": "verdicts-lost", "id": live.ext.id,
                              "after": live.kseq, "next": v.kseq})
        live.kseq = v.kseq
        s = v.rec
        action = ACTION_NAMES.get(s.action, f"action #{s.action}")
        value = SCHEDULERS[s.value] if action == "scheduler" and 0 <= s.value < len(
            SCHEDULERS) else str(s.value)
        rec = Recommendation(self._device_name(s.dev), action, value, s.confidence / 1000,
                             live.ext.model or f"model {s.model:#010x}", s.ttl_ms, s.ext_id,
                             s.seq, s.created_ns + time.time_ns() - time.monotonic_ns())
        extra: dict[str, Any] = {"checker": "ebpf", "kseq": v.kseq,
                                 "reason_code": v.reason.name}
        holders = self.rc.holders(v.holders) if self.rc is not None else []
        if v.reason is Reason.OWNER:
            extra["holders"] = holders
        if v.status in (Status.REJECTED, Status.OBSERVED):
            text = reason_text(v, rec, live.policy or ExtPolicy(), holders=holders)
            self._decide(live, Completion(s.seq, live.ext.id, v.status, rec.device,
                                          rec.action, new=rec.value, reason=text), rec, extra)
            return
        # Approved by the kernel: what it cannot check (the device offers the
        # value, the knob exists) is checked here, then applied as ever.
        dev = self.devices.get(rec.device)
        if dev is None:
            verdict = Verdict(Status.REJECTED, f"unknown device {rec.device!r} (no longer "
                              "watched by the agent)")
        else:
            verdict = self.validator.finish(rec, dev)
        self._act(live, rec, verdict, extra)

    def _ring_unusable(self, live: _Live, e: RingError) -> None:
        """Stop using an extension's ring (truncated under us); the extension stays."""
        if live.channel is not None:
            live.channel.close()
            live.channel = None
        self.audit.write({"type": "extension", "what": "ring-unusable", "id": live.ext.id,
                          "reason": str(e)})

    def _handle(self, live: _Live, rec: Recommendation) -> None:
        self._act(live, rec, self.validator.check(rec, live.ext.id, self.devices,
                                                  self._class_policy(live)),
                  {"checker": "python"})

    def _class_policy(self, live: _Live) -> Policy | None:
        """The Python validator's policy for this extension: its class's, as the
        eBPF checker's (None: the agent's own, given explicitly)."""
        if self._policy is not None:
            return None
        if live.policy is None:
            try:
                live.policy = ext_policy(self.registry.limits()[live.ext.cls])
            except (AgentError, KeyError):
                live.policy = ExtPolicy()
        p = live.policy
        return Policy(p.floor_permille / 1000, float(p.rate_per_s), p.burst, p.max_ttl_ms)

    def _act(self, live: _Live, rec: Recommendation, v: Verdict,
             extra: dict[str, Any]) -> None:
        """Answer a checked recommendation; an approved one starts its trial."""
        def answer(status: Status, reason: str, old: str = "", new: str = "") -> None:
            self._decide(live, Completion(rec.seq, live.ext.id, status, rec.device, rec.action,
                                          old, new, reason), rec, extra)

        if v.status is not Status.APPLIED:
            answer(v.status, v.reason, new=v.value)
            return
        assert v.spec is not None and v.device is not None
        if rec.device in self.trials:
            answer(Status.REJECTED, f"busy: another change to {rec.device} is being "
                   "evaluated")
            return
        trial = Trial(live.ext.id, rec, v.spec, v.device, v.value, "baseline",
                      time.monotonic() + self.window_s, self._snapshot(v.device), audit=extra)
        if not v.spec.check_effect:
            self._apply(trial)
            return
        self.trials[rec.device] = trial

    def _snapshot(self, dev: WatchedDevice) -> DeviceStats:
        return self.acc.stats(dev.bd) if self.acc else sysfs_stats(dev.bd)

    def _completion_for(self, t: Trial, status: Status, reason: str) -> None:
        live = self._live.get(t.ext_id)
        c = Completion(t.rec.seq, t.ext_id, status, t.rec.device, t.rec.action, t.old, t.value,
                       reason)
        if live is not None:
            self._decide(live, c, t.rec, t.audit)
        else:  # the extension is gone; the log still gets the decision
            self.audit.write({"type": "decision", "ext": t.ext_id, "seq": t.rec.seq,
                              "status": status.name.lower(), "device": t.rec.device,
                              "action": t.rec.action, "old": t.old, "new": t.value,
                              "reason": reason, "posted": False,
                              **(t.audit or {"checker": "python"})})

    def _apply(self, t: Trial) -> bool:
        try:
            t.old = t.spec.applier.read(t.dev.bd)
            t.spec.applier.write(t.dev.bd, t.value)
        except (ActionError, OSError) as e:
            self.trials.pop(t.rec.device, None)
            self._completion_for(t, Status.FAILED, str(e))
            return False
        note = "applied; effect check in progress" if t.spec.check_effect else \
            "applied (no effect check for this action)"
        self._completion_for(t, Status.APPLIED, note)
        return True

    def _rollback(self, t: Trial, reason: str) -> None:
        try:
            t.spec.applier.write(t.dev.bd, t.old)
        except (ActionError, OSError) as e:
            reason += f"; ROLLBACK FAILED: {e}"
        self._completion_for(t, Status.ROLLED_BACK, reason)

    def _advance_trials(self) -> None:
        now = time.monotonic()
        for name, t in list(self.trials.items()):
            if now < t.due:
                continue
            try:
                snap = self._snapshot(t.dev)
            except AgentError as e:
                self.trials.pop(name)
                self._completion_for(t, Status.FAILED, f"cannot measure: {e}")
                continue
            if t.phase == "baseline":
                t.before_us = mean_latency_us(t.snap, snap, self.min_ios)
                if not self._apply(t):
                    continue
                t.phase, t.due, t.snap = "applied", time.monotonic() + self.window_s, snap
                continue
            self.trials.pop(name)
            after = mean_latency_us(t.snap, snap, self.min_ios)
            measured = f"mean latency {_us(t.before_us)} -> {_us(after)}"
            if is_regression(t.before_us, after, self.tolerance):
                self._rollback(t, f"regression: {measured} (tolerance "
                               f"{self.tolerance:+.0%}); restored {t.old!r}")
            elif t.before_us is None or after is None:
                self._completion_for(t, Status.KEPT, f"kept: too little I/O to measure "
                                     f"(< {self.min_ios} per window); {measured}")
            else:
                self._completion_for(t, Status.KEPT, f"kept: {measured}")


def _us(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} us"


def read_agent_state(root: Path) -> dict[str, Any] | None:
    """agent.json if its agent is alive, else None."""
    try:
        state: dict[str, Any] = json.loads((root / "agent.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(int(state["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError):
        return None
    except PermissionError:
        pass
    return state
