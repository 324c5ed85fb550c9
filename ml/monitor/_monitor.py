"""The monitor: one tick per interval, every drive of the host, one model call.

Threads (all in the monitor's own process, never in a server's):

* the **tick** thread: reads every drive's kernel counters (eBPF or sysfs),
  appends one sample per drive to its ring, scores the windows (peers, or the
  drive's own baseline), applies the flags' hysteresis, sends alerts and
  recommendations, writes the state file (at most once a second);
* the **discovery** thread: asks every ublkml device's server for its paths
  every ``rescan_s``, so that a slow or dead server never delays a tick; the
  tick adopts the new topology at its next turn;
* the **SMART** thread (:mod:`ml.monitor._smartpoll`).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernel_agent.accounting import BlockDevice
from kernel_agent.errors import AgentError
from ml.model import Model, load_model, reference_model
from ml.monitor._agentlink import AgentLink, Sent
from ml.monitor._drives import (
    DeviceInfo,
    Topology,
    ask_device,
    build_topology,
    device_ids,
    whole_device,
)
from ml.monitor._judge import Baseline, WindowVerdict, judge
from ml.monitor._samples import Counters, CounterSource, SampleRing, difference
from ml.monitor._smartpoll import SmartPoller, SmartResult
from ublk_driver.admin.paths import default_state_dir
from ublk_driver.core.errors import UblkError
from ublk_driver.core.priority import TIMELY_NICE, raise_thread_priority
from ublk_driver.core.process import pid_alive
from ublk_driver.drive_verdicts import DriveVerdict, write_verdicts

log = logging.getLogger("ublkml.ml.monitor")

STATE_VERSION = 1
STATE_FILE = "monitor.json"


class MonitorError(UblkError, ValueError):
    """The monitor cannot start as asked (a named drive that does not exist, ...)."""


def state_file(state_dir: str | None = None) -> str:
    return os.path.join(state_dir or default_state_dir(), STATE_FILE)


@dataclass
class MonitorConfig:
    interval_s: float = 1.0
    window_s: float = 30.0
    smart_interval_s: float = 60.0
    rescan_s: float = 5.0
    drives: tuple[str, ...] = ()
    discover: bool = True
    use_bpf: bool = True
    smart: bool = True
    agent: bool = True
    demote_slow: bool = False
    baseline_s: float = 60.0
    flag_after: int = 3
    clear_after: int = 10
    model: str | None = None
    failure_model: str | None = None
    state_dir: str | None = None
    agent_dir: str | None = None
    nice: int | None = TIMELY_NICE

    def check(self) -> None:
        if not 0.05 <= self.interval_s <= 3600:
            raise MonitorError(f"--interval must be 0.05..3600 s, got {self.interval_s:g}")
        if self.window_s < 3 * self.interval_s:
            raise MonitorError(f"--window ({self.window_s:g} s) must hold at least 3 "
                               f"intervals ({3 * self.interval_s:g} s)")
        if self.smart_interval_s <= 0 or self.rescan_s <= 0 or self.baseline_s <= 0:
            raise MonitorError("--smart-interval, --rescan and --baseline must be positive")
        if self.flag_after < 1 or self.clear_after < 1:
            raise MonitorError("--flag-after and --clear-after must be >= 1 tick")

    @property
    def min_samples(self) -> int:
        return max(3, round(self.window_s / self.interval_s / 3))


@dataclass
class DriveState:
    """Everything the monitor keeps about one drive (bounded)."""

    drive: BlockDevice
    at: BlockDevice
    source: str
    source_note: str
    ring: SampleRing
    baseline: Baseline
    prev: Counters | None = None
    prev_t: float = 0.0
    verdict: WindowVerdict | None = None
    flagged: bool = False
    flagged_since: float | None = None
    streak: int = 0                 # consecutive ticks above (>0) or below (<0) the threshold
    errors_total: int = 0
    read_error: str | None = None
    smart: SmartResult | None = None
    smart_flagged: bool = False
    path_errors: int = 0
    actions: list[dict[str, Any]] = field(default_factory=list)
    errors_alerted: int = 0         # errors_total when the last io_errors alert went out
    error_alert_at: float = float("-inf")


class Monitor:
    """The host-wide drive monitor (``ublkml monitor run``)."""

    def __init__(self, config: MonitorConfig, source: CounterSource | None = None,
                 smart: SmartPoller | None = None, agent: AgentLink | None = None) -> None:
        config.check()
        self.config = c = config
        self.model: Model = (load_model(c.model, expect_kind="fail_slow") if c.model
                             else reference_model("fail_slow"))
        failure: Model | None = None
        if c.smart:
            failure = (load_model(c.failure_model, expect_kind="failure") if c.failure_model
                       else reference_model("failure"))
        self.failure_model = failure
        self.named: list[BlockDevice] = []
        for spec in c.drives:
            try:
                self.named.append(whole_device(spec))
            except AgentError as e:
                raise MonitorError(f"--drive {spec}: {e}") from None
        self.source = source if source is not None else CounterSource(c.use_bpf)
        self.smart = smart if smart is not None else (
            SmartPoller(failure, c.smart_interval_s) if c.smart else None)
        self.agent = agent if agent is not None else AgentLink(c.agent_dir, enabled=c.agent)
        self.drives: dict[str, DriveState] = {}
        self.topology = Topology()
        self._pending: Topology | None = None
        self._lock = threading.RLock()   # the tick's state, against readers
        self.on_tick: Callable[[Monitor], None] | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.alerts: collections.deque[dict[str, Any]] = collections.deque(maxlen=50)
        self.started = time.time()
        self.ticks = 0
        self.late_ticks = 0
        self.errors = 0
        self._error_counts: collections.Counter[str] = collections.Counter()
        self._tick_ms: collections.deque[float] = collections.deque(maxlen=120)
        self._state_written = float("-inf")
        self.priority_note: str | None = None
        self._ring_capacity = int(np.ceil(c.window_s / c.interval_s)) * 2 + 8

    # ---- topology ---------------------------------------------------------------

    def discover(self) -> Topology:
        """The drives of the user's list and of every ublkml device now."""
        infos: list[DeviceInfo] = []
        if self.config.discover:
            known = self.topology.devices
            for dev_id in device_ids(self.config.state_dir):
                info = ask_device(dev_id, self.config.state_dir)
                prev = known.get(dev_id)
                if info.error is not None and prev is not None and prev.paths:
                    # A server that did not answer this time (busy, stopping) keeps its
                    # drives until its files are gone: their windows and baselines stay.
                    info = DeviceInfo(dev_id, prev.bdev, prev.target, prev.mirror,
                                      prev.paths, info.error)
                infos.append(info)
        return build_topology(self.named, infos)

    def _adopt(self, topo: Topology) -> None:
        for name in list(self.drives):
            if name not in topo.drives:
                st = self.drives.pop(name)
                self.source.remove(st.at)
                if self.smart is not None:
                    self.smart.forget(name)
                self._alert("drive", name, f"{name} is no longer under any device: not "
                            "watched any more", level="info")
        for name, drive in topo.drives.items():
            at = topo.measured_at.get(name, drive)
            cur = self.drives.get(name)
            if cur is not None and cur.at == at:
                continue
            if cur is not None:
                self.source.remove(cur.at)
            how, note = self.source.add(at)
            learn = max(8, round(self.config.baseline_s / self.config.interval_s))
            self.drives[name] = DriveState(drive, at, how, note, SampleRing(self._ring_capacity),
                                           Baseline(learn_samples=learn))
            if self.smart is not None:
                self.smart.track(name, f"/dev/{name}")
        # Server-side evidence: failed I/Os the servers counted on each path.
        for name, st in self.drives.items():
            total = 0
            for use in topo.users.get(name, []):
                info = topo.devices.get(use.dev_id)
                for p in info.paths if info else []:
                    if p.index == use.path and p.errors:
                        total += p.errors
            if total > st.path_errors and self.smart is not None:
                self.smart.urgent(name, "server-errors")
            st.path_errors = total
        self.topology = topo
        # Its recommendations for these devices pass the agent's lease check.
        self.agent.claim([f"ublkb{u.dev_id}" for uses in topo.users.values() for u in uses])

    def _discover_loop(self) -> None:
        while not self._stop.wait(self.config.rescan_s):
            try:
                topo = self.discover()
            except Exception as e:
                self._error("discovery failed", e)
                continue
            with self._lock:
                self._pending = topo

    # ---- one tick -----------------------------------------------------------------

    def _error(self, what: str, e: BaseException) -> None:
        self.errors += 1
        key = f"{what}: {e}"
        if len(self._error_counts) > 1000:   # messages that vary must not grow it forever
            self._error_counts.clear()
        self._error_counts[key] += 1
        n = self._error_counts[key]
        if n == 1 or n % 100 == 0:
            log.error("%s (%d times)", key, n)

    def tick(self, now: float | None = None) -> None:
        """Sample, score, act, report: what the tick thread does each interval."""
        t0 = time.perf_counter()
        now = time.monotonic() if now is None else now
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is not None:
                self._adopt(pending)
            self._sample(now)
            try:
                self._score(now)
            except Exception as e:
                self._error("scoring failed", e)
            if self.smart is not None:
                for r in self.smart.results():
                    self._on_smart(r)
            for sent in self.agent.answers():
                self._on_answer(sent)
            self.ticks += 1
            self._tick_ms.append((time.perf_counter() - t0) * 1e3)
            try:
                self.write_state()
            except OSError as e:
                self._error("cannot write the state file", e)
            if self.on_tick is not None:
                try:
                    self.on_tick(self)
                except Exception as e:
                    self._error("on_tick failed", e)

    def _sample(self, now: float) -> None:
        for name, st in self.drives.items():
            try:
                cur = self.source.read(st.at)
            except (AgentError, OSError) as e:
                st.read_error = str(e)
                continue
            st.read_error = None
            if st.prev is not None:
                s = difference(st.prev, cur, now, now - st.prev_t)
                if s is not None:
                    st.ring.add(s)
                    if s.errors:
                        st.errors_total += s.errors
                        if self.smart is not None:
                            self.smart.urgent(name)
                    # At most one alert a minute per drive, with the count since the last.
                    new = st.errors_total - st.errors_alerted
                    if new and now - st.error_alert_at >= 60.0:
                        self._alert("io_errors", name, f"{new} I/O error(s) on {name} "
                                    f"(kernel count, {st.errors_total} since watched)",
                                    level="warning")
                        st.errors_alerted, st.error_alert_at = st.errors_total, now
            st.prev, st.prev_t = cur, now

    def _score(self, now: float) -> None:
        c = self.config
        since = now - c.window_s
        windows = {n: st.ring.window(since) for n, st in self.drives.items()}
        verdicts = judge(windows, {n: st.baseline for n, st in self.drives.items()},
                         self.model, c.window_s, c.min_samples)
        for name, st in self.drives.items():
            v = verdicts.get(name)
            st.verdict = v
            if v is not None and v.score is not None:
                st.streak = (max(st.streak, 0) + 1) if v.above else (min(st.streak, 0) - 1)
                if not st.flagged and st.streak >= c.flag_after:
                    st.flagged, st.flagged_since = True, time.time()
                    self._on_slow(name, st, v)
                elif st.flagged and -st.streak >= c.clear_after:
                    st.flagged, st.flagged_since = False, None
                    self._alert("recovered", name, f"{name} is no longer slow: {v.reason}",
                                level="info")
            # The newest sample teaches the baseline while the drive looks healthy.
            if not st.flagged and (v is None or not v.above) and st.ring.count:
                i = (st.ring.count - 1) % st.ring.capacity
                if st.ring.ts[i] == now and st.ring.ios[i] > 0:
                    st.baseline.add(float(st.ring.throughput[i]), float(st.ring.latency_us[i]))

    # ---- acting -------------------------------------------------------------------

    def _alert(self, kind: str, drive: str, message: str, level: str = "alert",
               **extra: Any) -> dict[str, Any]:
        rec = {"ts": round(time.time(), 3), "kind": kind, "level": level, "drive": drive,
               "message": message, **extra}
        self.alerts.append(rec)
        self.agent.write_log({"type": "monitor", **rec})
        (log.warning if level != "info" else log.info)("%s", message)
        return rec

    def _demote(self, name: str, st: DriveState, confidence: float, why: str,
                alert: dict[str, Any]) -> None:
        """A demote_leg recommendation for every mirror leg on the drive."""
        actions = []
        for use in self.topology.users.get(name, []):
            if not use.leg:
                continue
            device = f"ublkb{use.dev_id}"
            res = self.agent.recommend(device, "demote_leg", str(use.path), confidence, why,
                                       name, self.model.info.version)
            entry: dict[str, Any] = {"device": device, "action": "demote_leg",
                                     "value": str(use.path)}
            if isinstance(res, Sent):
                entry.update(status="sent", seq=res.seq)
            else:
                entry.update(status="not sent", reason=res)
            actions.append(entry)
        if actions:
            alert["actions"] = actions
            st.actions = (st.actions + actions)[-16:]
            self.agent.write_log({"type": "monitor", "what": "recommend", "drive": name,
                                  "why": why, "actions": actions})

    def _on_slow(self, name: str, st: DriveState, v: WindowVerdict) -> None:
        alert = self._alert("fail_slow", name, f"{name} is fail-slow: {v.reason}",
                            score=v.score, judged_by=v.judged_by)
        if self.config.demote_slow and v.score is not None:
            self._demote(name, st, v.score, "fail-slow", alert)

    def _on_smart(self, r: SmartResult) -> None:
        st = self.drives.get(r.drive)
        if st is None:
            return
        st.smart = r
        a = r.assessment
        if a is None or not a.flagged:
            if st.smart_flagged and a is not None:
                self._alert("smart_recovered", r.drive, f"{r.drive}: SMART healthy again",
                            level="info")
            st.smart_flagged = False if a is not None else st.smart_flagged
            return
        if st.smart_flagged:
            return      # already alerted for this episode
        st.smart_flagged = True
        alert = self._alert("smart", r.drive, f"{r.drive}: {a.reason}", risk=a.risk,
                            critical=a.critical)
        confidence = 1.0 if a.critical else float(a.risk or 0.5)
        self._demote(r.drive, st, confidence, "smart-critical" if a.critical else "smart-risk",
                     alert)

    def _on_answer(self, sent: Sent) -> None:
        st = self.drives.get(sent.drive)
        if st is not None:
            for a in st.actions:
                if a.get("seq") == sent.seq and a.get("device") == sent.device:
                    a.update(status=sent.status, reason=sent.reason)
        self.agent.write_log({"type": "monitor", "what": "answer", "drive": sent.drive,
                              "device": sent.device, "action": sent.action,
                              "value": sent.value, "status": sent.status,
                              "reason": sent.reason})

    # ---- state --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What the state file holds (consistent: taken under the tick's lock)."""
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        c = self.config
        drives: dict[str, Any] = {}
        for name, st in sorted(self.drives.items()):
            v = st.verdict
            smart: dict[str, Any] = {"risk": None, "critical": None, "passed": None,
                                     "critical_warning": None, "flagged": False,
                                     "checked_at": None, "error": None, "reason": None}
            if st.smart is not None:
                r = st.smart
                smart.update(checked_at=r.checked_at, error=r.error, trigger=r.trigger)
                if r.reading is not None:
                    smart.update(passed=r.reading.passed,
                                 critical_warning=r.reading.critical_warning,
                                 model=r.reading.model, serial=r.reading.serial)
                if r.assessment is not None:
                    smart.update(risk=r.assessment.risk, critical=r.assessment.critical,
                                 flagged=r.assessment.flagged, reason=r.assessment.reason)
            reason = st.read_error or (v.reason if v is not None else "no sample yet")
            if st.smart_flagged and st.smart is not None and st.smart.assessment is not None:
                reason = f"SMART: {st.smart.assessment.reason}; {reason}"
            drives[name] = {
                "dev": st.drive.majmin, "path": f"/dev/{name}", "measured_at": st.at.name,
                "source": st.source, "source_note": st.source_note,
                "named": name in self.topology.named,
                "users": [u.to_json() for u in self.topology.users.get(name, [])],
                "samples": v.samples if v is not None else 0,
                "samples_total": st.ring.count,
                "features": v.features if v is not None else {},
                "judged_by": v.judged_by if v is not None else None,
                "score": v.score if v is not None else None,
                "flagged": st.flagged or st.smart_flagged,
                "slow": st.flagged, "flagged_since": st.flagged_since,
                "io_errors": st.errors_total, "server_errors": st.path_errors,
                "smart": smart, "baseline": st.baseline.to_json(),
                "actions": st.actions, "reason": reason,
            }
        ms = sorted(self._tick_ms)
        return {
            "version": STATE_VERSION, "pid": os.getpid(), "updated": time.time(),
            "started": self.started,
            "config": {"interval_s": c.interval_s, "window_s": c.window_s,
                       "smart_interval_s": c.smart_interval_s, "rescan_s": c.rescan_s,
                       "baseline_s": c.baseline_s, "flag_after": c.flag_after,
                       "clear_after": c.clear_after, "min_samples": c.min_samples,
                       "demote_slow": c.demote_slow},
            "model": self.model.info.as_dict(),
            "failure_model": self.failure_model.info.as_dict() if self.failure_model else None,
            "ebpf": {"available": self.source.ebpf, "note": self.source.note or None},
            "priority": {"nice": _nice(), "note": self.priority_note},
            "agent": {"ext_id": self.agent.ext_id, "note": self.agent.note,
                      "log": self.agent.log_path},
            "devices": {str(k): v.to_json() for k, v in sorted(self.topology.devices.items())},
            "drives": drives,
            "alerts": list(self.alerts),
            "stats": {"ticks": self.ticks, "late_ticks": self.late_ticks,
                      "errors": self.errors,
                      "tick_ms_p50": ms[len(ms) // 2] if ms else None,
                      "tick_ms_max": ms[-1] if ms else None,
                      "smart_checks": self.smart.checks if self.smart else 0},
        }

    def write_state(self, force: bool = False) -> None:
        """``monitor.json``, atomically, at most once a second."""
        now = time.monotonic()
        if not force and now - self._state_written < 1.0:
            return
        self._state_written = now
        path = state_file(self.config.state_dir)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        snap = self.snapshot()
        with open(tmp, "w") as f:
            json.dump(snap, f, default=_json_default)
        os.replace(tmp, path)
        # The driver's own file, for `ublkml status` beside each device's drives.
        write_verdicts("monitor", {n: drive_verdict(d) for n, d in snap["drives"].items()},
                       self.config.state_dir)

    # ---- running ------------------------------------------------------------------

    def start(self) -> Monitor:
        """Adopt the first topology, then start the threads."""
        if self.config.nice is not None:
            # Before any other thread starts: they inherit this thread's nice value.
            self.priority_note = raise_thread_priority(self.config.nice)
        topo = self.discover()
        with self._lock:
            self._adopt(topo)
        if self.smart is not None:
            self.smart.start()
        for target, name in ((self._tick_loop, "ublkml-monitor-tick"),
                             (self._discover_loop, "ublkml-monitor-discover")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _tick_loop(self) -> None:
        period = self.config.interval_s
        due = time.monotonic()
        while True:
            now = time.monotonic()
            due = max(due + period, now + period / 2)
            if self._stop.wait(due - now):
                return
            if time.monotonic() - due > period / 2:
                self.late_ticks += 1
            try:
                self.tick()
            except Exception as e:   # nothing may end the loop
                self._error("tick failed", e)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        self._threads.clear()
        if self.smart is not None:
            self.smart.stop()
        try:
            self.write_state(force=True)
        except OSError as e:
            self._error("cannot write the state file", e)
        self.agent.close()
        for st in self.drives.values():
            self.source.remove(st.at)
        self.source.close()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stop.wait(timeout)

    def request_stop(self) -> None:
        self._stop.set()

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _nice() -> int | None:
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except OSError:
        return None


def drive_verdict(d: dict[str, Any]) -> DriveVerdict:
    """A drive of the state file as the driver's verdict (what `ublkml status` shows)."""
    smart = d.get("smart") or {}
    if smart.get("critical"):
        state = "CRITICAL"
    elif d.get("slow"):
        state = "SLOW"
    elif d.get("flagged"):
        state = "FAILING"
    elif d.get("judged_by") is None:
        state = "unjudged"
    else:
        state = "ok"
    score = d.get("score")
    return DriveVerdict(state, str(d.get("reason") or ""),
                        None if score is None else float(score))


def _json_default(o: object) -> object:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def read_state(state_dir: str | None = None) -> dict[str, Any] | None:
    """The state file, or None if there is none (or it is not JSON)."""
    try:
        with open(state_file(state_dir)) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def monitor_alive(state: dict[str, Any]) -> bool:
    pid = state.get("pid")
    return isinstance(pid, int) and pid_alive(pid)
